"""The audit writer function's entry points on moto: Amazon MQ and SQS events, the hourly
checkpoint, bad input; the trail it writes verifies."""

from __future__ import annotations

import base64
import hashlib
import json
from types import ModuleType
from typing import Any

import pytest

from fabric.adapters.audit_storage import S3ObjectStore
from fabric.adapters.sns import MESSAGE_ID_ATTRIBUTE
from fabric.audit import AuditEvent, AuditRecord, encode_audit_batch
from fabric.audit_chain import Keyring, decode_object, verify_trail
from fabric.stakeholders import Stakeholder
from fabric.topology import PLATFORM_USER, user_name
from tests.conftest import load_handler
from tests.integration.test_audit_writer import BUCKET, TABLE, aws_audit  # noqa: F401 (fixture)

WRITER = "fabric-test-audit-writer"
# Message ids of consumer records: the writer refuses a consumer's id not in the envelope's syntax.
M1, M2 = "0190d7e6-1f2c-4b3a-9d4e-5f6a7b8c9d01", "0190d7e6-1f2c-4b3a-9d4e-5f6a7b8c9d02"


@pytest.fixture
def handler(aws_audit: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> ModuleType:  # noqa: F811
    for name, value in {
        "FABRIC_ENV": "test",
        "AUDIT_BUCKET": BUCKET,
        "IDEMPOTENCY_TABLE": TABLE,
        "SIGNING_KEY_ARN": aws_audit["signer"].key_id,
        "AUDIT_WRITER_NAME": WRITER,
    }.items():
        monkeypatch.setenv(name, value)
    return load_handler("audit_writer", monkeypatch)


def body(*message_ids: str, event: AuditEvent = AuditEvent.REJECTED) -> bytes:
    from datetime import UTC, datetime

    records = [
        AuditRecord(event=event, at=datetime.now(UTC), message_id=m, source="t")
        for m in message_ids
    ]
    return encode_audit_batch(records, emitted_by="router")


def verified(store: S3ObjectStore, signer: Any) -> Any:
    """The writer's trail as the bucket holds it, verified."""
    return verify_trail(
        objects={k: store.get(k) for k in store.keys(f"audit/{WRITER}/")},
        checkpoints=[(k, json.loads(store.get(k))) for k in store.keys(f"checkpoints/{WRITER}/")],
        keys=Keyring([signer]),
        writer=WRITER,
    )


def amazon_mq(*bodies: tuple[str, bytes], user: str = PLATFORM_USER) -> dict[str, Any]:
    return {
        "eventSource": "aws:rmq",
        "rmqMessagesByQueue": {
            "fabric.audit::/": [
                {
                    "basicProperties": {"messageId": batch_id, "userId": user},
                    "data": base64.b64encode(data).decode(),
                }
                for batch_id, data in bodies
            ]
        },
    }


def sqs(*bodies: tuple[str, bytes]) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"sqs-{i}",
                "body": data.decode(),
                "messageAttributes": {
                    MESSAGE_ID_ATTRIBUTE: {"stringValue": batch_id, "dataType": "String"}
                },
                "eventSource": "aws:sqs",
            }
            for i, (batch_id, data) in enumerate(bodies)
        ]
    }


def test_a_consumer_may_record_its_deliveries_but_not_platform_events(
    handler: ModuleType,
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    consumer = user_name(Stakeholder.COMMUNITY)
    forged = body(M2, event=AuditEvent.ACCEPTED)  # only the router accepts messages
    handler.handler(
        amazon_mq(("c1", body(M1, event=AuditEvent.DELIVERED)), ("c2", forged), user=consumer),
        None,
    )
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    (key,) = store.keys(f"audit/{WRITER}/")
    delivered, refused = decode_object(store.get(key))
    assert (delivered["event"], delivered["publisher"]) == ("delivered", consumer)
    assert refused["event"] == "refused-batch"
    assert refused["publisher"] == consumer
    assert refused["body_sha256"] == hashlib.sha256(forged).hexdigest()
    assert M2 not in json.dumps(refused)


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("groups", 5, "groups that is not a list of text"),
        ("queues", ["fabric.media", 7], "queues that is not a list of text"),
        ("at", "2026-12-02T00:00:00.abcZ", "not RFC 3339"),
        ("at", 1764633600, "not RFC 3339"),
        ("message_id", {"id": 1}, "message_id that is not text"),
        ("attempt", "3", "attempt that is not a whole number"),
    ],
)
def test_a_consumer_record_the_trails_readers_cannot_take_is_refused(
    handler: ModuleType,
    aws_audit: dict[str, Any],  # noqa: F811
    field: str,
    value: object,
    why: str,
) -> None:
    # The compliance report reads these; one malformed delivery stopped its whole day.
    document = json.loads(body(M1, event=AuditEvent.DELIVERED))
    document["records"][0][field] = value
    malformed = json.dumps(document).encode()
    consumer = user_name(Stakeholder.MEDIA)
    handler.handler(
        amazon_mq(
            ("bad", malformed), ("good", body(M2, event=AuditEvent.DELIVERED)), user=consumer
        ),
        None,
    )
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    (key,) = store.keys(f"audit/{WRITER}/")
    refused, delivered = decode_object(store.get(key))
    assert (refused["event"], refused["batch"]) == ("refused-batch", "bad")
    assert why in refused["reason"]
    assert (delivered["event"], delivered["message_id"]) == ("delivered", M2)


@pytest.mark.parametrize(
    ("user", "record", "why"),
    [
        # The broker checks a user-id only when there is one: an anonymous batch is refused.
        ("", {}, "not a stakeholder group's user"),
        (user_name(Stakeholder.MEDIA), {"groups": ["government"]}, "another group's delivery"),
        (user_name(Stakeholder.MEDIA), {"queues": ["fabric.government"]}, "another group's queue"),
        (
            user_name(Stakeholder.MEDIA),
            {"queues": ["fabric.government.emergency"]},
            "another group's queue",
        ),
    ],
)
def test_a_consumer_cannot_record_deliveries_for_another_group(
    handler: ModuleType,
    aws_audit: dict[str, Any],  # noqa: F811
    user: str,
    record: dict[str, Any],
    why: str,
) -> None:
    # A forged delivery for government would make the compliance report count an emergency as
    # delivered that never was.
    document = json.loads(body(M1, event=AuditEvent.DELIVERED))
    document["records"][0].update(record)
    event = amazon_mq(("forged", json.dumps(document).encode()), user=user)
    handler.handler(event, None)
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    (key,) = store.keys(f"audit/{WRITER}/")
    (refused,) = decode_object(store.get(key))
    assert refused["event"] == "refused-batch"
    assert why in refused["reason"]


def test_a_consumer_records_its_own_queues_deliveries(
    handler: ModuleType,
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    document = json.loads(body(M1, event=AuditEvent.DELIVERED))
    document["records"][0]["queues"] = ["fabric.media.emergency"]
    sqs_copy = json.loads(body(M2, event=AuditEvent.DELIVERED))
    sqs_copy["records"][0]["queues"] = [
        "arn:aws:sqs:ap-southeast-3:123456789012:fabric-dev-fallback-media"
    ]
    event = amazon_mq(
        ("own", json.dumps(document).encode()),
        ("own-sqs", json.dumps(sqs_copy).encode()),
        user=user_name(Stakeholder.MEDIA),
    )
    handler.handler(event, None)
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    (key,) = store.keys(f"audit/{WRITER}/")
    assert [r["event"] for r in decode_object(store.get(key))] == ["delivered", "delivered"]


def test_both_event_sources_and_the_checkpoint_make_a_trail_that_verifies(
    handler: ModuleType,
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    first = handler.handler(amazon_mq(("b1", body("m1", "m2")), ("junk", b"\xff not json")), None)
    second = handler.handler(sqs(("b2", body("m3")), ("b1", body("m1", "m2"))), None)
    sealed = handler.handler({"checkpoint": True}, None)

    assert (first["records"], second["records"], second["duplicate_batches"]) == (3, 1, 1)
    assert sealed["checkpoint"].startswith(f"checkpoints/{WRITER}/")
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    result = verified(store, aws_audit["signer"])
    assert result.ok, result.problem
    assert result.records == 4
    assert result.message_ids["rejected"] == {"m1", "m2", "m3"}
    unreadable = [
        json.loads(line)
        for key in store.keys(f"audit/{WRITER}/")
        for line in store.get(key).splitlines()
        if b"unreadable-batch" in line
    ]
    assert len(unreadable) == 1, "a body that is no audit batch is recorded, not dropped"
    assert unreadable[0]["batch"] == "junk"


def test_a_batch_the_trail_cannot_hold_is_recorded_unreadable_and_the_others_are_written(
    handler: ModuleType,
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # A stakeholder's consumer may publish to fabric.audit: what it sends must not stop the trail.
    template = json.loads(body(M1, event=AuditEvent.DELIVERED))
    lone = json.dumps(template).replace(f'"{M1}"', '"\\ud800"').encode()
    deep = (
        json.dumps({**template, "records": [{"x": [[]] * 1}]})
        .replace("[[]]", "[" * 100_000 + "]" * 100_000)
        .encode()
    )
    nan = json.dumps(template).replace(f'"{M1}"', "NaN").encode()
    huge = json.dumps(template).replace(f'"{M1}"', "1e400").encode()  # JSON, but infinite
    consumer = user_name(Stakeholder.COMMUNITY)
    event = amazon_mq(
        ("lone", lone),
        ("deep", deep),
        ("nan", nan),
        ("huge", huge),
        ("good", body(M2, event=AuditEvent.DELIVERED)),
        user=consumer,
    )

    written = handler.handler(event, None)
    handler.handler({"checkpoint": True}, None)

    assert written["records"] == 5
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    (key,) = store.keys(f"audit/{WRITER}/")
    records = decode_object(store.get(key))
    assert [(r["batch"], r["event"]) for r in records] == [
        ("lone", "unreadable-batch"),
        ("deep", "unreadable-batch"),
        ("nan", "unreadable-batch"),
        ("huge", "unreadable-batch"),
        ("good", "delivered"),
    ]
    result = verified(store, aws_audit["signer"])
    assert result.ok, result.problem


def test_an_event_of_another_shape_is_refused(handler: ModuleType) -> None:
    assert handler.handler({"hello": "world"}, None) == {"error": "not an Amazon MQ or SQS event"}


def test_a_batch_delivered_twice_in_one_event_is_written_once(
    handler: ModuleType,
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # SQS delivers at least once: the same message (same batch id) can arrive twice in one
    # event, and a publisher that re-sent a batch after a confirm timeout puts a second copy
    # on the broker. The batch marks are saved after the object, so both copies were fresh.
    once = body("m1", "m2")
    result = handler.handler(sqs(("b1", once), ("b1", once), ("b2", body("m3"))), None)
    again = handler.handler(amazon_mq(("b3", body("m4")), ("b3", body("m4"))), None)

    assert (result["records"], result["duplicate_batches"]) == (3, 1)
    assert (again["records"], again["duplicate_batches"]) == (1, 1)
    handler.handler({"checkpoint": True}, None)
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    records = [r for k in store.keys(f"audit/{WRITER}/") for r in decode_object(store.get(k))]
    assert sorted(r["message_id"] for r in records) == ["m1", "m2", "m3", "m4"]
    assert verified(store, aws_audit["signer"]).ok


def test_a_message_whose_data_is_not_base64_is_recorded_and_the_others_written(
    handler: ModuleType,
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # The event used to be answered with an error as a whole, which the event source takes as
    # done: every batch in it was dropped unrecorded.
    event = amazon_mq(("b1", body("m1")), ("b2", body("m2")))
    (messages,) = event["rmqMessagesByQueue"].values()
    messages[0]["data"] = "bm90IGJhc2U2NA"  # padding cut off
    result = handler.handler(event, None)

    assert result["records"] == 2
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    (key,) = store.keys(f"audit/{WRITER}/")
    unreadable, written = decode_object(store.get(key))
    assert unreadable["event"] == "unreadable-batch"
    assert unreadable["body_sha256"] == hashlib.sha256(b"bm90IGJhc2U2NA").hexdigest()
    assert written["message_id"] == "m2"
