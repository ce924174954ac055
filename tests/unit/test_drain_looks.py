"""The drain, busy with bulk, looks into the emergency queues again about once a second."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fabric.adapters.memory import MemoryAuditSink, MemoryFallbackSource, MemoryTransport
from fabric.drain import RECHECK_SECONDS, Drainer, FallbackQueue
from fabric.ports import OutboundMessage, Outcome, Received
from fabric.stakeholders import Stakeholder
from fabric.topology import queue_name

BULK = FallbackQueue(url="fallback-media", group=Stakeholder.MEDIA, emergency=False)
EMERGENCY = FallbackQueue(url="emergency-government", group=Stakeholder.GOVERNMENT, emergency=True)
EMERGENCY_SUB_DLQ = FallbackQueue(
    url="emergency-government-sub-dlq", group=Stakeholder.GOVERNMENT, emergency=True
)
MEDIA = queue_name(Stakeholder.MEDIA)
GOVERNMENT_EMERGENCY = queue_name(Stakeholder.GOVERNMENT, emergency=True)
BATCH_SECONDS = 0.25  # what one batch of ten takes the broker here


@dataclass
class Clock:
    """Time that moves only when told; ``at(t, action)`` runs ``action`` once ``t`` is reached."""

    now: float = 0.0
    due: list[tuple[float, Callable[[], None]]] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def at(self, when: float, action: Callable[[], None]) -> None:
        self.due.append((when, action))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for entry in [entry for entry in self.due if entry[0] <= self.now]:
            self.due.remove(entry)
            entry[1]()


@dataclass
class TimedBroker:
    """A memory broker whose every publish takes ``BATCH_SECONDS``; ``at`` notes when each
    message was confirmed."""

    clock: Clock
    name: str = "memory"
    inner: MemoryTransport = field(default_factory=MemoryTransport)
    at: dict[str, float] = field(default_factory=dict)

    def publish(
        self,
        messages: Iterable[OutboundMessage],
        *,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        batch = list(messages)
        self.clock.advance(BATCH_SECONDS)
        outcomes = self.inner.publish(batch, meanwhile=meanwhile)
        self.at.update((o.message_id, self.clock.now) for o in outcomes if o.stored)
        return outcomes

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class TimedSource(MemoryFallbackSource):
    """Notes the clock at each receive, in ``times``, beside ``receives``."""

    clock: Clock = field(default_factory=Clock)
    times: list[float] = field(default_factory=list)

    def receive(self, queue: str, limit: int, *, wait: bool = True) -> list[Received]:
        self.times.append(self.clock.now)
        return super().receive(queue, limit, wait=wait)


def parked(count: int = 1) -> list[Received]:
    items = []
    for _ in range(count):
        message_id = str(uuid.uuid4())
        body = json.dumps({"message_id": message_id, "topic": "donation.received"}).encode()
        items.append(Received(f"handle-{message_id}", body, message_id, "donation.received"))
    return items


def drainer(
    clock: Clock,
    source: MemoryFallbackSource,
    broker: TimedBroker,
    queues: list[FallbackQueue],
    *,
    audit: MemoryAuditSink | None = None,
    max_seconds: float = 240.0,
) -> Drainer:
    return Drainer(
        queues=queues,
        source=source,
        broker=broker,
        audit=audit or MemoryAuditSink(),
        max_seconds=max_seconds,
        clock=clock,
    )


def test_an_emergency_that_arrives_during_the_bulk_is_moved_within_a_second_not_next_run() -> None:
    clock = Clock()
    source, broker, audit = TimedSource(clock=clock), TimedBroker(clock), MemoryAuditSink()
    source.send(BULK.url, *parked(100))  # ten batches: 2.5 s of bulk
    [alert] = parked()
    clock.at(0.6, lambda: source.send(EMERGENCY.url, alert))

    report = drainer(
        clock, source, broker, [BULK, EMERGENCY, EMERGENCY_SUB_DLQ], audit=audit
    ).drain()

    assert (report.stopped, report.moved, report.left) == (
        "empty",
        {MEDIA: 100, GOVERNMENT_EMERGENCY: 1},
        0,
    )
    waited = broker.at[alert.message_id] - 0.6
    assert waited <= RECHECK_SECONDS + BATCH_SECONDS  # the look is due, then one bulk batch
    assert max(broker.at.values()) > broker.at[alert.message_id]  # bulk still to go then
    assert [m.redeliver_to for m in broker.inner.published if m.message_id == alert.message_id] == [
        GOVERNMENT_EMERGENCY
    ]
    assert alert.message_id in {r.message_id for r in audit.records}  # its drained record
    assert source.queues[EMERGENCY.url] == []
    assert source.delete(EMERGENCY.url, [alert.handle]) == set()  # deleted already


def test_the_emergency_queues_are_looked_at_without_waiting_at_most_once_a_second() -> None:
    # Each look is one quick receive per emergency queue: never a long poll (a second each).
    clock = Clock()
    source, broker = TimedSource(clock=clock), TimedBroker(clock)
    source.send(BULK.url, *parked(100))

    report = drainer(clock, source, broker, [BULK, EMERGENCY, EMERGENCY_SUB_DLQ]).drain()

    assert (report.stopped, report.total) == ("empty", 100)
    looks = [
        (when, queue)
        for when, (queue, wait) in zip(source.times, source.receives, strict=True)
        if not wait
    ]
    assert looks == [
        (1.0, EMERGENCY.url),
        (1.0, EMERGENCY_SUB_DLQ.url),
        (2.0, EMERGENCY.url),
        (2.0, EMERGENCY_SUB_DLQ.url),
    ]
    assert {queue for queue, wait in source.receives if wait} == {
        BULK.url,
        EMERGENCY.url,
        EMERGENCY_SUB_DLQ.url,
    }


def test_a_run_without_emergency_queues_receives_from_its_bulk_queue_only() -> None:
    clock = Clock()
    source, broker = TimedSource(clock=clock), TimedBroker(clock)
    source.send(BULK.url, *parked(100))

    report = drainer(clock, source, broker, [BULK]).drain()

    assert (report.stopped, report.total) == ("empty", 100)
    assert source.receives == [(BULK.url, True)] * 11  # ten batches, then empty


def test_what_the_look_moves_counts_towards_the_message_limit() -> None:
    clock = Clock()
    source, broker = TimedSource(clock=clock), TimedBroker(clock)
    source.send(BULK.url, *parked(100))
    [alert] = parked()
    clock.at(0.6, lambda: source.send(EMERGENCY.url, alert))

    report = drainer(clock, source, broker, [BULK, EMERGENCY]).drain(max_messages=45)

    assert (report.stopped, report.moved) == ("message limit", {MEDIA: 44, GOVERNMENT_EMERGENCY: 1})
    assert len(broker.inner.published) == 45
    assert len(source.queues[BULK.url]) == 56


def test_a_look_stops_at_the_time_limit_with_what_it_moved_counted() -> None:
    clock = Clock()
    source, broker = TimedSource(clock=clock), TimedBroker(clock)
    source.send(BULK.url, *parked(100))
    [alert] = parked()
    clock.at(1.5, lambda: source.send(EMERGENCY.url, alert))

    report = drainer(clock, source, broker, [BULK, EMERGENCY], max_seconds=2.1).drain()

    # The look at 2.0 s moves the emergency (confirmed at 2.25 s); the run is then out of time.
    assert (report.stopped, report.moved) == ("time limit", {MEDIA: 80, GOVERNMENT_EMERGENCY: 1})
    assert broker.at[alert.message_id] == 2.25
    assert source.times[-1] < 2.1  # nothing received past the limit


def test_an_emergency_work_queue_that_refused_is_not_looked_at_again_in_the_run() -> None:
    # Its fallback queue and subscription DLQ drain into the same full work queue: each further
    # receive would only count against the message, towards its DLQ.
    clock = Clock()
    source, broker = TimedSource(clock=clock), TimedBroker(clock)
    source.send(BULK.url, *parked(100))
    [alert] = parked()
    broker.inner.fail_ids.add(alert.message_id)  # refused: the work queue is full
    clock.at(0.6, lambda: source.send(EMERGENCY.url, alert))

    report = drainer(clock, source, broker, [BULK, EMERGENCY, EMERGENCY_SUB_DLQ]).drain()

    assert (report.stopped, report.moved, report.refused, report.left) == (
        "empty",
        {MEDIA: 100, GOVERNMENT_EMERGENCY: 0},
        [GOVERNMENT_EMERGENCY],
        1,
    )
    assert [queue for queue, wait in source.receives if not wait] == [EMERGENCY.url]


def test_a_slow_emergency_backlog_holds_the_next_groups_emergency_back_one_batch_not_all() -> None:
    # Each batch takes the broker BATCH_SECONDS. Drained one queue to its end after the other,
    # community's one emergency waited for all of government's: 25 batches, 6.25 s here, and
    # with a backlog of thousands (or a work queue slower than this) for whole runs.
    clock = Clock()
    source, broker = TimedSource(clock=clock), TimedBroker(clock)
    community = FallbackQueue(
        url="emergency-community", group=Stakeholder.COMMUNITY, emergency=True
    )
    source.send(EMERGENCY.url, *parked(250))
    [alert] = parked()
    source.send(community.url, alert)

    report = drainer(clock, source, broker, [EMERGENCY, community]).drain()

    assert (report.stopped, report.total) == ("empty", 251)
    assert broker.at[alert.message_id] == 2 * BATCH_SECONDS  # right after government's first
