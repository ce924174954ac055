"""The circuit breaker: fail fast during an outage, probe, close again when the broker is back;
and where one queue stopped confirming, fail fast only for the messages that wait on it alone."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator

import pytest

from fabric.adapters.memory import MemoryTransport
from fabric.adapters.memory_cipher import LocalCipher
from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.audit_sink import AUDIT_TOPIC, TransportAuditSink
from fabric.bootstrap import exchange_for
from fabric.breaker import EVERYTHING, BreakerTransport, State
from fabric.envelope import JsonValue
from fabric.ports import Failure, MessageKind, OutboundMessage, Outcome
from fabric.router import Router
from fabric.routing import default_routing_table
from fabric.stakeholders import STAKEHOLDERS, Stakeholder
from fabric.topology import AUDIT_QUEUE, UNROUTED_QUEUE, queue_name
from tests.silent_endpoint import silent_endpoint

GOVERNMENT, COMMUNITY, BUSINESS, MEDIA = (
    Stakeholder.GOVERNMENT,
    Stakeholder.COMMUNITY,
    Stakeholder.BUSINESS,
    Stakeholder.MEDIA,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def msg(n: int) -> OutboundMessage:
    return OutboundMessage(f"m{n}", "t.x", b"{}", frozenset())


def to(*groups: Stakeholder, emergency: bool = False) -> OutboundMessage:
    """A message routed to ``groups`` (their emergency queues with ``emergency``), with an id of
    its own."""
    return OutboundMessage(str(uuid.uuid4()), "t.x", b"{}", frozenset(groups), emergency=emergency)


def q(group: Stakeholder, *, emergency: bool = False) -> str:
    return queue_name(group, emergency=emergency)


def audit_batch() -> OutboundMessage:
    return OutboundMessage(
        str(uuid.uuid4()), AUDIT_TOPIC, b"{}", frozenset(), kind=MessageKind.AUDIT
    )


class Broker:
    """A broker on which some queues stopped confirming (a quorum queue without its majority):
    a message that reaches a queue in ``stuck`` (``AUDIT_QUEUE`` for an audit batch) times out,
    every other one is stored. ``down`` makes every message ``UNAVAILABLE``; ``silent`` times
    every message out (a broker that takes publishes and confirms nothing). ``calls`` holds the
    message ids of each call that reached it."""

    name = "rabbitmq"

    def __init__(self, *stuck: str) -> None:
        self.stuck = set(stuck)
        self.down = False
        self.silent = False
        self.calls: list[list[str]] = []

    def publish(
        self, messages: Iterable[OutboundMessage], *, meanwhile: Callable[[], None] | None = None
    ) -> list[Outcome]:
        taken = list(messages)
        self.calls.append([m.message_id for m in taken])
        if meanwhile is not None:
            meanwhile()
        return [self._outcome(m) for m in taken]

    def _outcome(self, message: OutboundMessage) -> Outcome:
        if self.down:
            return Outcome(message.message_id, failure=Failure.UNAVAILABLE)
        if message.kind is MessageKind.AUDIT:
            queues = {AUDIT_QUEUE}
        else:
            queues = {q(g, emergency=message.emergency) for g in message.audience} or {
                UNROUTED_QUEUE
            }
        if self.silent or queues & self.stuck:
            return Outcome(message.message_id, failure=Failure.TIMEOUT)
        return Outcome(message.message_id, transport=self.name)

    def close(self) -> None:
        """Nothing to release."""

    def reached(self, message: OutboundMessage) -> bool:
        """Whether ``message`` was published to this broker."""
        return any(message.message_id in call for call in self.calls)


def state_of(breaker: BreakerTransport) -> State:
    """The breaker's state now (a call, so that type narrowing does not carry across calls)."""
    return breaker.state


def ids(*messages: OutboundMessage) -> list[str]:
    return [m.message_id for m in messages]


# --- the whole circuit: the broker cannot be used ----------------------------------------------


def test_after_an_outage_calls_fail_fast_without_touching_the_broker() -> None:
    broker, clock = MemoryTransport(failure=Failure.UNAVAILABLE), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    assert breaker.publish([msg(1)])[0].failure is Failure.UNAVAILABLE
    assert breaker.state is State.OPEN
    broker.failure = None  # it would work now, but the breaker does not ask it yet
    assert breaker.publish([msg(2)])[0].failure is Failure.UNAVAILABLE
    assert broker.published == []


def test_a_successful_probe_closes_the_circuit() -> None:
    broker, clock = MemoryTransport(failure=Failure.UNAVAILABLE), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    breaker.publish([msg(1)])
    broker.failure = None
    clock.now += 5
    assert breaker.state is State.HALF_OPEN
    assert breaker.publish([msg(2)])[0].stored
    assert state_of(breaker) is State.CLOSED
    assert [m.message_id for m in broker.published] == ["m2"]


def test_a_failed_probe_keeps_it_open_for_another_period() -> None:
    broker, clock = MemoryTransport(failure=Failure.UNAVAILABLE), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    breaker.publish([msg(1)])
    clock.now += 5
    breaker.publish([msg(2)])
    clock.now += 4
    assert breaker.state is State.OPEN


def test_a_nacked_message_does_not_open_the_circuit() -> None:
    broker = MemoryTransport(fail_ids={"m1"})
    breaker = BreakerTransport(broker, open_seconds=5, clock=Clock())
    assert breaker.publish([msg(1)])[0].failure is Failure.NACKED
    assert breaker.state is State.CLOSED


def test_the_callers_meanwhile_reaches_the_broker_only_when_the_broker_is_asked() -> None:
    broker, clock = MemoryTransport(), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    calls: list[str] = []
    assert breaker.publish([msg(1)], meanwhile=lambda: calls.append("closed"))[0].stored
    broker.failure = Failure.TIMEOUT
    breaker.publish([msg(2)], meanwhile=lambda: calls.append("failing"))
    breaker.publish([msg(3)], meanwhile=lambda: calls.append("open"))  # fails fast: no wait
    assert calls == ["closed", "failing"]


def test_an_unavailable_message_opens_the_circuit_for_every_target_even_beside_stored_ones() -> (
    None
):
    broker, clock = Broker(), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    broker.down = True
    assert breaker.publish([to(MEDIA)])[0].failure is Failure.UNAVAILABLE
    broker.down = False  # well again, but not asked for the next 5 s
    later = [to(GOVERNMENT, COMMUNITY), to(BUSINESS), msg(1), audit_batch()]
    assert [o.failure for o in breaker.publish(later)] == [Failure.UNAVAILABLE] * 4
    assert len(broker.calls) == 1
    assert breaker.state_for(EVERYTHING) is State.OPEN


def test_a_probe_that_stores_nothing_keeps_the_circuit_open_for_another_period() -> None:
    # After an outage the broker takes connections again but confirms nothing: the probe's
    # timeout is no sign of health, and every call would pay it again.
    broker, clock = Broker(), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    broker.down = True
    breaker.publish([to(GOVERNMENT)])
    broker.down, broker.silent = False, True
    clock.now += 5
    assert breaker.publish([to(BUSINESS)])[0].failure is Failure.TIMEOUT  # the probe
    assert breaker.state_for(EVERYTHING) is State.OPEN
    assert breaker.publish([to(COMMUNITY)])[0].failure is Failure.UNAVAILABLE
    assert len(broker.calls) == 2


def test_a_broker_that_confirms_nothing_opens_everything_at_its_second_stuck_queue() -> None:
    # A stall of the node's queue storage: every queue times out. Single-message calls every
    # 0.25 s, one group after another, each with its audit batch, for 20 s: two confirm
    # timeouts, then one probe every 5 s, not one per queue.
    broker, clock = Broker(), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    broker.silent = True
    reached_at: list[float] = []
    for tick in range(80):
        clock.now = 100 + tick * 0.25
        message = to(STAKEHOLDERS[tick % len(STAKEHOLDERS)])
        calls = len(broker.calls)
        assert not breaker.publish([message])[0].stored
        breaker.publish([audit_batch()])
        if len(broker.calls) > calls:
            reached_at.append(clock.now)
        if tick == 1:
            assert breaker.state_for(EVERYTHING) is State.OPEN
    assert reached_at == [100, 100.25, 105.25, 110.25, 115.25]
    assert len(broker.calls) == 5  # no audit batch waited either
    # The broker confirms again: the next probe closes everything.
    broker.silent = False
    clock.now = 120.25
    assert breaker.publish([to(MEDIA)])[0].stored
    assert breaker.state_for(EVERYTHING) is State.CLOSED
    assert breaker.publish([to(GOVERNMENT, BUSINESS)])[0].stored  # half-open: probes and closes
    assert breaker.publish([audit_batch()])[0].stored


def test_two_stuck_queues_with_a_store_between_leave_the_other_queues_on_the_broker() -> None:
    broker, clock = Broker(q(MEDIA), q(BUSINESS)), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    assert breaker.publish([to(MEDIA)])[0].failure is Failure.TIMEOUT
    assert breaker.publish([to(GOVERNMENT)])[0].stored  # the broker works
    assert breaker.publish([to(BUSINESS)])[0].failure is Failure.TIMEOUT
    assert breaker.state_for(EVERYTHING) is State.CLOSED
    assert breaker.publish([to(COMMUNITY)])[0].stored


def test_a_timeout_the_open_queue_explains_is_no_second_stuck_queue() -> None:
    # A quiet moment: nothing stored lately. The public alert waits on media's queue, open
    # already, as well: its timeout says nothing about the others, nor about the broker.
    broker, clock = Broker(q(MEDIA)), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    assert breaker.publish([to(MEDIA)])[0].failure is Failure.TIMEOUT
    assert breaker.publish([to(*STAKEHOLDERS)])[0].failure is Failure.TIMEOUT
    assert breaker.state_for(EVERYTHING) is State.CLOSED
    assert breaker.publish([msg(1)])[0].stored


# --- one queue that stopped confirming ----------------------------------------------------------


def test_a_single_message_call_to_a_stuck_queue_leaves_the_other_queues_on_the_broker() -> None:
    # Single-message calls are normal for emergencies: the call has no stored message beside
    # the one that timed out, and it used to open the circuit for every group.
    broker, clock = Broker(q(MEDIA)), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    assert breaker.publish([to(MEDIA)])[0].failure is Failure.TIMEOUT
    assert breaker.state_for(q(MEDIA)) is State.OPEN

    alert = to(GOVERNMENT, COMMUNITY)
    assert breaker.publish([alert])[0].transport == "rabbitmq"  # other groups: still the broker
    media = to(MEDIA)
    assert breaker.publish([media])[0].failure is Failure.UNAVAILABLE
    assert not broker.reached(media)  # it did not wait on the broker
    assert breaker.state_for(q(GOVERNMENT)) is State.CLOSED


def test_a_stuck_work_queue_keeps_the_same_groups_emergencies_on_the_broker() -> None:
    # fabric.government stopped confirming; fabric.government.emergency is well.
    broker, clock = Broker(q(GOVERNMENT)), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    assert breaker.publish([to(GOVERNMENT)])[0].failure is Failure.TIMEOUT  # a case update
    for _ in range(3):
        clock.now += 1
        incident = to(GOVERNMENT, COMMUNITY, emergency=True)
        assert breaker.publish([incident])[0].transport == "rabbitmq"
    assert breaker.state_for(q(GOVERNMENT)) is State.OPEN
    update = to(GOVERNMENT)
    assert breaker.publish([update])[0].failure is Failure.UNAVAILABLE
    assert not broker.reached(update)


def test_a_stuck_queue_does_not_open_the_other_queue_of_a_shared_message() -> None:
    # fabric.community.emergency stopped confirming. Government's emergencies, one a call every
    # 0.25 s, and a child-safety incident (government and community) every 3 s: each incident
    # times out, and used to send government's own emergencies to SNS too.
    broker, clock = Broker(q(COMMUNITY, emergency=True)), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    incidents: list[OutboundMessage] = []
    for tick in range(120):
        clock.now = 100 + tick * 0.25
        if tick % 12 == 1:
            incidents.append(to(GOVERNMENT, COMMUNITY, emergency=True))
            assert breaker.publish(incidents[-1:])[0].failure is Failure.TIMEOUT
        else:
            assert breaker.publish([to(GOVERNMENT, emergency=True)])[0].transport == "rabbitmq"
    assert all(broker.reached(incident) for incident in incidents)  # government got them all
    assert breaker.state_for(q(GOVERNMENT, emergency=True)) is State.CLOSED
    # Which of its two queues held an incident up, its timeout does not say: a message for
    # community's queue alone does.
    assert breaker.publish([to(COMMUNITY, emergency=True)])[0].failure is Failure.TIMEOUT
    assert breaker.publish([to(COMMUNITY, emergency=True)])[0].failure is Failure.UNAVAILABLE
    assert breaker.state_for(q(GOVERNMENT, emergency=True)) is State.CLOSED


def test_a_public_alert_reaches_the_broker_while_one_groups_queue_is_stuck() -> None:
    # The all-groups alert goes to RabbitMQ (the healthy groups get it at once) and, on its
    # confirm timeout, to the fallback too (media gets it from there); media's own messages
    # fail fast.
    broker, clock = Broker(q(MEDIA)), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    others = [to(group) for group in STAKEHOLDERS if group is not MEDIA]
    assert all(o.stored for o in breaker.publish(others))  # the usual traffic
    clock.now += 0.5
    assert breaker.publish([to(MEDIA)])[0].failure is Failure.TIMEOUT
    for _ in range(3):
        clock.now += 1
        alert = to(*STAKEHOLDERS)
        assert breaker.publish([alert])[0].failure is Failure.TIMEOUT
        assert broker.reached(alert)
        media = to(MEDIA)
        assert breaker.publish([media])[0].failure is Failure.UNAVAILABLE
        assert not broker.reached(media)
    assert {breaker.state_for(q(group)) for group in STAKEHOLDERS if group is not MEDIA} == {
        State.CLOSED
    }


def test_a_batched_public_alert_reaches_the_broker_while_one_groups_queue_is_stuck() -> None:
    # Before the breaker kept queues apart, a call that stored anything published its alert
    # to RabbitMQ; it must still.
    broker, clock = Broker(q(MEDIA)), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    for call in range(20):
        clock.now = 100 + call * 0.5
        groups = [to(group) for group in STAKEHOLDERS if group is not MEDIA]
        media, alert = to(MEDIA), to(*STAKEHOLDERS)
        outcomes = breaker.publish([*groups, media, alert])
        assert [o.transport for o in outcomes[:4]] == ["rabbitmq"] * 4
        assert broker.reached(alert)
        assert broker.reached(media) is (call in (0, 10))  # then its probe, 5 s on
    assert breaker.state_for(q(MEDIA)) is State.OPEN


def test_messages_for_open_and_closed_targets_in_one_call_keep_their_order() -> None:
    broker, clock = Broker(q(MEDIA)), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    breaker.publish([to(MEDIA)])
    messages = [to(GOVERNMENT), to(MEDIA), to(COMMUNITY), to(MEDIA, BUSINESS), to(BUSINESS)]
    taken: list[str] = []

    def lazily() -> Iterator[OutboundMessage]:  # as the router hands them: a generator
        for message in messages:
            taken.append(message.message_id)
            yield message

    meanwhile: list[str] = []
    outcomes = breaker.publish(lazily(), meanwhile=lambda: meanwhile.append("ran"))

    assert [o.message_id for o in outcomes] == ids(*messages)
    assert [o.failure for o in outcomes] == [
        None,
        Failure.UNAVAILABLE,
        None,
        Failure.TIMEOUT,  # business's queue is closed: it went to the broker
        None,
    ]
    assert [o.transport for o in outcomes] == ["rabbitmq", None, "rabbitmq", None, "rabbitmq"]
    assert broker.calls[-1] == ids(messages[0], *messages[2:])
    assert taken == ids(*messages)
    assert meanwhile == ["ran"]


def test_a_message_of_several_queues_that_times_out_opens_none_of_them() -> None:
    # Which of them held it up, its timeout does not say; blaming them all sent healthy
    # queues' emergencies to SQS. A message for the stuck queue alone opens it.
    broker, clock = Broker(q(MEDIA)), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    outcomes = breaker.publish([to(GOVERNMENT, MEDIA), to(GOVERNMENT)])
    assert [o.failure for o in outcomes] == [Failure.TIMEOUT, None]
    assert state_of(breaker) is State.CLOSED
    assert breaker.publish([to(MEDIA)])[0].failure is Failure.TIMEOUT
    assert breaker.state_for(q(MEDIA)) is State.OPEN
    assert breaker.publish([to(GOVERNMENT)])[0].stored
    assert breaker.state_for(EVERYTHING) is State.CLOSED


def test_a_message_of_one_queue_that_times_out_opens_that_queue() -> None:
    broker, clock = Broker(), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    assert breaker.publish([to(GOVERNMENT)])[0].stored
    broker.stuck.add(q(GOVERNMENT))
    clock.now += 0.25
    assert breaker.publish([to(GOVERNMENT)])[0].failure is Failure.TIMEOUT
    assert breaker.state_for(q(GOVERNMENT)) is State.OPEN
    update = to(GOVERNMENT)
    assert breaker.publish([update])[0].failure is Failure.UNAVAILABLE
    assert not broker.reached(update)


def test_each_target_has_its_own_period_and_its_own_probe() -> None:
    broker, clock = Broker(q(MEDIA)), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    breaker.publish([to(MEDIA)])  # media open at 100
    clock.now = 101
    assert breaker.publish([to(GOVERNMENT)])[0].stored  # the broker stores: no stall
    clock.now = 103
    broker.stuck.add(q(BUSINESS))
    breaker.publish([to(BUSINESS)])  # business open at 103
    clock.now = 105
    assert (breaker.state_for(q(MEDIA)), breaker.state_for(q(BUSINESS))) == (
        State.HALF_OPEN,
        State.OPEN,
    )
    # The media message probes media (still stuck: open for another period); business waits.
    probe, waiting, other = to(MEDIA), to(BUSINESS), to(GOVERNMENT)
    outcomes = breaker.publish([probe, waiting, other])
    assert [o.failure for o in outcomes] == [Failure.TIMEOUT, Failure.UNAVAILABLE, None]
    assert broker.calls[-1] == ids(probe, other)
    clock.now = 108
    broker.stuck.clear()
    assert (breaker.state_for(q(MEDIA)), breaker.state_for(q(BUSINESS))) == (
        State.OPEN,
        State.HALF_OPEN,
    )
    outcomes = breaker.publish([to(MEDIA), to(BUSINESS)])
    assert [o.failure for o in outcomes] == [Failure.UNAVAILABLE, None]
    assert breaker.state_for(q(BUSINESS)) is State.CLOSED  # its probe was stored
    assert breaker.state_for(q(MEDIA)) is State.OPEN
    clock.now = 110
    assert breaker.publish([to(MEDIA)])[0].stored
    assert breaker.state is State.CLOSED
    assert (breaker.state_for(q(MEDIA)), breaker.state_for(q(BUSINESS))) == (State.CLOSED,) * 2


def test_a_call_that_stored_nothing_sends_its_audit_batch_around_the_broker() -> None:
    # The broker may have gone silent: the audit batch does not wait for a reconnect.
    broker, clock = Broker(), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    broker.silent = True
    assert breaker.publish([to(GOVERNMENT, COMMUNITY)])[0].failure is Failure.TIMEOUT
    assert breaker.publish([audit_batch()])[0].failure is Failure.UNAVAILABLE
    assert len(broker.calls) == 1
    assert breaker.state_for(AUDIT_QUEUE) is State.CLOSED  # no audit batch timed out
    # A message stored again proves the connection: audit batches go to the broker again.
    broker.silent = False
    broker.stuck.add(AUDIT_QUEUE)
    assert breaker.publish([to(MEDIA)])[0].stored
    assert breaker.publish([audit_batch()])[0].failure is Failure.TIMEOUT  # this one's stuck
    assert breaker.state_for(AUDIT_QUEUE) is State.OPEN


def test_a_stuck_audit_queue_sends_audit_batches_to_the_sqs_path_while_messages_stay() -> None:
    broker, clock = Broker(AUDIT_QUEUE), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    sqs = MemoryTransport(name="sqs-audit")
    router = Router(
        table=default_routing_table(),
        transports=[breaker, MemoryTransport(name="fallback")],
        cipher=LocalCipher(),
        audit=TransportAuditSink([breaker, sqs], emitted_by="router"),
        environment="test",
    )

    def alert() -> dict[str, JsonValue]:
        return {
            "message_id": str(uuid.uuid4()),
            "topic": "child-safety.incident.reported",
            "priority": "emergency",
            "classification": "restricted",
            "payload": {"case": "C-1"},
        }

    first = router.route([alert()], source="government")  # its audit batch times out
    assert [r.transport for r in first.results] == ["rabbitmq"]
    assert first.audited
    assert len(broker.calls) == 2  # the alert, then the audit batch that timed out
    assert breaker.state_for(AUDIT_QUEUE) is State.OPEN

    for _ in range(3):
        later = router.route([alert()], source="government")
        assert [r.transport for r in later.results] == ["rabbitmq"]  # not the fallback
        assert later.audited
    assert len(broker.calls) == 5  # three alerts; their audit batches went straight to SQS
    assert len(sqs.published) == 4
    assert {m.kind for m in sqs.published} == {MessageKind.AUDIT}


# --- a call with nothing for the broker ---------------------------------------------------------


def test_a_call_with_no_message_does_not_reach_the_broker() -> None:
    broker, clock = Broker(), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    calls: list[str] = []
    assert breaker.publish([], meanwhile=lambda: calls.append("meanwhile")) == []
    assert breaker.publish(iter(())) == []
    assert broker.calls == []
    assert calls == []


def test_an_empty_call_is_no_probe_the_next_call_with_a_message_is() -> None:
    broker, clock = Broker(), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    broker.down = True
    breaker.publish([to(GOVERNMENT)])
    broker.down = False
    clock.now += 5
    assert breaker.publish(iter(())) == []
    assert breaker.state is State.HALF_OPEN
    assert breaker.publish([to(GOVERNMENT)])[0].stored
    assert state_of(breaker) is State.CLOSED
    assert len(broker.calls) == 2


@pytest.fixture
def silent_broker() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP port that takes connections and never answers (an AMQP handshake there waits
    out the connect timeout); yields the port and the connections it took."""
    with silent_endpoint() as endpoint:
        yield endpoint


def test_a_half_open_call_with_no_admitted_message_opens_no_connection(
    silent_broker: tuple[int, list[socket.socket]],
) -> None:
    # Every message of a call refused at validation: nothing to publish, so no connect timeout
    # to pay during an outage, and the breaker is left for a call that can probe it.
    port, taken = silent_broker
    rabbit = RabbitMqTransport(
        RabbitSettings("127.0.0.1", port, lambda: ("guest", "guest"), connect_timeout=0.5),
        exchange_for=exchange_for,
    )
    clock = Clock()
    breaker = BreakerTransport(rabbit, open_seconds=5, clock=clock)
    assert breaker.publish([to(GOVERNMENT)])[0].failure is Failure.UNAVAILABLE  # connect fails
    connections = len(taken)
    clock.now += 5
    started = time.monotonic()
    assert breaker.publish(iter(())) == []
    assert time.monotonic() - started < 0.2
    time.sleep(0.2)  # a connection attempt would have reached the listener by now
    assert len(taken) == connections
    assert breaker.state is State.HALF_OPEN
    rabbit.close()


# --- what a timeout is blamed on ---------------------------------------------------------------


class BudgetCut(Broker):
    """A broker confirming slowly but steadily, in publish order: the publish budget ends each
    call with its last ``unconfirmed`` messages timed out, whatever their queues
    (``RabbitMqTransport.out_of_budget``)."""

    def __init__(self, unconfirmed: int) -> None:
        super().__init__()
        self.unconfirmed = unconfirmed
        self.out_of_budget = False

    def publish(
        self, messages: Iterable[OutboundMessage], *, meanwhile: Callable[[], None] | None = None
    ) -> list[Outcome]:
        outcomes = super().publish(messages, meanwhile=meanwhile)
        cut = len(outcomes) - self.unconfirmed
        self.out_of_budget = self.unconfirmed > 0
        return [
            o if i < cut else Outcome(o.message_id, failure=Failure.TIMEOUT)
            for i, o in enumerate(outcomes)
        ]


def test_the_slow_tail_a_publish_budget_cuts_off_opens_no_queue() -> None:
    # 480 donations, then 20 incident reports: the budget ends the call with the reports still
    # unconfirmed. Their emergency queues are healthy; opening them sent every report of the
    # next 5 s to SQS, to wait for the drain.
    broker, clock = BudgetCut(unconfirmed=20), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    calls = [to(BUSINESS) for _ in range(480)] + [
        to(GOVERNMENT, COMMUNITY, emergency=True) for _ in range(20)
    ]
    assert sum(o.stored for o in breaker.publish(calls)) == 480
    broker.unconfirmed = 0
    report = to(GOVERNMENT, COMMUNITY, emergency=True)
    assert breaker.publish([report])[0].stored
    assert state_of(breaker) is State.CLOSED


def test_a_stuck_queue_is_still_blamed_when_a_call_ends_with_it_without_a_budget_cut() -> None:
    broker, clock = Broker(q(MEDIA)), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    media = to(MEDIA)
    breaker.publish([to(GOVERNMENT), media])  # media's message last, after the stored one
    assert breaker.state_for(q(MEDIA)) is State.OPEN


def test_a_public_alert_that_times_out_opens_none_of_its_queues() -> None:
    # Emergency queues are quiet: a stuck media emergency queue must not open the others for
    # the next public alert; media's own emergency opens media's.
    broker, clock = Broker(), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    assert breaker.publish([to(*STAKEHOLDERS, emergency=True)])[0].stored
    clock.now += 3600
    broker.stuck = {q(MEDIA, emergency=True)}
    breaker.publish([to(*STAKEHOLDERS, emergency=True)])  # times out: media's queue
    assert breaker.publish([to(MEDIA, emergency=True)])[0].failure is Failure.TIMEOUT
    incident = to(GOVERNMENT, COMMUNITY, emergency=True)
    assert breaker.publish([incident])[0].stored
    assert breaker.state_for(q(MEDIA, emergency=True)) is State.OPEN
    assert breaker.state_for(q(GOVERNMENT, emergency=True)) is State.CLOSED


def test_queues_opened_together_by_one_cold_message_do_not_make_a_stall() -> None:
    # Only community's emergency queue is stuck. A cold incident (government and community)
    # opens both; an alert narrowed to community and media then times out too. Neither queue
    # was its message's only suspect, so nothing shows two stuck queues: the rest of the
    # broker stays in use.
    broker, clock = Broker(q(COMMUNITY, emergency=True)), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    breaker.publish([to(GOVERNMENT, COMMUNITY, emergency=True)])
    clock.now += 1
    breaker.publish([to(COMMUNITY, MEDIA, emergency=True)])
    clock.now += 1
    case = to(GOVERNMENT)
    assert breaker.publish([case])[0].stored
    assert breaker.state_for(EVERYTHING) is State.CLOSED


def test_after_a_call_that_ran_out_of_its_budget_the_audit_batch_goes_around_the_broker() -> None:
    # A broker too slow for one call's 2.5 s would hold its audit batch for another 2.5 s: the
    # router's stages then added up past its 30 s. The SQS audit path takes the batch at once.
    broker, clock = BudgetCut(unconfirmed=20), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    breaker.publish([to(BUSINESS) for _ in range(100)])
    batch = audit_batch()
    assert breaker.publish([batch])[0].failure is Failure.UNAVAILABLE
    assert not broker.reached(batch)
    broker.unconfirmed = 0
    assert breaker.publish([to(BUSINESS)])[0].stored  # stored in time: the broker again
    assert breaker.publish([audit_batch()])[0].stored


def test_a_broker_that_confirms_nothing_opens_everything_also_for_messages_of_several_queues() -> (
    None
):
    # Incidents, public alerts and multi-group updates each wait on two queues or more: two of
    # them timing out with no answer between, on queues they do not share, cannot be one stuck
    # queue. Before, only messages of one queue counted, and each call paid the timeout.
    broker, clock = Broker(), Clock()
    broker.silent = True
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    incident = to(GOVERNMENT, COMMUNITY, emergency=True)
    assert breaker.publish([incident])[0].failure is Failure.TIMEOUT
    clock.now += 0.5
    assert breaker.publish([to(BUSINESS, MEDIA)])[0].failure is Failure.TIMEOUT
    assert breaker.state_for(EVERYTHING) is State.OPEN
    clock.now += 0.5
    alert = to(*STAKEHOLDERS, emergency=True)
    assert breaker.publish([alert])[0].failure is Failure.UNAVAILABLE
    assert not broker.reached(alert)


def test_one_pause_of_the_broker_that_times_out_a_whole_call_does_not_open_everything() -> None:
    # A quorum WAL roll-over or a GC can hold every confirm of one call past its 0.5 s: its
    # messages share no queue, but one call is no evidence of a stalled broker. Opening
    # everything sent every group's emergencies to SQS for 5 s.
    broker, clock = Broker(), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    broker.silent = True
    outcomes = breaker.publish([to(GOVERNMENT), to(COMMUNITY, BUSINESS)])
    assert {o.failure for o in outcomes} == {Failure.TIMEOUT}
    broker.silent = False
    clock.now += 0.25
    incident = to(GOVERNMENT, COMMUNITY, emergency=True)
    assert breaker.publish([incident])[0].stored
    assert breaker.state_for(EVERYTHING) is State.CLOSED
