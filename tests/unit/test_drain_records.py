"""The drain's ``drained`` records hold a message's id and topic only in the fabric's syntax: a
fallback message without the router's attributes gives them from its body, whatever its sender
wrote there, and the audit trail is locked for seven years."""

from __future__ import annotations

import json
from typing import Any

from fabric.adapters.memory import MemoryAuditSink, MemoryFallbackSource, MemoryTransport
from fabric.adapters.sqs import _received
from fabric.drain import Drainer, FallbackQueue
from fabric.envelope import new_message_id
from fabric.stakeholders import Stakeholder

QUEUE = FallbackQueue(url="fallback-community", group=Stakeholder.COMMUNITY, emergency=False)
CHILD = "Siti Rahayu, 7, Jalan Melati 12"  # stands for child data


def sqs_message(i: int, envelope: dict[str, Any]) -> dict[str, Any]:
    """An SQS message with no fabric attributes: the drain reads id and topic from the body."""
    return {
        "MessageId": f"sqs-{i}",
        "ReceiptHandle": f"h-{i}",
        "Body": json.dumps({"payload": {}, **envelope}),
        "MessageAttributes": {},
    }


def test_a_drained_record_holds_no_id_or_topic_outside_the_fabrics_syntax() -> None:
    uuid_id, ulid = new_message_id(), "01jdq3zp5g8y7k2m4n6r8t0v1w"
    source = MemoryFallbackSource()
    source.send(
        QUEUE.url,
        _received(sqs_message(0, {"message_id": CHILD, "topic": f"{CHILD}'s case"})),
        _received(sqs_message(1, {"message_id": uuid_id, "topic": "donation.pledge.received"})),
        _received(sqs_message(2, {"message_id": ulid, "topic": "donation.pledge.received"})),
    )
    broker, audit = MemoryTransport(), MemoryAuditSink()

    report = Drainer(queues=[QUEUE], source=source, broker=broker, audit=audit).drain()

    assert report.total == 3
    assert [(r.message_id, r.topic) for r in audit.records] == [
        (None, None),
        (uuid_id, "donation.pledge.received"),
        (ulid.upper(), "donation.pledge.received"),  # as the router and the toolkit write it
    ]
    assert CHILD not in json.dumps([r.to_dict() for r in audit.records])
    # The message itself moves as it is; only its record leaves the text out.
    assert [m.message_id for m in broker.published] == [CHILD, uuid_id, ulid]
