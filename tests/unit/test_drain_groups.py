"""One group's trouble never holds back another group's fallback messages: a work queue that
stalls (no confirm) is left for the run like a full one, the emergency queues are drained in
turn, and every copy the drain could not hand on is logged by id and failure."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryFallbackSource, MemoryTransport
from fabric.audit import sha256_hex
from fabric.drain import PROBE_ROUTING_KEY, Drainer, FallbackQueue
from fabric.ports import Failure, OutboundMessage, Outcome, Received
from fabric.stakeholders import Stakeholder
from fabric.topology import queue_name

GROUPS = (Stakeholder.GOVERNMENT, Stakeholder.COMMUNITY, Stakeholder.BUSINESS)
QUEUES = [
    FallbackQueue(url=f"{flow}-{group.value}", group=group, emergency=flow == "emergency")
    for flow in ("emergency", "fallback")
    for group in GROUPS
]
GOVERNMENT_EMERGENCY = queue_name(Stakeholder.GOVERNMENT, emergency=True)
COMMUNITY_EMERGENCY = queue_name(Stakeholder.COMMUNITY, emergency=True)
BUSINESS_EMERGENCY = queue_name(Stakeholder.BUSINESS, emergency=True)
COMMUNITY = queue_name(Stakeholder.COMMUNITY)
CHILD = "Siti Rahayu, 7, Jalan Melati 12"  # stands for child data
PAYLOAD = "Budi, 9, Jalan Kenanga 3"  # stands for child data in a payload


@dataclass
class Broker:
    """A memory broker that returns the drain's probes (no queue is bound to them), and gives
    ``stalled`` work queues' messages no confirm (``TIMEOUT``), as a quorum queue that lost its
    majority; ``down`` fails every publish, probes too, with that failure."""

    name: str = "memory"
    stalled: set[str] = field(default_factory=set)
    down: Failure | None = None
    inner: MemoryTransport = field(default_factory=MemoryTransport)
    probes: int = 0

    def publish(
        self,
        messages: Iterable[OutboundMessage],
        *,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        outcomes = []
        for message in messages:
            if self.down is not None:
                outcomes.append(Outcome(message.message_id, failure=self.down))
            elif message.redeliver_to == PROBE_ROUTING_KEY:
                self.probes += 1
                outcomes.append(Outcome(message.message_id, failure=Failure.RETURNED))
            elif message.redeliver_to in self.stalled:
                outcomes.append(Outcome(message.message_id, failure=Failure.TIMEOUT))
            else:
                outcomes.extend(self.inner.publish([message]))
        return outcomes

    def close(self) -> None:
        """Nothing to release."""

    def arrived(self) -> list[str | None]:
        """The work queue of each message stored, in order."""
        return [message.redeliver_to for message in self.inner.published]


def parked(count: int = 1, *, message_id: str | None = None) -> list[Received]:
    items = []
    for _ in range(count):
        identifier = message_id or str(uuid.uuid4())
        body = json.dumps(
            {"message_id": identifier, "topic": "donation.received", "payload": PAYLOAD}
        ).encode()
        items.append(Received(f"handle-{uuid.uuid4()}", body, identifier, "donation.received"))
    return items


def drainer(source: MemoryFallbackSource, broker: Broker) -> Drainer:
    return Drainer(
        queues=QUEUES,
        source=source,
        broker=broker,
        audit=MemoryAuditSink(),
        connect=lambda: broker.down is not Failure.UNAVAILABLE,
    )


def test_a_stalled_work_queue_is_left_for_the_run_and_the_other_groups_still_drain() -> None:
    # government's emergency quorum queue lost its majority: its confirms time out while the
    # broker takes everything else. Before, every run stopped there ("broker unavailable"), so
    # community's emergency and business's bulk waited in SQS as long as the stall lasted.
    source, broker = MemoryFallbackSource(), Broker(stalled={GOVERNMENT_EMERGENCY})
    source.send("emergency-government", *parked())
    source.send("emergency-community", *parked())
    source.send("fallback-community", *parked(3))

    report = drainer(source, broker).drain()

    assert (report.stopped, report.refused, report.left) == ("empty", [GOVERNMENT_EMERGENCY], 1)
    assert report.moved == {GOVERNMENT_EMERGENCY: 0, COMMUNITY_EMERGENCY: 1, COMMUNITY: 3}
    assert broker.arrived() == [COMMUNITY_EMERGENCY] + [COMMUNITY] * 3
    assert source.queues["emergency-community"] == source.queues["fallback-community"] == []
    # One batch of the stalled queue was received; the run took no second one to count a
    # receive against it, and the probes after its timeout found the broker taking publishes.
    assert [queue for queue, _wait in source.receives].count("emergency-government") == 1
    assert broker.probes == 4  # two before the run received anything, two after the timeout


def test_a_timeout_the_probes_meet_too_stops_the_run_before_another_receive() -> None:
    # The whole broker stalls (the probes after the timeout time out as well): every further
    # receive would only count against a message, towards its DLQ.
    source, broker = MemoryFallbackSource(), Broker(down=Failure.TIMEOUT)
    source.send("emergency-government", *parked())
    source.send("emergency-community", *parked())
    run = Drainer(queues=QUEUES, source=source, broker=broker, audit=MemoryAuditSink())

    report = run.drain()

    assert (report.stopped, report.total, report.refused) == ("broker unavailable", 0, [])
    assert source.receives == [("emergency-government", True)]
    assert source.queues["emergency-community"] != []


def test_a_second_work_queue_that_stalls_says_the_broker_does_and_stops_the_run() -> None:
    # The node's queue storage stalls (a WAL or disk stall): the probes, which go to no queue,
    # still pass, so each work queue would be left in turn, and every fallback queue's batch
    # would spend a receive each run, to be parked after ten runs though the broker may well
    # have stored it. Two work queues timing out in one run are the broker's stall.
    source = MemoryFallbackSource()
    broker = Broker(stalled={GOVERNMENT_EMERGENCY, COMMUNITY_EMERGENCY, BUSINESS_EMERGENCY})
    for queue in ("emergency-government", "emergency-community", "emergency-business"):
        source.send(queue, *parked())

    report = drainer(source, broker).drain()

    assert (report.stopped, report.total) == ("broker unavailable", 0)
    assert [queue for queue, _wait in source.receives] == [
        "emergency-government",
        "emergency-community",
    ]
    assert source.queues["emergency-business"] != []


def test_a_lost_connection_stops_the_run_at_once() -> None:
    source, broker = MemoryFallbackSource(), Broker()
    source.send("emergency-government", *parked())
    source.send("emergency-community", *parked())
    run = Drainer(queues=QUEUES, source=source, broker=broker, audit=MemoryAuditSink())
    broker.down = Failure.UNAVAILABLE

    report = run.drain()

    assert (report.stopped, report.total) == ("broker unavailable", 0)
    assert source.receives == [("emergency-government", True)]


def test_the_emergency_queues_are_drained_in_turn_so_one_groups_backlog_holds_no_other_back() -> (
    None
):
    # 10,005 government emergencies: drained one queue after the other, the run reached its
    # message limit in government's queue and community's one emergency waited a whole run.
    source, broker = MemoryFallbackSource(), Broker()
    source.send("emergency-government", *parked(10_005))
    source.send("emergency-community", *parked())
    source.send("emergency-business", *parked(25))

    report = drainer(source, broker).drain()

    assert report.stopped == "message limit"
    assert report.moved == {
        GOVERNMENT_EMERGENCY: 10_000 - 26,
        COMMUNITY_EMERGENCY: 1,
        BUSINESS_EMERGENCY: 25,
    }
    # One batch from each queue per pass: community's comes right after government's first.
    assert broker.arrived()[:12] == [GOVERNMENT_EMERGENCY] * 10 + [
        COMMUNITY_EMERGENCY,
        BUSINESS_EMERGENCY,
    ]


def test_the_bulk_still_follows_every_emergency() -> None:
    source, broker = MemoryFallbackSource(), Broker()
    source.send("fallback-government", *parked(5))
    source.send("emergency-business", *parked(15))
    source.send("emergency-government", *parked(12))

    report = drainer(source, broker).drain()

    assert (report.stopped, report.total) == ("empty", 32)
    arrived = broker.arrived()
    assert arrived[:27] == (
        [GOVERNMENT_EMERGENCY] * 10
        + [BUSINESS_EMERGENCY] * 10
        + [GOVERNMENT_EMERGENCY] * 2
        + [BUSINESS_EMERGENCY] * 5
    )
    assert arrived[27:] == [queue_name(Stakeholder.GOVERNMENT)] * 5


def test_the_bulk_queues_are_drained_in_turn_so_one_groups_backlog_holds_no_other_back() -> None:
    # 10,005 government donations: drained one queue after the other, the run reached its
    # message limit in government's queue and community's and business's waited a whole run.
    source, broker = MemoryFallbackSource(), Broker()
    source.send("fallback-government", *parked(10_005))
    source.send("fallback-community", *parked())
    source.send("fallback-business", *parked(25))

    report = drainer(source, broker).drain()

    assert report.stopped == "message limit"
    assert report.moved == {
        queue_name(Stakeholder.GOVERNMENT): 10_000 - 26,
        COMMUNITY: 1,
        queue_name(Stakeholder.BUSINESS): 25,
    }
    assert broker.arrived()[:12] == [queue_name(Stakeholder.GOVERNMENT)] * 10 + [
        COMMUNITY,
        queue_name(Stakeholder.BUSINESS),
    ]


def test_each_copy_not_moved_is_logged_with_its_id_and_failure_never_its_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, broker = MemoryFallbackSource(), Broker(stalled={GOVERNMENT_EMERGENCY})
    [timed_out] = parked()
    [nacked] = parked()
    [foreign] = parked(message_id=CHILD)  # an id a sender wrote into the body, not the fabric's
    broker.inner.fail_ids.update({nacked.message_id, CHILD})
    source.send("emergency-government", timed_out)
    source.send("emergency-community", nacked, foreign)

    with caplog.at_level(logging.WARNING, logger="fabric.drain"):
        report = drainer(source, broker).drain()

    assert report.refused == [GOVERNMENT_EMERGENCY, COMMUNITY_EMERGENCY]
    assert f"{timed_out.message_id} not moved to {GOVERNMENT_EMERGENCY} (timeout)" in caplog.text
    assert f"{nacked.message_id} not moved to {COMMUNITY_EMERGENCY} (nacked)" in caplog.text
    assert (
        f"sha256:{sha256_hex(foreign.body)} not moved to {COMMUNITY_EMERGENCY} (nacked)"
        in caplog.text
    )
    assert CHILD not in caplog.text
    assert PAYLOAD not in caplog.text
