"""The audit sink: one message per batch, split to fit a transport's size limit, never lossy."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from fabric.adapters.memory import MemoryTransport
from fabric.audit import (
    AuditEvent,
    AuditRecord,
    decode_audit_batch,
    encode_audit_batch,
    sha256_hex,
)
from fabric.audit_sink import TransportAuditSink
from fabric.jsoncodec import canonical_json
from fabric.ports import Failure, OutboundMessage, Outcome
from fabric.stakeholders import Stakeholder


@dataclass
class LimitedTransport(MemoryTransport):
    max_message_bytes: int = 4096


def accepted(i: int, body: bytes) -> AuditRecord:
    return AuditRecord(
        event=AuditEvent.ACCEPTED,
        at=datetime(2026, 12, 3, tzinfo=UTC),
        message_id=f"m-{i}",
        source="community",
        body_sha256=sha256_hex(body),
    )


def test_a_batch_is_one_message_where_there_is_no_limit() -> None:
    broker = MemoryTransport(name="rabbitmq")
    bodies = {sha256_hex(b"x" * i): b"x" * i for i in range(1, 40)}
    records = [accepted(i, b"x" * i) for i in range(1, 40)]
    assert TransportAuditSink([broker], emitted_by="router").emit(records, bodies)
    (message,) = broker.published
    batch = decode_audit_batch(message.body)
    assert [r["message_id"] for r in batch.records] == [f"m-{i}" for i in range(1, 40)]
    assert batch.bodies == bodies


def test_a_batch_too_big_for_the_limit_is_split_and_nothing_is_lost() -> None:
    broker = MemoryTransport(name="rabbitmq", failure=Failure.UNAVAILABLE)
    sqs = LimitedTransport(name="sqs-audit")
    payloads = [bytes([i]) * 700 for i in range(30)]
    records = [accepted(i, body) for i, body in enumerate(payloads)]
    big = b"B" * 10_000  # cannot fit a 4 KiB message even alone
    records.append(accepted(99, big))
    bodies = {sha256_hex(b): b for b in [*payloads, big]}

    assert TransportAuditSink([broker, sqs], emitted_by="router").emit(records, bodies)

    assert len(sqs.published) > 1
    assert all(len(m.body) <= sqs.max_message_bytes for m in sqs.published)
    batches = [decode_audit_batch(m.body) for m in sqs.published]
    got = [r for b in batches for r in b.records]
    assert [r["message_id"] for r in got] == [r.message_id for r in records]
    archived = {k: v for b in batches for k, v in b.bodies.items()}
    assert archived == {sha256_hex(b): b for b in payloads}
    assert got[-1]["archived"] is False  # said, not silently dropped
    assert len({m.message_id for m in sqs.published}) == len(sqs.published)


def test_false_when_no_transport_stores_the_batch() -> None:
    down = MemoryTransport(failure=Failure.UNAVAILABLE)
    sink = TransportAuditSink([down, LimitedTransport(failure=Failure.UNAVAILABLE)], emitted_by="x")
    assert not sink.emit([accepted(1, b"a")], {sha256_hex(b"a"): b"a"})


@dataclass
class TimingOut(MemoryTransport):
    """Stores what it is given but reports a timeout: its fate unknown to the sender."""

    tried: list[str] | None = None

    def publish(self, messages: Iterable[OutboundMessage]) -> list[Outcome]:
        batch = list(messages)
        self.tried = [m.message_id for m in batch]
        return [Outcome(m.message_id, failure=Failure.TIMEOUT) for m in batch]


def test_a_part_keeps_its_batch_id_on_the_next_path_so_the_writer_drops_the_copy() -> None:
    broker = TimingOut(name="rabbitmq")
    sqs = LimitedTransport(name="sqs-audit")
    payloads = [bytes([i]) * 700 for i in range(30)]
    records = [accepted(i, body) for i, body in enumerate(payloads)]

    sink = TransportAuditSink([broker, sqs], emitted_by="router")
    assert sink.emit(records, {sha256_hex(b): b for b in payloads})

    # Split once, for the smaller limit: the same parts, the same ids, on both paths.
    assert broker.tried == [m.message_id for m in sqs.published]
    assert len(sqs.published) > 1


def test_a_batch_is_the_canonical_json_of_its_document_whatever_it_holds() -> None:
    one = b'{"payload":"\xc3\xbc"}'
    shapes = [
        ([], {}),
        ([accepted(1, one)], {}),
        ([accepted(1, one)], {sha256_hex(one): one}),
        (
            [accepted(i, bytes([i])) for i in range(5)],
            {sha256_hex(bytes([i])): bytes([i]) for i in range(5)},
        ),
    ]
    for records, bodies in shapes:
        body = encode_audit_batch(records, emitted_by="router", bodies=bodies)
        document = json.loads(body)
        assert canonical_json(document) == body
        assert document["records"] == [r.to_dict() for r in records]
        assert decode_audit_batch(body).bodies == bodies


def test_a_batch_prepared_from_the_same_records_is_sent_as_it_was_prepared() -> None:
    broker = MemoryTransport(name="rabbitmq")
    sink = TransportAuditSink([broker], emitted_by="router")
    records = [accepted(i, bytes([i])) for i in range(3)]
    bodies = {sha256_hex(bytes([i])): bytes([i]) for i in range(3)}
    prepared = sink.prepare(records, bodies)

    assert sink.emit(records, dict(bodies), prepared=prepared)

    assert broker.published == list(prepared.encoded)  # not encoded a second time
    assert [r["message_id"] for r in decode_audit_batch(broker.published[0].body).records] == [
        "m-0",
        "m-1",
        "m-2",
    ]


def test_a_batch_prepared_from_other_records_is_not_sent() -> None:
    broker = MemoryTransport(name="rabbitmq")
    sink = TransportAuditSink([broker], emitted_by="router")
    records = [accepted(i, bytes([i])) for i in range(3)]
    bodies = {sha256_hex(bytes([i])): bytes([i]) for i in range(3)}
    stale = [
        sink.prepare(records[:2], bodies),  # a record fewer
        sink.prepare([*records[:2], accepted(2, bytes([2]))], bodies),  # an equal copy of one
        sink.prepare(records, {**bodies, sha256_hex(b"x"): b"x"}),  # a body more
    ]
    for prepared in stale:
        broker.published.clear()
        assert sink.emit(records, bodies, prepared=prepared)
        (message,) = broker.published
        assert message not in prepared.encoded
        batch = decode_audit_batch(message.body)
        assert [r["message_id"] for r in batch.records] == ["m-0", "m-1", "m-2"]
        assert batch.bodies == bodies


def test_a_sink_named_so_the_writer_would_refuse_its_batches_is_not_built() -> None:
    # A consumer's sink named "community case sync" sent every batch, the broker confirmed each
    # (so emit said stored), and the audit writer refused them all: the group's deliveries were
    # missing from the trail and nobody was told.
    for name in ("community case sync", "", "c" * 65, "Siti's desk", "caf\u00e9"):
        with pytest.raises(ValueError, match="emitted_by"):
            TransportAuditSink([MemoryTransport()], emitted_by=name)
    platform = ("router", "drain", "redrive", "replay", "bench")
    consumers = tuple(f"consumer:{group.value}" for group in Stakeholder)
    for name in (*platform, *consumers, "community-case-sync", "c" * 64):
        TransportAuditSink([MemoryTransport()], emitted_by=name)
