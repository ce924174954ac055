"""The router Lambda end to end: real handler module, real RabbitMQ topology, moto for AWS."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import pika
import pika.exceptions
import pytest
from moto import mock_aws

from fabric.adapters.management import ManagementClient
from fabric.audit import decode_audit_batch
from fabric.envelope import MAX_HEADERS_BYTES, validate_envelope
from fabric.protection import encryption_context, open_payload
from fabric.routing import default_routing_table, patterns_intersect, topic_matches
from fabric.stakeholders import STAKEHOLDERS, Stakeholder
from fabric.topology import (
    AUDIT_EXCHANGE,
    AUDIT_QUEUE,
    INGRESS_EXCHANGE,
    PLATFORM_USER,
    UNROUTED_QUEUE,
    definitions,
    queue_name,
    user_name,
)
from fabric.topology_apply import apply_topology
from tests.conftest import import_handler
from tests.integration.conftest import AMQP, MANAGEMENT

pytestmark = pytest.mark.integration
REGION = "ap-southeast-3"
CANARY = "CANARY-Siti-Rahayu-born-2017"
FUNCTION = f"arn:aws:lambda:{REGION}:111111111111:function:fabric-test-router"


@pytest.fixture
def fabric(vhost: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """The generated topology in the test's vhost (users renamed for this test), moto with the
    router's key and secret, and the router handler imported with the stack's variables."""
    prefix = vhost.removeprefix("fabric-test-")
    document = definitions(default_routing_table(), vhost=vhost)
    rename = {u["name"]: f"t{prefix}-{u['name']}" for u in document["users"]}
    document["users"] = [{**u, "name": rename[u["name"]]} for u in document["users"]]
    document["permissions"] = [{**p, "user": rename[p["user"]]} for p in document["permissions"]]
    passwords = {name: uuid.uuid4().hex for name in rename.values()}
    client = ManagementClient(MANAGEMENT, "guest", "guest")
    apply_topology(client, document, passwords=passwords, vhost=vhost)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    try:
        with mock_aws():
            import boto3

            key = boto3.client("kms", region_name=REGION).create_key()["KeyMetadata"]["Arn"]
            platform = rename[PLATFORM_USER]
            secret = boto3.client("secretsmanager", region_name=REGION).create_secret(
                Name="platform",
                SecretString=json.dumps({"username": platform, "password": passwords[platform]}),
            )["ARN"]
            sns = boto3.client("sns", region_name=REGION)
            topics = {
                flow: sns.create_topic(Name=f"fabric-test-{flow}")["TopicArn"]
                for flow in ("fallback", "emergency")
            }
            for name, value in {
                "FALLBACK_TOPIC_ARN": topics["fallback"],
                "EMERGENCY_TOPIC_ARN": topics["emergency"],
                "FABRIC_ENV": "test",
                "RABBITMQ_HOST": AMQP[0],
                "RABBITMQ_PORT": str(AMQP[1]),
                "RABBITMQ_TLS": "false",
                "RABBITMQ_VHOST": vhost,
                "RABBITMQ_SECRET_ARN": secret,
                "MESSAGES_KEY_ARN": key,
                "FABRIC_IDENTITY_CLAIM": "fabric:group",
                "FABRIC_INGEST_QUEUE_PREFIX": "fabric-test-ingest-",
            }.items():
                monkeypatch.setenv(name, value)
            yield SimpleNamespace(
                handler=_import_handler(), vhost=vhost, users=rename, passwords=passwords
            )
    finally:
        for name in rename.values():
            client.delete_user(name)


def _import_handler() -> ModuleType:
    return import_handler("router", f"router_handler_{uuid.uuid4().hex}")


def invoke(fabric: SimpleNamespace, event: dict[str, Any], arn: str = FUNCTION) -> Any:
    return fabric.handler.handler(event, SimpleNamespace(invoked_function_arn=arn))


def channel_as(fabric: SimpleNamespace, user: str | None) -> Any:
    credentials = (
        pika.PlainCredentials("guest", "guest")
        if user is None
        else pika.PlainCredentials(fabric.users[user], fabric.passwords[fabric.users[user]])
    )
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(*AMQP, virtual_host=fabric.vhost, credentials=credentials)
    )
    return connection.channel()


def drain(channel: Any, queue: str) -> list[tuple[Any, bytes]]:
    messages = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return messages
        messages.append((properties, body))


def envelope(topic: str, **fields: Any) -> dict[str, Any]:
    return {"message_id": str(uuid.uuid4()), "topic": topic, "payload": {"n": 1}, **fields}


def test_each_stakeholder_queue_receives_exactly_what_the_routing_table_says(
    fabric: SimpleNamespace,
) -> None:
    table = default_routing_table()
    sent: dict[tuple[Stakeholder, bool], set[str]] = {}
    for route in table.routes:
        source = next(
            rule.source
            for rule in table.publish
            if any(_overlap(route.pattern, pattern) for pattern in rule.patterns)
        )
        topic = _concrete(route.pattern, source, table)
        headers = dict(route.headers.values[:1]) if route.headers else {}
        floor = route.min_classification
        message = envelope(topic, headers=headers, classification=str(floor or "internal"))
        result = invoke(fabric, {"messages": [message]}, f"{FUNCTION}:{source.value}")
        assert result["accepted"] == 1, (route.name, result)
        checked = validate_envelope(message, source.value)
        for delivery in table.deliveries(checked):  # type: ignore[arg-type]
            sent.setdefault((delivery.group, delivery.emergency), set()).add(message["message_id"])
    assert {group for group, _ in sent} == set(STAKEHOLDERS)
    assert (Stakeholder.GOVERNMENT, True) in sent
    for group in STAKEHOLDERS:
        channel = channel_as(fabric, user_name(group))
        for emergency in (False, True):
            got = {p.message_id for p, _ in drain(channel, queue_name(group, emergency=emergency))}
            assert got == sent.get((group, emergency), set()), (group, emergency)


def test_a_stakeholder_can_neither_read_another_groups_queue_nor_publish(
    fabric: SimpleNamespace,
) -> None:
    media = channel_as(fabric, user_name(Stakeholder.MEDIA))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        media.basic_get(queue_name(Stakeholder.GOVERNMENT), auto_ack=False)
    assert refused.value.reply_code == 403
    media = channel_as(fabric, user_name(Stakeholder.MEDIA))
    media.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        media.basic_publish(INGRESS_EXCHANGE, "media.story.published", b"{}")
    assert refused.value.reply_code == 403


def test_an_unroutable_message_is_accepted_into_the_unrouted_queue(fabric: SimpleNamespace) -> None:
    # Government may publish child-safety.#, but no route takes this topic.
    message = envelope("child-safety.drill.scheduled")
    result = invoke(fabric, {"messages": [message]}, f"{FUNCTION}:government")
    assert result["results"][0]["status"] == "accepted"
    unrouted = drain(channel_as(fabric, None), UNROUTED_QUEUE)
    assert [p.message_id for p, _ in unrouted] == [message["message_id"]]


def test_restricted_child_data_is_never_on_the_broker_in_plaintext(fabric: SimpleNamespace) -> None:
    alert = envelope(
        "child-safety.incident.reported",
        priority="emergency",
        classification="restricted",
        payload={"child": CANARY, "seen": "Pasar Minggu"},
    )
    request = {
        "version": "2.0",
        "routeKey": "POST /v1/messages",
        "requestContext": {"authorizer": {"jwt": {"claims": {"fabric:group": "community"}}}},
        "body": json.dumps(alert),
        "isBase64Encoded": False,
    }
    response = invoke(fabric, request)
    assert response["statusCode"] == 202
    government = drain(
        channel_as(fabric, user_name(Stakeholder.GOVERNMENT)),
        queue_name(Stakeholder.GOVERNMENT, emergency=True),
    )
    ((_, body),) = government
    guest = channel_as(fabric, None)
    everything = [body]
    for queue in _queues(fabric.vhost):
        everything.extend(b for _, b in drain(guest, queue))
    assert all(CANARY.encode() not in raw for raw in everything)
    received = json.loads(body)
    context = encryption_context(
        message_id=received["message_id"], source="community", environment="test"
    )
    cipher = fabric.handler.RUNTIME.router._cipher
    assert json.loads(open_payload(cipher, received["payload"], context))["child"] == CANARY


def test_a_stakeholder_may_audit_as_itself_but_not_forge_the_platform_user(
    fabric: SimpleNamespace,
) -> None:
    me = fabric.users[user_name(Stakeholder.MEDIA)]
    media = channel_as(fabric, user_name(Stakeholder.MEDIA))
    media.confirm_delivery()
    media.basic_publish(AUDIT_EXCHANGE, "x", b"{}", pika.BasicProperties(user_id=me))
    ((properties, _),) = drain(channel_as(fabric, None), AUDIT_QUEUE)
    assert properties.user_id == me  # what the audit writer reads as the publisher
    media = channel_as(fabric, user_name(Stakeholder.MEDIA))
    media.confirm_delivery()  # the publish waits for the broker's answer
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        media.basic_publish(AUDIT_EXCHANGE, "x", b"{}", pika.BasicProperties(user_id="guest"))
    assert refused.value.reply_code == 406  # PRECONDITION_FAILED: user_id is not the user


def test_sqs_ingest_audits_each_rejection_once_and_archives_the_accepted_body(
    fabric: SimpleNamespace,
) -> None:
    good = envelope("donation.pledge.received")
    bodies = [json.dumps(good), "{oops", json.dumps(envelope("donation.x", priority="urgent"))]
    event = {
        "Records": [
            {
                "messageId": f"m{i}",
                "body": body,
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:{REGION}:111111111111:fabric-test-ingest-business",
            }
            for i, body in enumerate(bodies)
        ]
    }
    assert invoke(fabric, event) == {"batchItemFailures": []}
    business = drain(
        channel_as(fabric, user_name(Stakeholder.BUSINESS)), queue_name(Stakeholder.BUSINESS)
    )
    batches = [decode_audit_batch(b) for _, b in drain(channel_as(fabric, None), AUDIT_QUEUE)]
    records = [record for batch in batches for record in batch.records]
    assert sorted((r["event"], r.get("reason")) for r in records) == [
        ("accepted", None),
        ("rejected", "invalid_priority"),
        ("rejected", "malformed_json"),
        ("routed", None),
    ]
    # The hash of what was stored; nothing of a rejected input (a hash of a child's data).
    assert all(
        len(str(r["body_sha256"])) == 64 if r["event"] != "rejected" else "body_sha256" not in r
        for r in records
    )
    routed = next(r for r in records if r["event"] == "routed")
    assert queue_name(Stakeholder.BUSINESS) in routed["queues"]  # type: ignore[operator]
    # The archive copy is byte for byte what the stakeholder queue holds.
    ((_, stored),) = business
    assert {k: v for b in batches for k, v in b.bodies.items()} == {
        hashlib.sha256(stored).hexdigest(): stored
    }


def _queues(vhost: str) -> list[str]:
    client = ManagementClient(MANAGEMENT, "guest", "guest")
    return [q["name"] for q in client.list_queues(vhost)]


def _overlap(first: str, second: str) -> bool:
    return patterns_intersect(first, second)


def _concrete(pattern: str, source: Stakeholder, table: Any) -> str:
    """A topic that matches ``pattern`` and that ``source`` may publish."""
    words = [w.replace("*", "any").replace("#", "any") for w in pattern.split(".")]
    topic = ".".join(words)
    if table.may_publish(source.value, topic):
        return topic
    for rule in table.publish:
        if rule.source is source:
            for candidate in rule.patterns:
                concrete = ".".join(w if w not in "*#" else "any" for w in candidate.split("."))
                if table.may_publish(source.value, concrete) and _matches(pattern, concrete):
                    return concrete
    raise AssertionError(f"no publishable topic for {pattern} from {source}")


def _matches(pattern: str, topic: str) -> bool:
    return topic_matches(pattern, topic)


def test_a_message_with_the_largest_headers_and_body_is_stored_and_one_over_is_refused(
    fabric: SimpleNamespace,
) -> None:
    # Unbounded headers once broke the AMQP content-header frame (frame_too_large) and with it
    # every message of the call; validation bounds them, and the largest allowed go through.
    headers = {f"h{i:03d}": "v" * 40 for i in range(80)}
    headers["region"] = ""
    headers["region"] = "j" * (MAX_HEADERS_BYTES - len(json.dumps(headers, separators=(",", ":"))))
    biggest = envelope("donation.received", headers=headers, payload="x" * 240_000)
    over = envelope("donation.received", headers={**headers, "one": "more"})
    follower = envelope("donation.received")

    result = invoke(fabric, {"messages": [biggest, over, follower]}, f"{FUNCTION}:business")

    assert [r["status"] for r in result["results"]] == ["accepted", "rejected", "accepted"]
    assert result["results"][1]["reason"] == "invalid_header"
    stored = drain(channel_as(fabric, None), queue_name(Stakeholder.BUSINESS))
    assert [p.message_id for p, _ in stored] == [biggest["message_id"], follower["message_id"]]
    assert stored[0][0].headers["region"] == headers["region"]


def test_sqs_ingest_stores_a_corrected_copy_that_follows_a_refused_one_in_the_same_batch(
    fabric: SimpleNamespace,
) -> None:
    # Both answers are final (the records are deleted): the corrected copy must not be told
    # duplicate_message_id because of a copy the routing table refused, or it is lost.
    corrected = envelope("donation.received")
    refused = {**corrected, "topic": "case.updated"}  # business may not publish case.#
    bodies = [refused, corrected, {**corrected, "payload": {"n": 2}}]
    queue = f"arn:aws:sqs:{REGION}:111111111111:fabric-test-ingest-business"
    event = {
        "Records": [
            {
                "messageId": f"m{i}",
                "body": json.dumps(body),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue,
            }
            for i, body in enumerate(bodies)
        ]
    }
    assert invoke(fabric, event) == {"batchItemFailures": []}
    stored = drain(channel_as(fabric, None), queue_name(Stakeholder.BUSINESS))
    assert [(p.message_id, json.loads(b)["payload"]) for p, b in stored] == [
        (corrected["message_id"], {"n": 1})
    ]
    batches = [decode_audit_batch(b) for _, b in drain(channel_as(fabric, None), AUDIT_QUEUE)]
    assert sorted((r["event"], r.get("reason")) for b in batches for r in b.records) == [
        ("accepted", None),
        ("rejected", "duplicate_message_id"),
        ("rejected", "source_not_allowed"),
        ("routed", None),
    ]


def test_sqs_ingest_gives_a_message_without_an_id_its_sqs_message_id(
    fabric: SimpleNamespace,
) -> None:
    # The same on every delivery of the SQS message, so a copy stored before a lost confirm and
    # the redelivered one are one message to the consumers.
    sqs_id = str(uuid.uuid4())
    event = {
        "Records": [
            {
                "messageId": sqs_id,
                "body": json.dumps({"topic": "donation.received", "payload": {"n": 1}}),
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:{REGION}:111111111111:fabric-test-ingest-business",
            }
        ]
    }
    assert invoke(fabric, event) == {"batchItemFailures": []}
    stored = drain(channel_as(fabric, None), queue_name(Stakeholder.BUSINESS))
    assert [(p.message_id, json.loads(b)["message_id"]) for p, b in stored] == [(sqs_id, sqs_id)]
