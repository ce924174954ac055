"""The SNS/SQS fallback transport on moto: filtered delivery per group, every entry checked."""

from __future__ import annotations

import json
import uuid
from typing import Any

import boto3
import pytest

from fabric.adapters.sns import SnsFallbackTransport, entry_bytes
from fabric.envelope import MAX_ENCODED_BYTES, MAX_HEADERS_BYTES, Envelope, validate_envelope
from fabric.ports import Failure, MessageKind, OutboundMessage
from fabric.stakeholders import STAKEHOLDERS, Stakeholder
from fabric.topology import delivery_headers
from tests.integration.aws_fallback import bootstrapped_router

pytestmark = pytest.mark.integration
REGION = "ap-southeast-3"


def transport(aws: dict[str, Any]) -> SnsFallbackTransport:
    return SnsFallbackTransport(
        fallback_topic_arn=aws["topics"]["fallback"],
        emergency_topic_arn=aws["topics"]["emergency"],
        client_factory=lambda: boto3.client("sns", region_name=REGION),
    )


def message(*groups: Stakeholder, emergency: bool = False, **fields: Any) -> OutboundMessage:
    message_id = str(uuid.uuid4())
    body = json.dumps({"message_id": message_id, "topic": "t.x", "payload": {}}).encode()
    return OutboundMessage(
        message_id, "t.x", body, frozenset(groups), emergency=emergency, **fields
    )


def received(aws: dict[str, Any], flow: str, group: Stakeholder) -> list[dict[str, Any]]:
    response = aws["sqs"].receive_message(
        QueueUrl=aws["queues"][(flow, group)],
        MaxNumberOfMessages=10,
        MessageAttributeNames=["All"],
    )
    return list(response.get("Messages", []))


def test_each_group_queue_gets_exactly_the_messages_routed_to_it(aws: dict[str, Any]) -> None:
    both = message(Stakeholder.GOVERNMENT, Stakeholder.COMMUNITY)
    media = message(Stakeholder.MEDIA)
    alarm = message(Stakeholder.GOVERNMENT, emergency=True)
    outcomes = transport(aws).publish([both, media, alarm])
    assert [o.transport for o in outcomes] == ["fallback"] * 3
    ids = {
        (flow, group): [json.loads(m["Body"])["message_id"] for m in received(aws, flow, group)]
        for flow in ("fallback", "emergency")
        for group in STAKEHOLDERS
    }
    assert ids[("fallback", Stakeholder.GOVERNMENT)] == [both.message_id]
    assert ids[("fallback", Stakeholder.COMMUNITY)] == [both.message_id]
    assert ids[("fallback", Stakeholder.MEDIA)] == [media.message_id]
    assert ids[("emergency", Stakeholder.GOVERNMENT)] == [alarm.message_id]
    assert sum(len(v) for v in ids.values()) == 4


def test_the_message_id_and_topic_travel_as_attributes_for_the_drain(aws: dict[str, Any]) -> None:
    sent = message(Stakeholder.ACADEMIC, headers={"fabric-audience": "all"})
    transport(aws).publish([sent])
    (got,) = received(aws, "fallback", Stakeholder.ACADEMIC)
    attributes = got["MessageAttributes"]
    assert attributes["fabric-message-id"]["StringValue"] == sent.message_id
    assert attributes["fabric-topic"]["StringValue"] == "t.x"
    assert json.loads(attributes["fabric-headers"]["StringValue"]) == {"fabric-audience": "all"}


def test_header_values_sqs_would_refuse_travel_escaped_and_read_back_the_same(
    aws: dict[str, Any],
) -> None:
    # SQS refuses U+FFFE and U+FFFF in an attribute value as in a body (moto stores them): the
    # headers attribute is canonical JSON, which writes them as escapes.
    sent = message(Stakeholder.MEDIA, headers={"memo": "a\ufffeb\uffff"})
    transport(aws).publish([sent])
    (got,) = received(aws, "fallback", Stakeholder.MEDIA)
    text = got["MessageAttributes"]["fabric-headers"]["StringValue"]
    assert text == '{"memo":"a\\ufffeb\\uffff"}'
    assert json.loads(text) == {"memo": "a\ufffeb\uffff"}


def test_batches_of_more_than_ten_are_split_and_all_stored(aws: dict[str, Any]) -> None:
    batch = [message(Stakeholder.BUSINESS) for _ in range(23)]
    outcomes = transport(aws).publish(batch)
    assert all(o.stored for o in outcomes)
    assert [o.message_id for o in outcomes] == [m.message_id for m in batch]


def test_what_no_group_would_receive_is_refused_not_falsely_stored(aws: dict[str, Any]) -> None:
    nobody = message()
    audit = message(Stakeholder.GOVERNMENT, kind=MessageKind.AUDIT)
    outcomes = transport(aws).publish([nobody, audit])
    assert [o.failure for o in outcomes] == [Failure.UNAVAILABLE, Failure.UNAVAILABLE]


class _PartlyFailing:
    """SNS answering a PublishBatch with one entry failed (as it does under throttling)."""

    def publish_batch(self, TopicArn: str, PublishBatchRequestEntries: list[Any]) -> Any:
        entries = PublishBatchRequestEntries
        return {
            "Successful": [{"Id": e["Id"], "MessageId": "x"} for e in entries[1:]],
            "Failed": [{"Id": entries[0]["Id"], "Code": "Throttled", "SenderFault": False}],
        }


def test_every_entry_of_a_batch_is_checked() -> None:
    sender = SnsFallbackTransport(
        fallback_topic_arn="arn:f", emergency_topic_arn="arn:e", client_factory=_PartlyFailing
    )
    outcomes = sender.publish([message(Stakeholder.MEDIA) for _ in range(3)])
    assert [o.stored for o in outcomes] == [False, True, True]


def test_sns_down_means_unavailable_for_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    sender = SnsFallbackTransport(
        fallback_topic_arn=f"arn:aws:sns:{REGION}:111111111111:nope",
        emergency_topic_arn=f"arn:aws:sns:{REGION}:111111111111:nope",
        client_factory=lambda: boto3.client(
            "sns", region_name=REGION, endpoint_url="http://127.0.0.1:1"
        ),
    )
    outcomes = sender.publish([message(Stakeholder.MEDIA)])
    assert outcomes[0].failure is Failure.UNAVAILABLE


def test_with_the_broker_down_the_router_stores_through_the_fallback(
    aws: dict[str, Any],
) -> None:
    # Port 1: nothing listens, the broker is down before the first connect.
    router = bootstrapped_router(aws, port=1)
    alert = {
        "message_id": str(uuid.uuid4()),
        "topic": "child-safety.incident.reported",
        "priority": "emergency",
        "classification": "restricted",
        "payload": {"child": "CANARY-in-fallback"},
    }
    (result,) = router.route([alert], source="community").results
    assert (result.status, result.transport) == ("accepted", "fallback")
    for group in (Stakeholder.GOVERNMENT, Stakeholder.COMMUNITY):
        (got,) = received(aws, "emergency", group)
        assert json.loads(got["Body"])["message_id"] == alert["message_id"]
        assert "CANARY-in-fallback" not in got["Body"]
    assert received(aws, "emergency", Stakeholder.MEDIA) == []


_REQUESTS: list[list[dict[str, Any]]] = []


class _Recording:
    """An SNS client that keeps what it is asked to publish (in _REQUESTS) and stores it all."""

    def publish_batch(self, *, TopicArn: str, PublishBatchRequestEntries: Any) -> Any:
        _REQUESTS.append(PublishBatchRequestEntries)
        return {"Successful": [{"Id": e["Id"]} for e in PublishBatchRequestEntries]}


def largest_acceptable(group_count: int = 5) -> OutboundMessage:
    """The largest envelope validation accepts, with the largest headers, to every group."""
    headers = {f"h{i:03d}": "v" * 40 for i in range(80)}
    while len(json.dumps(headers, separators=(",", ":"))) < MAX_HEADERS_BYTES:
        headers["zz"] = headers.get("zz", "") + "v"
    del headers["zz"]
    topic = ("a" * 63 + ".") * 3 + "a" * 63
    groups = sorted(STAKEHOLDERS, key=str)[:group_count]
    fields: dict[str, Any] = {
        "topic": topic,
        "headers": headers,
        "audience": [g.value for g in groups],
    }
    size = len(json.dumps({**fields, "payload": ""}, separators=(",", ":")))
    envelope = None
    for extra in range(200):  # the padding that lands exactly on the limit
        payload = "x" * (MAX_ENCODED_BYTES - size - extra)
        result = validate_envelope({**fields, "payload": payload}, "government")
        if isinstance(result, Envelope) and len(result.to_json_bytes()) == MAX_ENCODED_BYTES:
            envelope = result
            break
    assert envelope is not None
    return OutboundMessage(
        envelope.message_id,
        envelope.topic,
        envelope.to_json_bytes(),
        frozenset(groups),
        headers=delivery_headers(envelope),
    )


def test_the_largest_message_validation_accepts_fits_sns_with_its_attributes() -> None:
    # SNS counts attributes (name, type, value) in its 256 KiB; moto counts the body only.
    biggest = largest_acceptable()
    _REQUESTS.clear()
    sender = SnsFallbackTransport(
        fallback_topic_arn="arn:f", emergency_topic_arn="arn:e", client_factory=_Recording
    )

    outcomes = sender.publish([biggest, largest_acceptable()])

    assert [o.stored for o in outcomes] == [True, True]
    assert [len(request) for request in _REQUESTS] == [1, 1]  # one a request
    for (entry,) in _REQUESTS:
        assert entry_bytes(entry) <= 262_144
        assert entry_bytes(entry) > MAX_ENCODED_BYTES + MAX_HEADERS_BYTES  # headers counted


class _TopicsInOrder:
    """SNS storing every entry, recording the topic of each PublishBatch call in order."""

    def __init__(self) -> None:
        self.topics: list[str] = []

    def publish_batch(self, TopicArn: str, PublishBatchRequestEntries: list[Any]) -> Any:
        self.topics.append(TopicArn)
        return {
            "Successful": [{"Id": e["Id"], "MessageId": "x"} for e in PublishBatchRequestEntries]
        }


def test_an_emergency_is_sent_before_the_bulk_of_the_same_call() -> None:
    # During an outage a call of 200 bulk messages and one emergency (last) must not make the
    # emergency wait for twenty bulk requests, each of which may take seconds to fail.
    sns = _TopicsInOrder()
    sender = SnsFallbackTransport(
        fallback_topic_arn="arn:f", emergency_topic_arn="arn:e", client_factory=lambda: sns
    )
    bulk = [message(Stakeholder.MEDIA) for _ in range(200)]
    outcomes = sender.publish([*bulk, message(Stakeholder.GOVERNMENT, emergency=True)])
    assert all(o.stored for o in outcomes)
    assert sns.topics == ["arn:e"] + ["arn:f"] * 20
