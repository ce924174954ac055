"""What a stakeholder's consumer may put in the seven-year audit trail: the consumer toolkit's
records pass the audit writer's check as they are; a record with free text (a note, a name, an
exception's message) is refused whole, and its text reaches no stored record."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from fabric import topology
from fabric.adapters.memory import MemoryTransport
from fabric.adapters.sns import HEADERS_ATTRIBUTE, MESSAGE_ID_ATTRIBUTE, TOPIC_ATTRIBUTE
from fabric.audit import AuditEvent, AuditRecord, encode_audit_batch
from fabric.audit_sink import TransportAuditSink
from fabric.audit_writer import batches_from_event
from fabric.consumer import (
    Delivery,
    InProgress,
    MessageProcessor,
    Poison,
    RabbitMqSettler,
    error_name,
    sqs_batch_handler,
)
from fabric.envelope import new_message_id
from fabric.errors import DecryptionFailed
from fabric.ports import MessageKind
from fabric.stakeholders import Stakeholder
from fabric.topology import user_name

GROUP = Stakeholder.MEDIA
CONSUMER = user_name(GROUP)
WORK = topology.queue_name(GROUP)
EMERGENCY = topology.queue_name(GROUP, emergency=True)
CHILD = "Siti Rahayu"  # stands for child data: it must reach no stored record
NOTE = f"{CHILD} was seen at Pasar Minggu with a bruise"


def written(*bodies: bytes, user: str = CONSUMER) -> list[dict[str, Any]]:
    """The records the audit writer would store of ``bodies``, published as ``user`` on the
    audit exchange (the Amazon MQ event source's shape)."""
    event = {
        "eventSource": "aws:rmq",
        "rmqMessagesByQueue": {
            "fabric.audit::/": [
                {
                    "basicProperties": {"messageId": f"batch-{i}", "userId": user},
                    "data": base64.b64encode(body).decode(),
                }
                for i, body in enumerate(bodies)
            ]
        },
    }
    return [record for _, batch in batches_from_event(event) for record in batch.records]


def audit_bodies(transport: MemoryTransport) -> list[bytes]:
    return [m.body for m in transport.published if m.kind is MessageKind.AUDIT]


def delivery(queue: str = WORK, *, message_id: str | None = None, **fields: Any) -> Delivery:
    return Delivery(
        message_id=new_message_id() if message_id is None else message_id,
        topic=fields.pop("topic", "media.story.published"),
        body=fields.pop("body", b'{"payload": "sealed"}'),
        queue=queue,
        **fields,
    )


def failing(exc: BaseException) -> Any:
    def handler(_delivery: Delivery) -> None:
        raise exc

    return handler


# Exception classes a consumer team may have: names the trail does not take as a reason.
NonAscii = type("\u00dcberFehler", (Exception,), {})
TooLong = type("E" * 65, (ValueError,), {})
Spaced = type(f"{CHILD} Error", (KeyError,), {})  # type() takes any text as a class name


def test_every_record_the_rabbitmq_toolkit_writes_is_stored_as_it_is() -> None:
    # Each way the toolkit settles a message, the odd exception names included: none may make
    # the writer refuse the group's batch (its deliveries would then be missing from the
    # compliance report).
    transport = MemoryTransport()
    settler = RabbitMqSettler(
        lambda _group: transport,
        audit=TransportAuditSink([transport], emitted_by=CONSUMER),
        consumer=CONSUMER,
    )
    outcomes = [
        (delivery(), lambda _d: None),
        (delivery(EMERGENCY), lambda _d: None),
        (delivery(attempt=2), failing(ValueError(NOTE))),
        (delivery(attempt=4), failing(ValueError(NOTE))),  # max-attempts
        (delivery(EMERGENCY), failing(Poison(NOTE))),
        (delivery(), failing(DecryptionFailed(NOTE))),
        (delivery(), failing(InProgress(NOTE))),
        (delivery(), failing(NonAscii(NOTE))),
        (
            delivery(),
            failing(TooLong()),
        ),
        (delivery(), failing(Spaced(NOTE))),
        (delivery(message_id=""), lambda _d: None),  # no-message-id
        (delivery(attempt=999_999_999), lambda _d: None),  # the highest fabric-attempt read
    ]
    items = [(d, MessageProcessor(handler).process(d)) for d, handler in outcomes]
    assert all(settler.settle(items))

    records = written(*audit_bodies(transport))

    assert [r["event"] for r in records] == [
        "delivered",
        "delivered",
        "retried",
        "dead-lettered",
        "dead-lettered",
        "dead-lettered",
        "retried",
        "retried",
        "retried",
        "retried",
        "dead-lettered",
        "delivered",
    ]
    assert [r.get("reason") for r in records[2:11]] == [
        "ValueError",
        "max-attempts",
        "poison",
        "poison",
        "InProgress",
        "Exception",  # its nearest base with a name the trail takes
        "ValueError",
        "KeyError",
        "no-message-id",
    ]
    assert {r["publisher"] for r in records} == {CONSUMER}
    assert CHILD not in json.dumps(records)
    assert "bruise" not in json.dumps(records)


def test_a_message_id_or_topic_not_of_the_fabric_is_recorded_as_absent() -> None:
    # A group's user may publish to its own retry exchange, so a work queue can hold a message
    # the router never checked: its id and type are whatever that publisher set.
    transport = MemoryTransport()
    settler = RabbitMqSettler(
        lambda _group: transport,
        audit=TransportAuditSink([transport], emitted_by=CONSUMER),
        consumer=CONSUMER,
    )
    odd = delivery(message_id=NOTE, topic=NOTE)
    uppercase = new_message_id().upper()
    items = [
        (odd, MessageProcessor(lambda _d: None).process(odd)),
        (d := delivery(message_id=uppercase), MessageProcessor(lambda _d: None).process(d)),
    ]
    settler.settle(items)

    first, second = written(*audit_bodies(transport))

    assert (first["event"], first["message_id"], "topic" in first) == ("delivered", None, False)
    assert second["message_id"] == uppercase.lower()  # a UUID as the router writes it
    assert CHILD not in json.dumps([first, second])


def sqs_record(i: int, *, receives: int = 1, headers: str | None = None) -> dict[str, Any]:
    attributes = {
        MESSAGE_ID_ATTRIBUTE: {"stringValue": new_message_id(), "dataType": "String"},
        TOPIC_ATTRIBUTE: {"stringValue": "media.story.published", "dataType": "String"},
    }
    if headers is not None:
        attributes[HEADERS_ATTRIBUTE] = {"stringValue": headers, "dataType": "String"}
    return {
        "messageId": f"sqs-{i}",
        "receiptHandle": f"h-{i}",
        "body": "{}",
        "attributes": {"ApproximateReceiveCount": str(receives)},
        "messageAttributes": attributes,
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:ap-southeast-3:123456789012:fabric-prod-fallback-media",
    }


def test_every_record_the_sqs_toolkit_writes_is_stored_as_it_is() -> None:
    transport = MemoryTransport()

    def handler(item: Delivery) -> None:
        if item.attempt > 1:
            raise ValueError(NOTE)

    handle = sqs_batch_handler(
        MessageProcessor(handler),
        audit=TransportAuditSink([transport], emitted_by=CONSUMER),
        consumer=CONSUMER,
        max_receives=3,
    )
    handle(
        {
            "Records": [
                sqs_record(0),
                sqs_record(1, receives=2),
                sqs_record(2, receives=3),
                sqs_record(3, headers='{"case": ["north"]}'),
            ]
        },
        None,
    )

    records = written(*audit_bodies(transport))

    assert [(r["event"], r.get("reason")) for r in records] == [
        ("delivered", None),
        ("retried", "ValueError"),
        ("dead-lettered", "max-receives"),
        ("retried", "MessageRejected"),
    ]
    assert CHILD not in json.dumps(records)


def test_the_toolkit_refuses_a_consumer_name_the_trail_would_refuse() -> None:
    with pytest.raises(ValueError, match="consumer name"):
        RabbitMqSettler(lambda _group: MemoryTransport(), consumer=f"{CHILD}'s desk")
    with pytest.raises(ValueError, match="consumer name"):
        sqs_batch_handler(MessageProcessor(lambda _d: None), consumer="")


def test_an_exception_is_named_by_its_class_never_its_text() -> None:
    assert error_name(ValueError(NOTE)) == "ValueError"
    assert error_name(Spaced(NOTE)) == "KeyError"
    assert error_name(NonAscii()) == "Exception"


def toolkit_record(**changes: Any) -> dict[str, Any]:
    """A ``retried`` record as the toolkit writes it, with ``changes`` (None removes a field)."""
    record = AuditRecord(
        event=AuditEvent.RETRIED,
        at=datetime.now(UTC),
        message_id=new_message_id(),
        source=CONSUMER,
        topic="media.story.published",
        body_sha256="0" * 64,
        reason="ValueError",
        attempt=2,
        queues=(topology.retry_queue_name(GROUP, 30),),
    ).to_dict()
    record.update(changes)
    return {name: value for name, value in record.items() if value is not None}


def batch_of(*records: dict[str, Any], emitted_by: str = CONSUMER) -> bytes:
    document = json.loads(encode_audit_batch([], emitted_by=emitted_by))
    document["records"] = list(records)
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"notes": NOTE}, "a field the fabric's consumer records do not have"),
        ({NOTE: 1}, "a field the fabric's consumer records do not have"),
        ({"transport": "rabbitmq"}, "a field the fabric's consumer records do not have"),
        ({"reason": f"{CHILD} hit by her father"}, "a reason its event does not have"),
        ({"reason": "a" * 65}, "a reason its event does not have"),
        ({"reason": "botocore.exceptions.ClientError"}, "a reason its event does not have"),
        ({"event": "dead-lettered", "reason": "ValueError"}, "a reason its event does not have"),
        ({"event": "delivered", "reason": "ValueError"}, "a reason its event does not have"),
        ({"message_id": NOTE}, "not a fabric message id"),
        ({"message_id": "m1"}, "not a fabric message id"),
        ({"message_id": "0190D7E6-1F2C-4B3A-9D4E-5F6A7B8C9D0E"}, "not a fabric message id"),
        ({"topic": NOTE}, "not a fabric topic"),
        ({"topic": "a" * 256}, "not a fabric topic"),
        ({"body_sha256": "Z" * 64}, "64 lowercase hex"),
        ({"source": NOTE}, "source that is not a consumer name"),
        ({"attempt": 0}, "not a whole number from 1"),
        ({"attempt": 1_000_000_000}, "not a whole number from 1"),
        ({"attempt": True}, "not a whole number from 1"),
        ({"at": "2026-12-02T00:00:00." + "1" * 100 + "Z"}, "not RFC 3339"),
        ({"queues": [f"fabric.media.{CHILD}"]}, "not one of the fabric's queue names"),
        ({"queues": ["fabric.media.notes"]}, "not one of the fabric's queue names"),
        ({"queues": [f"arn:aws:sqs:x:123456789012:{CHILD}-media"]}, "queue names"),
        # An SQS queue is one of the group's fallback queues (or their DLQs), in an AWS ARN.
        ({"queues": ["arn:aws:sqs:ap-southeast-3:123456789012:fabric-prod-notes-media"]}, "names"),
        ({"queues": ["arn:aws:sqs:ap-southeast-3:123456789012:siti-rahayu-media"]}, "names"),
        (
            {"queues": ["arn:aws-siti:sqs:ap-southeast-3:123456789012:fabric-prod-fallback-media"]},
            "names",
        ),
        (
            {"queues": ["arn:aws:sqs:siti-rahayu-seven:123456789012:fabric-prod-fallback-media"]},
            "names",
        ),
        ({"groups": ["media", "government"]}, "another group's delivery"),
    ],
)
def test_a_consumer_record_with_free_text_or_out_of_format_is_refused_whole(
    changes: dict[str, Any], why: str
) -> None:
    good = toolkit_record()
    bad = toolkit_record(**changes)

    records = written(batch_of(good, bad), batch_of(toolkit_record()))

    refused, kept = records
    assert refused["event"] == "refused-batch"
    assert refused["reason"].startswith(f"{CONSUMER} recorded")
    assert why in refused["reason"]
    assert (kept["event"], kept["publisher"]) == ("retried", CONSUMER)  # the next batch stands
    assert CHILD not in json.dumps(records)


def test_a_batch_emitted_by_a_name_that_is_not_a_code_is_refused() -> None:
    (refused,) = written(batch_of(toolkit_record(), emitted_by=NOTE))
    assert refused["event"] == "refused-batch"
    assert "emitted_by that is not a consumer name" in refused["reason"]
    assert CHILD not in json.dumps(refused)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"event": "delivered", "reason": None, "queues": [WORK]},
        {"event": "delivered", "reason": None, "message_id": None, "topic": None},
        {"event": "dead-lettered", "reason": "max-receives", "queues": [EMERGENCY + ".dlq"]},
        {"groups": ["media"], "source": "consumer:media-case_sync.v2"},
        {"queues": ["arn:aws:sqs:ap-southeast-3:123456789012:fabric-prod-fallback-media-dlq"]},
        {"message_id": "01JDQ3ZP5G8Y7K2M4N6R8T0V1W", "attempt": 999_999_999},
    ],
)
def test_a_consumer_record_in_the_fabrics_formats_is_stored(changes: dict[str, Any]) -> None:
    (record,) = written(batch_of(toolkit_record(**changes)))
    assert record["event"] != "refused-batch", record["reason"]
