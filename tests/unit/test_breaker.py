"""The circuit breaker: fail fast during an outage, probe, close again when the broker is back;
and where one queue stopped confirming, fail fast for that queue's messages only."""

from __future__ import annotations

import socket
import threading
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
from fabric.stakeholders import Stakeholder
from fabric.topology import AUDIT_QUEUE

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


def to(*groups: Stakeholder) -> OutboundMessage:
    """A message routed to ``groups``, with an id of its own."""
    return OutboundMessage(str(uuid.uuid4()), "t.x", b"{}", frozenset(groups))


def audit_batch() -> OutboundMessage:
    return OutboundMessage(
        str(uuid.uuid4()), AUDIT_TOPIC, b"{}", frozenset(), kind=MessageKind.AUDIT
    )


class Broker:
    """A broker on which some queues stopped confirming (a quorum queue without its majority):
    a message for a group in ``stuck`` (or an audit batch, with ``AUDIT_QUEUE`` in it) times
    out, every other one is stored. ``down`` makes every message ``UNAVAILABLE``. ``calls``
    holds the message ids of each call that reached it."""

    name = "rabbitmq"

    def __init__(self, *stuck: str) -> None:
        self.stuck = set(stuck)
        self.down = False
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
        queues = {AUDIT_QUEUE} if message.kind is MessageKind.AUDIT else set(message.audience)
        if queues & self.stuck:
            return Outcome(message.message_id, failure=Failure.TIMEOUT)
        return Outcome(message.message_id, transport=self.name)

    def close(self) -> None:
        """Nothing to release."""


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


# --- one target: a queue that stopped confirming ----------------------------------------------


def test_a_single_message_call_to_a_stuck_group_leaves_the_other_groups_on_the_broker() -> None:
    # Single-message calls are normal for emergencies: the call has no stored message beside
    # the one that timed out, and it used to open the circuit for every group.
    broker, clock = Broker(MEDIA), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    assert breaker.publish([to(MEDIA)])[0].failure is Failure.TIMEOUT
    assert breaker.state_for(MEDIA) is State.OPEN

    alert = to(GOVERNMENT, COMMUNITY)
    assert breaker.publish([alert])[0].transport == "rabbitmq"  # other groups: still the broker
    media, public = to(MEDIA), to(GOVERNMENT, MEDIA)  # every audience queue must confirm
    assert [o.failure for o in breaker.publish([media, public])] == [Failure.UNAVAILABLE] * 2
    assert broker.calls[1:] == [ids(alert)]  # the media messages did not wait on the broker
    assert breaker.state_for(GOVERNMENT) is State.CLOSED


def test_messages_for_open_and_closed_targets_in_one_call_keep_their_order() -> None:
    broker, clock = Broker(MEDIA), Clock()
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
        Failure.UNAVAILABLE,
        None,
    ]
    assert [o.transport for o in outcomes] == ["rabbitmq", None, "rabbitmq", None, "rabbitmq"]
    assert broker.calls[-1] == ids(messages[0], messages[2], messages[4])
    assert taken == ids(*messages)
    assert meanwhile == ["ran"]


def test_a_timeout_does_not_open_a_group_a_message_of_the_same_call_was_stored_for() -> None:
    broker, clock = Broker(MEDIA), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    outcomes = breaker.publish([to(GOVERNMENT, MEDIA), to(GOVERNMENT)])
    assert [o.failure for o in outcomes] == [Failure.TIMEOUT, None]
    assert breaker.state_for(MEDIA) is State.OPEN
    assert breaker.state_for(GOVERNMENT) is State.CLOSED  # its queue confirmed in that call
    assert breaker.publish([to(GOVERNMENT)])[0].stored
    assert breaker.state_for(EVERYTHING) is State.CLOSED


def test_each_target_has_its_own_period_and_its_own_probe() -> None:
    broker, clock = Broker(MEDIA), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    breaker.publish([to(MEDIA)])  # media open at 100
    clock.now = 103
    broker.stuck.add(BUSINESS)
    breaker.publish([to(BUSINESS)])  # business open at 103
    clock.now = 105
    assert (breaker.state_for(MEDIA), breaker.state_for(BUSINESS)) == (
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
    assert (breaker.state_for(MEDIA), breaker.state_for(BUSINESS)) == (
        State.OPEN,
        State.HALF_OPEN,
    )
    outcomes = breaker.publish([to(MEDIA), to(BUSINESS)])
    assert [o.failure for o in outcomes] == [Failure.UNAVAILABLE, None]
    assert breaker.state_for(BUSINESS) is State.CLOSED  # its probe was stored
    assert breaker.state_for(MEDIA) is State.OPEN
    clock.now = 110
    assert breaker.publish([to(MEDIA)])[0].stored
    assert breaker.state is State.CLOSED
    assert (breaker.state_for(MEDIA), breaker.state_for(BUSINESS)) == (State.CLOSED,) * 2


def test_a_call_that_stored_nothing_sends_its_audit_batch_around_the_broker() -> None:
    # A broker that takes publishes and confirms nothing (or a connection gone silent): each
    # group pays one confirm timeout, but the audit batch does not wait for a reconnect.
    broker, clock = Broker(GOVERNMENT, COMMUNITY, BUSINESS, AUDIT_QUEUE), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    assert breaker.publish([to(GOVERNMENT, COMMUNITY)])[0].failure is Failure.TIMEOUT
    assert breaker.publish([audit_batch()])[0].failure is Failure.UNAVAILABLE
    assert breaker.publish([to(BUSINESS)])[0].failure is Failure.TIMEOUT  # its own timeout
    assert len(broker.calls) == 2
    assert breaker.state_for(AUDIT_QUEUE) is State.CLOSED  # no audit batch timed out
    # A message stored again proves the connection: audit batches go to the broker again.
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
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    taken: list[socket.socket] = []
    done = threading.Event()

    def take() -> None:
        while not done.is_set():
            try:
                taken.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    yield server.getsockname()[1], taken
    done.set()
    thread.join()
    server.close()
    for connection in taken:
        connection.close()


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
