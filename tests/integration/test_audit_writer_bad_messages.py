"""The audit writer function on moto against consumer batches of every wrong shape: each one
becomes one stand-in record (``refused-batch``, ``unreadable-batch``) in place of its batch, the
event's other batches are written, and the function never fails the event for one message
(the event source would deliver it again and again, then move every batch in it to
``fabric.overflow``). A failure to store still fails the call: nothing is acknowledged unwritten.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import pytest

from fabric.adapters.audit_storage import S3ObjectStore
from fabric.audit_chain import decode_object
from fabric.envelope import new_message_id
from fabric.errors import TransportUnavailable
from fabric.stakeholders import Stakeholder
from fabric.topology import PLATFORM_USER, user_name
from tests.integration.test_audit_writer import BUCKET, aws_audit  # noqa: F401 (fixture)
from tests.integration.test_audit_writer_handler import (  # noqa: F401 (fixture)
    WRITER,
    body,
    handler,
    sqs,
    verified,
)

CONSUMER = user_name(Stakeholder.COMMUNITY)
HUGE = "x" * 100_000
# Every type a JSON value can have but text, and text of no field's format or size.
WRONG = [[], ["x"], {}, {"a": 1}, 7, 1.5, True, HUGE]
# The consumer toolkit's fields, and what each of them may be besides its own type.
FIELDS: dict[str, list[object]] = {
    "event": [*WRONG, None],
    "at": [*WRONG, None],
    "message_id": WRONG,
    "source": WRONG,
    "topic": WRONG,
    "body_sha256": WRONG,
    "reason": WRONG,
    "attempt": [[], ["1"], {}, {"a": 1}, 0, 10**30, 1.5, True, "1", HUGE],
    "queues": [{}, {"a": 1}, 7, 1.5, True, HUGE, [7], [None], [["fabric.community"]], [HUGE]],
    "groups": [{}, {"a": 1}, 7, 1.5, True, HUGE, [7], [None], [{"community": 1}], [HUGE]],
}
# Optional fields: left out (None) is no problem, the record is written.
OPTIONAL = {"message_id", "source", "topic", "body_sha256", "reason", "attempt", "queues", "groups"}


def record(kind: str, **fields: object) -> dict[str, object]:
    """A consumer record of event ``kind`` the writer takes, with ``fields`` changed."""
    return {
        "event": kind,
        "at": datetime.now(UTC).isoformat(),
        "message_id": new_message_id(),
        "source": "case-worker",
        "topic": "community.case.opened",
        "body_sha256": "a" * 64,
        "attempt": 1,
        "queues": ["fabric.community"],
        "groups": ["community"],
        **fields,
    }


def document(*records: dict[str, object], **fields: object) -> bytes:
    return json.dumps(
        {
            "version": "fabric.audit-batch/1",
            "emitted_by": "case-worker",
            "emitted_at": datetime.now(UTC).isoformat(),
            "records": list(records),
            **fields,
        }
    ).encode()


def message(batch_id: str, data: bytes, user: str = CONSUMER) -> dict[str, Any]:
    return {
        "basicProperties": {"messageId": batch_id, "userId": user},
        "redelivered": False,
        "data": base64.b64encode(data).decode(),
    }


def amazon_mq(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"eventSource": "aws:rmq", "rmqMessagesByQueue": {"fabric.audit::/": list(messages)}}


def written(aws: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The records the writer stored, by batch id."""
    store = S3ObjectStore(BUCKET, lambda: aws["s3"])
    by_batch: dict[str, list[dict[str, Any]]] = {}
    for key in store.keys(f"audit/{WRITER}/"):
        for stored in decode_object(store.get(key)):
            by_batch.setdefault(stored["batch"], []).append(stored)
    return by_batch


def test_the_consumer_records_the_fuzz_starts_from_are_written(
    handler: ModuleType,  # noqa: F811 (the fixture)
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    ids = {event: new_message_id() for event in ("delivered", "retried", "dead-lettered")}
    handler.handler(
        amazon_mq(*(message(ids[event], document(record(event))) for event in ids)), None
    )
    by_batch = written(aws_audit)
    assert {by_batch[ids[event]][0]["event"] for event in ids} == set(ids)


@pytest.mark.parametrize("field", FIELDS)
def test_a_consumer_record_with_a_field_of_the_wrong_type_is_refused_and_the_rest_written(
    handler: ModuleType,  # noqa: F811 (the fixture)
    aws_audit: dict[str, Any],  # noqa: F811
    field: str,
) -> None:
    # `"event": ["delivered"]` raised TypeError (a list in a set lookup): the whole event failed
    # and came back until the delivery limit moved the platform's batches too to the overflow.
    platform, good = new_message_id(), new_message_id()
    bad: dict[str, object] = {}  # batch id -> the value it carries
    messages = [message(platform, body("m1", "m2"), user=PLATFORM_USER)]
    for value in FIELDS[field]:
        for event in ("delivered", "retried", "dead-lettered"):
            bad[batch_id := new_message_id()] = value
            messages.append(message(batch_id, document(record(event, **{field: value}))))
    messages.append(message(good, document(record("delivered"))))

    answer = handler.handler(amazon_mq(*messages), None)

    by_batch = written(aws_audit)
    assert [r["message_id"] for r in by_batch[platform]] == ["m1", "m2"]
    assert [r["event"] for r in by_batch[good]] == ["delivered"]
    for batch_id, value in bad.items():
        (stored,) = by_batch[batch_id]
        if value is None and field in OPTIONAL:  # left out: the record is the consumer's
            assert stored["event"] != "refused-batch", stored
        else:
            assert stored["event"] == "refused-batch", (field, repr(value)[:40])
            assert stored["publisher"] == CONSUMER
            assert HUGE not in stored["reason"]
    assert answer["refused"] == sum(
        1 for value in bad.values() if value is not None or field not in OPTIONAL
    )
    handler.handler({"checkpoint": True}, None)
    result = verified(S3ObjectStore(BUCKET, lambda: aws_audit["s3"]), aws_audit["signer"])
    assert result.ok, result.problem


NOT_RECORDS: list[object] = [None, 7, "x", {}, [7], [[]], [None]]
NOT_BODIES: list[object] = [7, "x", [1]]
NOT_VERSIONS: list[object] = [None, 1, [], {}]


@pytest.mark.parametrize(
    "data",
    [document(record("delivered"), emitted_by=value) for value in [*WRONG, "bad name with spaces"]]
    + [document(records=value) for value in NOT_RECORDS]
    + [document(record("delivered"), bodies=value) for value in NOT_BODIES]
    + [document(record("delivered"), version=value) for value in NOT_VERSIONS],
)
def test_a_consumer_batch_document_of_the_wrong_shape_stands_in_for_itself(
    handler: ModuleType,  # noqa: F811 (the fixture)
    aws_audit: dict[str, Any],  # noqa: F811
    data: bytes,
) -> None:
    platform, bad = new_message_id(), new_message_id()
    answer = handler.handler(
        amazon_mq(
            message(platform, body("m1"), user=PLATFORM_USER),
            message(bad, data),
        ),
        None,
    )

    by_batch = written(aws_audit)
    assert [r["message_id"] for r in by_batch[platform]] == ["m1"]
    (stood_in,) = by_batch[bad]
    assert stood_in["event"] in ("refused-batch", "unreadable-batch")
    assert answer["refused"] == 1


def test_a_message_of_a_shape_nobody_foresaw_stands_in_for_itself_and_the_rest_is_written(
    handler: ModuleType,  # noqa: F811 (the fixture)
    aws_audit: dict[str, Any],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Whatever fails while one message is read (here: properties that are not an object, an
    # SQS attribute that is not one) is that message's stand-in, never the whole event's error.
    broken = message("x", body("m0"), user=PLATFORM_USER)
    broken["basicProperties"] = ["not", "properties"]
    caplog.set_level(logging.ERROR, logger="fabric.audit_writer")
    first = handler.handler(
        amazon_mq(message(new_message_id(), body("m1"), user=PLATFORM_USER), broken), None
    )
    event = sqs(("b2", body("m2")), ("b3", body("m3")))
    event["Records"][1]["messageAttributes"] = {"fabric-message-id": "not an attribute"}
    second = handler.handler(event, None)

    assert (first["records"], first["refused"]) == (2, 1)
    assert (second["records"], second["refused"]) == (2, 1)
    # The log says what failed and where (not the error's text, which may quote a consumer's).
    logged = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(logged) == 2
    assert all("AttributeError at audit_writer.py:" in line for line in logged)
    stored = [r for records in written(aws_audit).values() for r in records]
    assert sorted(r.get("message_id") or r["event"] for r in stored) == [
        "m1",
        "m2",
        "unreadable-batch",
        "unreadable-batch",
    ]
    handler.handler({"checkpoint": True}, None)
    result = verified(S3ObjectStore(BUCKET, lambda: aws_audit["s3"]), aws_audit["signer"])
    assert result.ok, result.problem


def test_an_unforeseen_failure_stands_in_with_the_hash_of_the_bytes_and_the_id_sent(
    handler: ModuleType,  # noqa: F811 (the fixture)
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # Its stand-in hashed the base64 text, not the bytes (the same bytes had another hash than
    # when a foreseen check failed), and dropped the id it was sent with (its sender could not
    # find its batch).
    data = b"not an audit batch"
    foreseen = message(new_message_id(), data)
    unforeseen = message(new_message_id(), data)
    unforeseen["basicProperties"] = ["not", "properties"]
    sent = new_message_id()
    kept, dropped = message(sent, b""), message("not a message id", b"")
    kept["data"] = dropped["data"] = 7  # not text: reading it fails unforeseen
    answer = handler.handler(amazon_mq(foreseen, unforeseen, kept, dropped), None)

    assert (answer["records"], answer["refused"]) == (4, 4)
    by_batch = written(aws_audit)
    digest = hashlib.sha256(data).hexdigest()
    (as_foreseen,) = by_batch[foreseen["basicProperties"]["messageId"]]
    # No user-id could be read: its id binds "" (as a JSON string) to the bytes (``_digest``).
    no_user = hashlib.sha256(b'""\n' + data).hexdigest()
    (as_unforeseen,) = by_batch[f"sha256-{no_user}"]
    assert as_foreseen["body_sha256"] == as_unforeseen["body_sha256"] == digest
    (stood_in,) = by_batch[sent]
    assert (stood_in["event"], stood_in["publisher"]) == ("unreadable-batch", CONSUMER)
    # A stakeholder user's id that is not a fabric message id is not kept, as for any batch.
    assert "not a message id" not in by_batch
    assert len(by_batch) == 4


def test_a_failure_to_store_still_fails_the_event(
    handler: ModuleType,  # noqa: F811 (the fixture)
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # The stand-ins are for what a message holds: the bucket being unreachable is the event
    # source's to retry, so no batch is acknowledged unwritten.
    aws_audit["s3"].delete_bucket(Bucket=BUCKET)  # empty yet: gone, every put fails
    with pytest.raises(TransportUnavailable):
        handler.handler(amazon_mq(message(new_message_id(), body("m1"), user=PLATFORM_USER)), None)


def test_a_platform_record_naming_its_body_by_something_not_a_hash_is_written(
    handler: ModuleType,  # noqa: F811 (the fixture)
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # The platform's records are not checked field by field; one whose body_sha256 was a list
    # failed the write of the whole event (a list in a set), again at every delivery.
    odd = json.loads(body("m1"))
    odd["records"][0]["body_sha256"] = ["not", "a", "hash"]
    answer = handler.handler(
        amazon_mq(
            message(new_message_id(), json.dumps(odd).encode(), user=PLATFORM_USER),
            message(new_message_id(), body("m2"), user=PLATFORM_USER),
        ),
        None,
    )

    assert answer["records"] == 2
    stored = [r for records in written(aws_audit).values() for r in records]
    assert sorted(r["message_id"] for r in stored) == ["m1", "m2"]
