"""What a ``redriven`` audit record may hold: the fabric's message ids, topics and reason codes
only. A group's user can park a message in its own DLQ with any id, type and reason header; the
redrive puts it back as it is, but none of that text reaches the seven-year trail."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.adapters.sqs_dlq import SQS_DEAD_LETTER_REASON
from fabric.audit import AuditRecord
from fabric.audit_writer import DEAD_LETTER_REASONS
from fabric.ports import DeadLetter
from fabric.redrive import RedrivePlan, Redriver
from tests.message_ids import msg_id
from tests.unit.test_redrive_runs import NOW, Clock, MemoryDeadLetterQueue, letter

CHILD = "Jane Doe"  # stands for child data: it must reach no audit record
BODY = b'{"case": "a body the trail keeps only as its SHA-256"}'


def redriven(*letters: DeadLetter) -> tuple[list[AuditRecord], MemoryDeadLetterQueue]:
    """Redrive ``letters``; the records written and the queue (``origin``: what went back)."""
    audit, queue = MemoryAuditSink(), MemoryDeadLetterQueue(list(letters))
    clock = Clock()
    report = Redriver(
        ledger=MemoryRedriveLedger(), audit=audit, clock=clock, sleep=clock.sleep, now=lambda: NOW
    ).run(queue)
    assert (report.moved, report.stopped) == (len(letters), "empty")
    return audit.records, queue


def test_a_letter_with_free_text_goes_back_as_it_is_and_its_record_holds_none_of_it() -> None:
    parked = dataclasses.replace(
        letter(1),
        message_id=f"{CHILD} lives at 12 Jalan Melati",
        topic=f"{CHILD}'s case note",
        reason=f"{CHILD} was hit by her father",
        body=BODY,
    )

    # The operator's dry-run listing shows the letter as it is, to find and judge it by.
    listed = MemoryDeadLetterQueue([parked])
    (shown,) = (
        Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink(), now=lambda: NOW)
        .run(listed, RedrivePlan(dry_run=True))
        .listed
    )
    assert (shown.message_id, shown.topic, shown.reason) == (
        parked.message_id,
        parked.topic,
        parked.reason,
    )

    (record,), queue = redriven(parked)

    (back,) = queue.origin
    assert (back.message_id, back.topic, back.body) == (parked.message_id, parked.topic, BODY)
    assert (record.message_id, record.topic, record.reason) == (None, None, "unknown")
    assert record.body_sha256 is not None  # still the record of that very body
    assert CHILD not in json.dumps(record.to_dict())


@pytest.mark.parametrize(
    ("given", "recorded"),
    [
        (msg_id("fine"), msg_id("fine")),
        (msg_id("fine").upper(), msg_id("fine")),  # as the router and the toolkit write it
        ("01arz3ndektsv4rrffq69g5fav", "01ARZ3NDEKTSV4RRFFQ69G5FAV"),
        ("01ARZ3NDEKTSV4RRFFQ69G5FAV", "01ARZ3NDEKTSV4RRFFQ69G5FAV"),
        ("00000000-0000-0000-0000-000000000000", None),  # the nil UUID is no message's id
        ("", None),  # a letter without an id (parked as no-message-id)
        ("m-1", None),
    ],
)
def test_a_redriven_record_holds_a_message_id_in_the_routers_form_or_none(
    given: str, recorded: str | None
) -> None:
    (record,), queue = redriven(dataclasses.replace(letter(1), message_id=given))
    assert record.message_id == recorded
    assert [item.message_id for item in queue.origin] == [given], "the letter goes back as is"


# Every reason the fabric itself gives a dead letter: the consumer toolkit's (spelled out, and
# its set, so a code added there is recorded too), RabbitMQ's x-death reasons (3.10 to 4.2),
# SQS's redrive policy, and a letter that says none.
FABRIC_REASONS = sorted(
    DEAD_LETTER_REASONS
    | {"max-attempts", "poison", "no-message-id", "malformed-headers", "max-receives"}
    | {"rejected", "expired", "maxlen", "delivery_limit"}
    | {SQS_DEAD_LETTER_REASON, "unknown"}
)


@pytest.mark.parametrize("reason", FABRIC_REASONS)
def test_every_reason_the_fabric_gives_a_dead_letter_is_recorded_as_it_is(reason: str) -> None:
    (record,), _ = redriven(letter(1, reason=reason))
    assert record.reason == reason


@pytest.mark.parametrize(
    ("topic", "recorded"),
    [("case.updated", "case.updated"), ("", None), ("case updated by Jane", None)],
)
def test_a_redriven_record_holds_a_topic_only_in_the_envelopes_syntax(
    topic: str, recorded: str | None
) -> None:
    (record,), _ = redriven(letter(1, topic=topic))
    assert record.topic == recorded


@pytest.mark.parametrize(
    ("origin", "hashed"),
    [
        # A producer's input, parked by the ingest queue: never stored, a restricted payload in
        # plaintext. A hash of it would let a reader of the trail confirm a guess at it.
        ("https://sqs.ap-southeast-3.amazonaws.com/1/fabric-prod-ingest-government", False),
        ("fabric-dev-ingest-media", False),
        # What the fabric stored: a fallback copy (the wire envelope, ciphertext for a
        # restricted payload), a RabbitMQ dead letter.
        ("https://sqs.ap-southeast-3.amazonaws.com/1/fabric-prod-emergency-government", True),
        ("fabric.government", True),
    ],
)
def test_a_redriven_record_hashes_only_a_body_the_fabric_stored(origin: str, hashed: bool) -> None:
    parked = dataclasses.replace(letter(1), origin=origin, body=BODY)
    (record,), _ = redriven(parked)
    assert record.body_sha256 == (hashlib.sha256(BODY).hexdigest() if hashed else None)
