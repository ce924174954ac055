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
from fabric.envelope import new_message_id
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


def digest(data: bytes, user: str | None = None) -> str:
    """The batch id the writer gives a batch sent without a usable id: its body's SHA-256, or,
    from a ``user`` that is not trusted (a stakeholder group's, or none: ""), the SHA-256 of the
    user-id as a JSON string, a newline and the body."""
    if user is not None:
        data = json.dumps(user).encode() + b"\n" + data
    return "sha256-" + hashlib.sha256(data).hexdigest()


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
    assert (refused["event"], refused["batch"]) == ("refused-batch", digest(malformed, consumer))
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
    sqs_copy["records"][0]["queues"] = [  # the fixture's FABRIC_ENV is test
        "arn:aws:sqs:ap-southeast-3:123456789012:fabric-test-fallback-media"
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
        ("good", good := body(M2, event=AuditEvent.DELIVERED)),
        user=consumer,
    )

    written = handler.handler(event, None)
    handler.handler({"checkpoint": True}, None)

    assert written["records"] == 5
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    (key,) = store.keys(f"audit/{WRITER}/")
    records = decode_object(store.get(key))
    assert [(r["batch"], r["event"]) for r in records] == [
        (digest(lone, consumer), "unreadable-batch"),
        (digest(deep, consumer), "unreadable-batch"),
        (digest(nan, consumer), "unreadable-batch"),
        (digest(huge, consumer), "unreadable-batch"),
        (digest(good, consumer), "delivered"),
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


CHILD = "Siti Rahayu, 7, Jalan Melati 12, case note: bruises"  # stands for child data


def test_a_stakeholders_batch_id_is_a_fabric_id_or_its_bodys_digest_never_its_text(
    handler: ModuleType,
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # A group's user sets the AMQP message id of its audit batches freely (up to 255 bytes);
    # the writer stored it in every record of the batch as ``batch``, in a trail nobody can
    # erase for seven years, whether it took the batch, refused it or could not read it.
    consumer = user_name(Stakeholder.MEDIA)
    toolkit_id = new_message_id()  # what the toolkit's sink sends
    accepted = body(M1, event=AuditEvent.DELIVERED)
    refused = body(M2, event=AuditEvent.ACCEPTED)  # only the router accepts
    unreadable = b"not an audit batch"
    lowercase_ulid = "01jdq3zp5g8y7k2m4n6r8t0v1w"  # a ULID, but not as the router writes it
    other = body(M2, event=AuditEvent.DELIVERED)
    own = body(new_message_id(), event=AuditEvent.DELIVERED)
    anonymous = body(M1, event=AuditEvent.DELIVERED)
    event = amazon_mq(
        (CHILD, accepted),
        (f"{CHILD} #2", refused),
        (f"{CHILD} #3", unreadable),
        (lowercase_ulid, other),
        (toolkit_id, own),
        user=consumer,
    )
    # No user-id at all (the broker checks one only when there is one): refused, id and all.
    event["rmqMessagesByQueue"]["fabric.audit::/"] += amazon_mq(
        (f"{CHILD} #4", anonymous), user=""
    )["rmqMessagesByQueue"]["fabric.audit::/"]

    written = handler.handler(event, None)
    again = handler.handler(event, None)  # the event source delivers the event once more

    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    stored = store.get(written["object"])
    assert [(r["event"], r["batch"]) for r in decode_object(stored)] == [
        ("delivered", digest(accepted, consumer)),
        ("refused-batch", digest(refused, consumer)),
        ("unreadable-batch", digest(unreadable, consumer)),
        ("delivered", digest(other, consumer)),
        ("delivered", toolkit_id),
        ("refused-batch", digest(anonymous, "")),
    ]
    assert lowercase_ulid not in stored.decode()
    assert b"Siti" not in b"".join(store.get(key) for key in store.keys(""))
    # Every batch, the toolkit's UUID and the digests alike, is dropped when it comes again.
    assert (again["object"], again["records"], again["duplicate_batches"]) == (None, 0, 6)


def test_a_platform_batch_keeps_the_id_it_was_sent_with(
    handler: ModuleType,
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    written = handler.handler(amazon_mq(("router-batch-1", body("m1"))), None)

    (record,) = decode_object(S3ObjectStore(BUCKET, lambda: aws_audit["s3"]).get(written["object"]))
    assert record["batch"] == "router-batch-1"


def test_a_refused_batch_is_logged_and_counted_for_its_alarm(
    handler: ModuleType,
    aws_audit: dict[str, Any],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The broker confirmed the batch, so its consumer counted it stored; the writer said
    # nothing, and only the compliance report showed the copies undelivered.
    consumer = user_name(Stakeholder.COMMUNITY)
    document = json.loads(body(M1, event=AuditEvent.DELIVERED))
    document["records"][0]["notes"] = CHILD
    noted = json.dumps(document).encode()
    event = amazon_mq(
        (new_message_id(), noted),
        (new_message_id(), body(M2, event=AuditEvent.DELIVERED)),
        (new_message_id(), b"\xff"),
        user=consumer,
    )

    written = handler.handler(event, None)
    handler.handler(event, None)  # a redelivery is no second refusal

    assert written["refused"] == 2
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "_aws" in line]
    assert [(line["AuditBatchesRefused"], line["Environment"]) for line in lines] == [(2, "test")]
    (metric,) = lines[0]["_aws"]["CloudWatchMetrics"]
    assert metric["Namespace"] == "MessagingFabric"
    assert metric["Dimensions"] == [["Environment"]]
    warnings = [r.getMessage() for r in caplog.records if r.name == "fabric.audit_writer"]
    assert len(warnings) == 2
    assert f"from {consumer} written as refused-batch" in warnings[0]
    assert "recorded a field the fabric's consumer records do not have" in warnings[0]
    assert "written as unreadable-batch" in warnings[1]
    assert "Siti" not in " ".join(warnings)


@pytest.mark.parametrize(
    ("queue", "kept"),
    [
        ("arn:aws:sqs:ap-southeast-3:123456789012:fabric-test-emergency-media", True),
        ("arn:aws-us-gov:sqs:us-gov-west-1:123456789012:fabric-test-fallback-media-dlq", True),
        ("fabric-test-fallback-media", True),
        # Another environment's queue, a flow the fabric has not, free text in the partition.
        ("arn:aws:sqs:ap-southeast-3:123456789012:fabric-dev-fallback-media", False),
        ("arn:aws:sqs:ap-southeast-3:123456789012:fabric-test-siti-media", False),
        ("arn:aws-sitirahayu:sqs:ap-southeast-3:123456789012:fabric-test-fallback-media", False),
        ("arn:aws:sqs:ap-southeast-3:123456789012:siti-rahayu-media", False),
    ],
)
def test_a_consumers_sqs_queue_is_one_of_its_groups_fallback_queues_in_this_environment(
    handler: ModuleType,
    aws_audit: dict[str, Any],  # noqa: F811
    queue: str,
    kept: bool,
) -> None:
    document = json.loads(body(M1, event=AuditEvent.DELIVERED))
    document["records"][0]["queues"] = [queue]
    event = amazon_mq(
        (new_message_id(), json.dumps(document).encode()), user=user_name(Stakeholder.MEDIA)
    )

    written = handler.handler(event, None)

    (record,) = decode_object(S3ObjectStore(BUCKET, lambda: aws_audit["s3"]).get(written["object"]))
    assert record["event"] == ("delivered" if kept else "refused-batch")
