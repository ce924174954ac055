"""Replay end to end: the real router on the local RabbitMQ, its audit batches written by the real
audit writer into an Object Lock bucket (moto), then replayed back into the stakeholder queues.

The archive is made the way production makes it: the router sends its records and the stored
bytes to ``fabric.audit``, the writer takes them from there (as its Amazon MQ event source hands
them over) and writes ``audit/`` and ``archive/`` objects. Nothing of pika or the broker is
mocked.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import boto3
import pika
import pytest

from fabric.adapters.audit_storage import DynamoDbChainStore, S3ObjectStore
from fabric.adapters.esdk import EsdkCipher
from fabric.adapters.kms_signer import KmsSigner
from fabric.audit_chain import Keyring, decode_object, verify_trail
from fabric.audit_writer import AuditWriter, batches_from_event
from fabric.bootstrap import ReplayRuntime, build_replay, build_router_runtime
from fabric.envelope import format_timestamp, from_wire
from fabric.protection import encryption_context, open_payload
from fabric.replay import parse_request
from fabric.settings import ReplaySettings, RouterSettings
from fabric.stakeholders import STAKEHOLDERS
from fabric.topology import AUDIT_QUEUE, REPLAY_HEADER, queue_name
from tests.integration.aws_audit import create_audit_bucket, create_idempotency_table
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import AMQP, GUEST
from tests.integration.faults import FaultProxy

pytestmark = pytest.mark.integration

BUCKET = "fabric-test-audit"
TABLE = "fabric-test-idempotency"
WRITER = "fabric-test-audit-writer"
CANARY = "CANARY-Siti-Rahayu-born-2017"
STALL = 1.5  # seconds: above the router's confirm timeout, below the replay's


@pytest.fixture
def fabric(aws: dict[str, Any], broker_vhost: str) -> Iterator[SimpleNamespace]:
    """The router and the replay as ``fabric.bootstrap`` wires them (guest on the test's vhost,
    moto for AWS), the audit writer on an Object Lock bucket, and a channel to look with."""
    s3 = boto3.client("s3", region_name=REGION)
    create_audit_bucket(s3, BUCKET, retention={"Mode": "GOVERNANCE", "Days": 1})
    dynamodb = boto3.client("dynamodb", region_name=REGION)
    create_idempotency_table(dynamodb, TABLE)
    kms = boto3.client("kms", region_name=REGION)
    signing = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]
    messages_key = kms.create_key(Description="fabric messages")["KeyMetadata"]["Arn"]
    secret = boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name="platform", SecretString=json.dumps({"username": GUEST[0], "password": GUEST[1]})
    )["ARN"]
    broker = {
        "environment": "test",
        "rabbitmq_host": AMQP[0],
        "rabbitmq_port": AMQP[1],
        "rabbitmq_tls": False,
        "rabbitmq_vhost": broker_vhost,
        "rabbitmq_secret_arn": secret,
    }
    router = build_router_runtime(
        RouterSettings(
            **broker,
            messages_key_arn=messages_key,
            identity_claim="fabric:group",
            ingest_queue_prefix="fabric-test-ingest-",
            fallback_topic_arn=aws["topics"]["fallback"],
            emergency_topic_arn=aws["topics"]["emergency"],
        )
    ).router
    signer = KmsSigner(signing["Arn"], lambda: kms)
    writer = AuditWriter(
        WRITER,
        chains=DynamoDbChainStore(TABLE, lambda: dynamodb),
        objects=S3ObjectStore(BUCKET, lambda: s3),
        signer=signer,
    )
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            *AMQP, virtual_host=broker_vhost, credentials=pika.PlainCredentials(*GUEST)
        )
    )
    trail = {"bucket": BUCKET, "writers": (WRITER,), "signing_key_arn": signing["Arn"]}
    yield SimpleNamespace(
        router=router,
        replay=build_replay(ReplaySettings(**broker, **trail, max_seconds=60)),
        broker=broker,
        trail=trail,
        writer=writer,
        signer=signer,
        s3=s3,
        channel=connection.channel(),
        cipher=EsdkCipher(messages_key, client_factory=lambda: kms),
    )
    connection.close()


def write_audit_queue(fabric: SimpleNamespace) -> list[dict[str, Any]]:
    """Hand every batch waiting on ``fabric.audit`` to the audit writer, as its Amazon MQ event
    source does; the records written."""
    messages = []
    while True:
        method, properties, body = fabric.channel.basic_get(AUDIT_QUEUE, auto_ack=True)
        if method is None:
            break
        messages.append(
            {
                "basicProperties": {
                    "messageId": properties.message_id,
                    "userId": properties.user_id,
                },
                "data": base64.b64encode(body).decode(),
            }
        )
    if not messages:
        return []
    event = {"eventSource": "aws:rmq", "rmqMessagesByQueue": {f"{AUDIT_QUEUE}::/": messages}}
    written = fabric.writer.write(batches_from_event(event, trusted=frozenset({GUEST[0]})))
    assert written.key is not None
    return decode_object(fabric.s3.get_object(Bucket=BUCKET, Key=written.key)["Body"].read())


def take(fabric: SimpleNamespace) -> dict[str, list[tuple[Any, bytes]]]:
    """Everything waiting in the groups' work queues, by queue: (properties, body)."""
    found: dict[str, list[tuple[Any, bytes]]] = {}
    for group in STAKEHOLDERS:
        for emergency in (False, True):
            queue = queue_name(group, emergency=emergency)
            while True:
                method, properties, body = fabric.channel.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                found.setdefault(queue, []).append((properties, body))
    return found


def audit_waiting(fabric: SimpleNamespace) -> int:
    declared = fabric.channel.queue_declare(AUDIT_QUEUE, passive=True)
    return int(declared.method.message_count)


def moment() -> datetime:
    at = datetime.now(UTC)
    time.sleep(0.002)  # strictly before or after what follows
    return at


def donation(topic: str = "donation.received") -> dict[str, Any]:
    return {
        "message_id": str(uuid.uuid4()),
        "topic": topic,
        "classification": "internal",
        "payload": {"amount": 25},
    }


def incident() -> dict[str, Any]:
    return {
        "message_id": str(uuid.uuid4()),
        "topic": "child-safety.incident.reported",
        "priority": "emergency",
        "classification": "restricted",
        "payload": {"child": CANARY, "location": "Jakarta Timur"},
    }


def test_a_period_and_topic_filter_replay_the_stored_bytes_into_the_stakeholder_queues(
    fabric: SimpleNamespace,
) -> None:
    start = moment()
    gift, alarm, match = donation(), incident(), donation("volunteer.match.made")
    assert fabric.router.route([gift, alarm], source="community").accepted == 2
    assert fabric.router.route([match], source="business").accepted == 1
    end = moment()
    assert fabric.router.route([donation()], source="community").accepted == 1  # after the end
    trail = write_audit_queue(fabric)
    fabric.writer.checkpoint()  # the replay verifies the KMS signature of this checkpoint
    accepted = {r["message_id"]: r for r in trail if r["event"] == "accepted"}
    original = {
        queue: [(p.message_id, body) for p, body in items] for queue, items in take(fabric).items()
    }
    event = {
        "start": format_timestamp(start),
        "end": format_timestamp(end),
        "topics": ["donation.#", "child-safety.#"],
        "replay_id": "replay-it-1",
    }
    replayer = fabric.replay.replayer

    # A dry run reads and checks everything and publishes nothing, not even audit records.
    dry = replayer.run(parse_request({**event, "dry_run": True}))
    assert (dry.selected, dry.would_replay, dry.replayed, dry.stopped) == (2, 2, 0, "done")
    assert {item.message_id: item.groups for item in dry.messages} == {
        gift["message_id"]: ("business", "community"),
        alarm["message_id"]: ("community", "government"),
    }
    assert take(fabric) == {}
    assert audit_waiting(fabric) == 0

    report = replayer.run(parse_request(event))
    assert (report.replayed, report.missing_body, report.corrupt, report.stopped) == (
        2,
        0,
        0,
        "done",
    ), report.problems
    replayed = take(fabric)
    chosen = {gift["message_id"], alarm["message_id"]}
    expected = {
        queue: [(message_id, body) for message_id, body in items if message_id in chosen]
        for queue, items in original.items()
        if any(message_id in chosen for message_id, _ in items)
    }
    assert (
        set(replayed)
        == set(expected)
        == {
            "fabric.business",
            "fabric.community",
            "fabric.community.emergency",
            "fabric.government.emergency",
        }
    )
    for queue, items in replayed.items():
        # The exact stored bytes, under the same message id, marked as a replay.
        assert [(p.message_id, body) for p, body in items] == expected[queue], queue
        for properties, _ in items:
            assert properties.headers[REPLAY_HEADER] == "replay-it-1"

    # The restricted message went out as the ciphertext the router stored, which the
    # consumers can still open exactly as before.
    ((_, sealed),) = replayed["fabric.government.emergency"]
    assert CANARY.encode() not in sealed
    assert hashlib.sha256(sealed).hexdigest() == accepted[alarm["message_id"]]["body_sha256"]
    context = encryption_context(
        message_id=str(alarm["message_id"]), source="community", environment="test"
    )
    assert CANARY.encode() in open_payload(fabric.cipher, from_wire(sealed).payload, context)

    # One replayed record per message, written into the verified trail.
    records = [r for r in write_audit_queue(fabric) if r["event"] == "replayed"]
    assert sorted(r["message_id"] for r in records) == sorted(
        [gift["message_id"], alarm["message_id"]]
    )
    for record in records:
        assert record["replay_id"] == "replay-it-1"
        assert record["body_sha256"] == accepted[record["message_id"]]["body_sha256"]
        assert record["emitted_by"] == "replay"
    fabric.writer.checkpoint()
    store = S3ObjectStore(BUCKET, lambda: fabric.s3)
    verified = verify_trail(
        objects={key: store.get(key) for key in store.keys(f"audit/{WRITER}/")},
        checkpoints=[(k, json.loads(store.get(k))) for k in store.keys(f"checkpoints/{WRITER}/")],
        keys=Keyring([fabric.signer]),
        writer=WRITER,
    )
    assert verified.ok, verified.problem


class ReplayFunction:
    """Stands in for Lambda's invoke (moto cannot run functions without Docker) by running the
    replay function's code in-process against the local RabbitMQ and moto."""

    def __init__(self, runtime: ReplayRuntime) -> None:
        self.runtime = runtime
        self.events: list[tuple[str, dict[str, Any]]] = []

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
        event = json.loads(Payload)
        self.events.append((FunctionName, event))
        try:
            body = self.runtime.replayer.run(parse_request(event)).to_dict()
        except ValueError as exc:
            body = {"error": str(exc)}
        return {"Payload": io.BytesIO(json.dumps(body).encode())}


def test_the_runbook_replays_in_chunks_behind_the_cursor_without_repeating_one(
    fabric: SimpleNamespace,
) -> None:
    from scripts import runbook

    start = moment()
    gifts = [donation() for _ in range(5)]
    for gift in gifts:  # five calls: five acceptances at five moments
        fabric.router.route([gift], source="community")
    end = moment()
    write_audit_queue(fabric)
    fabric.writer.checkpoint()  # replay takes sealed acceptances
    take(fabric)
    function, out = ReplayFunction(fabric.replay), io.StringIO()
    period = {"start": format_timestamp(start), "end": format_timestamp(end)}

    status = runbook.replay(
        "test",
        client={"lambda": function}.__getitem__,
        request={**period, "dry_run": True},
        chunk=2,
        out=out,
    )
    output = out.getvalue()
    assert status == 0, output
    assert output.count("  would replay ") == 5
    assert f"would replay {gifts[0]['message_id']}" in output
    assert "-> business, community" in output
    assert "would replay 5," in output
    assert "(nothing published)" in output
    assert take(fabric) == {}

    function.events.clear()
    out = io.StringIO()
    status = runbook.replay(
        "test", client={"lambda": function}.__getitem__, request=period, chunk=2, out=out
    )
    output = out.getvalue()
    assert status == 0, output
    assert [name for name, _ in function.events] == ["fabric-test-replay"] * 3
    assert len({event["replay_id"] for _, event in function.events}) == 1
    assert output.count("progress: replayed") == 3
    assert "summary: replay" in output
    assert (
        "replayed 5, unsealed 0, missing body 0, corrupt 0, unreadable 0, refused 0, failed 0,"
        " stopped: done" in output
    )
    arrived = take(fabric)
    for queue in ("fabric.business", "fabric.community"):
        assert [p.message_id for p, _ in arrived[queue]] == [g["message_id"] for g in gifts]

    # A refused request: exit 2, nothing replayed.
    status = runbook.replay(
        "test",
        client={"lambda": function}.__getitem__,
        request={"start": format_timestamp(end), "end": format_timestamp(start)},
        chunk=2,
        out=out,
    )
    assert status == 2
    assert "start must be before end" in out.getvalue()
    assert take(fabric) == {}


def test_a_broker_that_is_down_stops_the_replay_and_publishes_nothing(
    fabric: SimpleNamespace,
) -> None:
    start = moment()
    fabric.router.route([donation()], source="community")
    end = moment()
    write_audit_queue(fabric)
    fabric.writer.checkpoint()  # replay takes sealed acceptances
    take(fabric)
    down = build_replay(
        ReplaySettings(**{**fabric.broker, "rabbitmq_port": 1}, **fabric.trail, max_seconds=60)
    )
    period = {"start": format_timestamp(start), "end": format_timestamp(end)}
    report = down.replayer.run(parse_request(period))
    assert (report.replayed, report.failed, report.stopped) == (0, 1, "broker unavailable")
    assert report.cursor is None  # a re-run starts from the beginning again
    assert take(fabric) == {}

    from scripts import runbook

    out = io.StringIO()
    status = runbook.replay(
        "test",
        client={"lambda": ReplayFunction(down)}.__getitem__,
        request={**period, "replay_id": "replay-it-2"},
        chunk=10,
        out=out,
    )
    assert status == 1
    assert "  failed" in out.getvalue()
    assert "stopped: broker unavailable" in out.getvalue()
    assert "resume with the same command and: --replay-id replay-it-2" in out.getvalue()


def test_a_broker_stall_holds_the_replay_up_but_does_not_stop_it(fabric: SimpleNamespace) -> None:
    # The broker goes silent for longer than the router's confirm timeout (0.5 s, after which
    # the router fails over) but shorter than the replay's: the replay, which has no fallback,
    # waits for the confirms instead of stopping for a re-run.
    periods = []
    for _ in range(2):
        start = moment()
        fabric.router.route([donation()], source="community")
        periods.append({"start": format_timestamp(start), "end": format_timestamp(moment())})
    write_audit_queue(fabric)
    fabric.writer.checkpoint()  # replay takes sealed acceptances
    take(fabric)
    proxy = FaultProxy(AMQP)
    try:
        replay = build_replay(
            ReplaySettings(
                **{**fabric.broker, "rabbitmq_port": proxy.port}, **fabric.trail, max_seconds=60
            )
        )
        first = replay.replayer.run(parse_request(periods[0]))
        assert (first.replayed, first.stopped) == (1, "done"), first.problems
        proxy.blackhole()  # the connection stays open, and silent
        threading.Timer(STALL, proxy.restore).start()
        began = time.monotonic()
        second = replay.replayer.run(parse_request(periods[1]))
        waited = time.monotonic() - began
    finally:
        proxy.close()
    assert (second.replayed, second.failed, second.stopped) == (1, 0, "done"), second.problems
    assert waited >= STALL  # it did wait the stall out
    arrived = take(fabric)
    assert {queue: len(items) for queue, items in arrived.items()} == {
        "fabric.business": 2,
        "fabric.community": 2,
    }


def test_an_object_slipped_into_the_sealed_trail_stops_the_replay_before_it_publishes(
    fabric: SimpleNamespace,
) -> None:
    start = moment()
    fabric.router.route([donation()], source="community")
    fabric.router.route([donation()], source="community")
    end = moment()
    written = [r for r in write_audit_queue(fabric) if r["event"] == "accepted"]
    take(fabric)
    fabric.writer.checkpoint()
    # A copy of the sealed object under the next free sequence numbers, put there by someone
    # who can write to the bucket but cannot sign a checkpoint.
    (sealed,) = fabric.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"audit/{WRITER}/")["Contents"]
    first, last = (
        int(n) for n in sealed["Key"].rsplit("/", 1)[1].removesuffix(".jsonl").split("-")
    )
    copy = sealed["Key"].replace(f"{first:012d}-{last:012d}", f"{first:012d}-{last + 1:012d}")
    data = fabric.s3.get_object(Bucket=BUCKET, Key=sealed["Key"])["Body"].read()
    fabric.s3.put_object(Bucket=BUCKET, Key=copy, Body=data)
    period = {"start": format_timestamp(start), "end": format_timestamp(end)}

    report = fabric.replay.replayer.run(parse_request(period))

    assert (report.stopped, report.selected, report.replayed) == ("trail not verified", 0, 0)
    assert report.trail_problems == [
        f"{WRITER}: {copy}: an object no checkpoint names, among sealed ones"
    ]
    assert take(fabric) == {}
    assert audit_waiting(fabric) == 0
    assert len(written) == 2


def test_the_bucket_reader_lists_writers_and_days_and_tells_missing_from_unreachable(
    fabric: SimpleNamespace,
) -> None:
    from fabric.adapters.audit_storage import S3ObjectStore
    from fabric.errors import TransportUnavailable

    for key in ("audit/w-a/2026/12/01/1.jsonl", "audit/w-b/2026/12/02/2.jsonl", "archive/w-a/x"):
        fabric.s3.put_object(Bucket=BUCKET, Key=key, Body=b"{}\n")
    reader = S3ObjectStore(BUCKET, lambda: fabric.s3)
    assert reader.keys("audit/") == ["audit/w-a/2026/12/01/1.jsonl", "audit/w-b/2026/12/02/2.jsonl"]
    assert reader.keys("audit/w-b/2026/12/02/") == ["audit/w-b/2026/12/02/2.jsonl"]
    assert reader.read("audit/w-a/2026/12/01/1.jsonl") == b"{}\n"
    assert reader.read("audit/w-a/2026/12/01/none.jsonl") is None
    gone = S3ObjectStore("fabric-test-no-such-bucket", lambda: fabric.s3)
    with pytest.raises(TransportUnavailable):
        gone.keys("audit/")
    with pytest.raises(TransportUnavailable):
        gone.read("audit/x")
