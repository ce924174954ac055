"""A copy the drain cannot hand on at the last receive SQS allows goes to its queue's DLQ next:
the trail says so (``dead-lettered``, with why), and only then."""

from __future__ import annotations

import json
import uuid

from fabric.adapters.memory import MemoryAuditSink, MemoryFallbackSource, MemoryTransport
from fabric.audit import AuditEvent, sha256_hex
from fabric.drain import FALLBACK_MAX_RECEIVES, Drainer, FallbackQueue
from fabric.ports import Failure, Received
from fabric.stakeholders import Stakeholder
from fabric.topology import queue_name

QUEUE = FallbackQueue(
    url="https://sqs.ap-southeast-3.amazonaws.com/111111111111/fabric-test-emergency-community",
    group=Stakeholder.COMMUNITY,
    emergency=True,
    max_receives=FALLBACK_MAX_RECEIVES,
)
SUB_DLQ = FallbackQueue(  # no redrive policy: SQS keeps what it holds
    url=f"{QUEUE.url}-sub-dlq", group=Stakeholder.COMMUNITY, emergency=True
)
CHILD = "Siti Rahayu, 7, Jalan Melati 12"  # stands for child data


def parked(receives: int, *, message_id: str | None = None) -> Received:
    identifier = message_id or str(uuid.uuid4())
    body = json.dumps(
        {"message_id": identifier, "topic": "donation.received", "payload": {"name": CHILD}}
    ).encode()
    return Received(
        f"handle-{uuid.uuid4()}", body, identifier, "donation.received", receives=receives
    )


def drain(
    queue: FallbackQueue, *items: Received, broker: MemoryTransport
) -> tuple[MemoryAuditSink, list[str]]:
    source, audit = MemoryFallbackSource(), MemoryAuditSink()
    source.send(queue.url, *items)
    report = Drainer(queues=[queue], source=source, broker=broker, audit=audit).drain()
    return audit, report.refused


def test_a_copy_the_broker_refuses_at_its_last_receive_is_audited_dead_lettered() -> None:
    last, earlier = parked(FALLBACK_MAX_RECEIVES), parked(FALLBACK_MAX_RECEIVES - 1)
    broker = MemoryTransport(fail_ids={last.message_id, earlier.message_id})

    audit, refused = drain(QUEUE, last, earlier, broker=broker)

    assert refused == [queue_name(Stakeholder.COMMUNITY, emergency=True)]
    [record] = audit.records  # the copy with receives left goes back to SQS, no record
    assert record.to_dict() == {
        "event": "dead-lettered",
        "at": record.to_dict()["at"],
        "message_id": last.message_id,
        "source": "drain",
        "topic": "donation.received",
        "body_sha256": sha256_hex(last.body),
        "reason": "drain-nacked",
        "attempt": FALLBACK_MAX_RECEIVES,
        "groups": ["community"],
        "queues": ["fabric-test-emergency-community"],  # SQS parks it in its -dlq
    }
    assert audit.bodies == {}  # never delivered: nothing to archive


def test_the_reason_names_the_failure_and_the_record_no_text_outside_the_fabrics_syntax() -> None:
    stalled = parked(FALLBACK_MAX_RECEIVES + 2, message_id=CHILD)  # SQS's count is approximate
    broker = MemoryTransport(failure=Failure.RETURNED)

    audit, _refused = drain(QUEUE, stalled, broker=broker)

    [record] = audit.records
    assert (record.event, record.reason, record.message_id) == (
        AuditEvent.DEAD_LETTERED,
        "drain-returned",
        None,
    )
    assert CHILD not in json.dumps(record.to_dict())


def test_a_copy_the_broker_took_at_its_last_receive_is_drained_not_dead_lettered() -> None:
    last = parked(FALLBACK_MAX_RECEIVES)

    audit, _refused = drain(QUEUE, last, broker=MemoryTransport())

    assert [(r.event, r.message_id) for r in audit.records] == [
        (AuditEvent.DRAINED, last.message_id)
    ]


def test_a_queue_without_a_redrive_policy_never_claims_a_dead_lettering() -> None:
    # A subscription's DLQ keeps its messages however often they are received.
    kept = parked(FALLBACK_MAX_RECEIVES * 3)

    audit, refused = drain(SUB_DLQ, kept, broker=MemoryTransport(fail_ids={kept.message_id}))

    assert refused == [queue_name(Stakeholder.COMMUNITY, emergency=True)]
    assert audit.records == []
