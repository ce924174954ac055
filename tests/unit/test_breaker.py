"""The circuit breaker: fail fast during an outage, probe, close again when the broker is back."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fabric.adapters.memory import MemoryTransport
from fabric.breaker import BreakerTransport, State
from fabric.ports import Failure, OutboundMessage, Outcome


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def msg(n: int) -> OutboundMessage:
    return OutboundMessage(f"m{n}", "t.x", b"{}", frozenset())


def test_after_an_outage_calls_fail_fast_without_touching_the_broker() -> None:
    broker, clock = MemoryTransport(failure=Failure.TIMEOUT), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    assert breaker.publish([msg(1)])[0].failure is Failure.TIMEOUT
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
    assert breaker.state is State.CLOSED
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


class OneQueueStuck:
    """A broker on which one group's queue stopped confirming (a quorum queue without its
    majority): that queue's messages fail with ``failure``, every other message is stored."""

    name = "rabbitmq"

    def __init__(self, stuck: str, failure: Failure = Failure.TIMEOUT) -> None:
        self.stuck = stuck
        self.failure = failure
        self.calls = 0

    def publish(
        self, messages: Iterable[OutboundMessage], *, meanwhile: Callable[[], None] | None = None
    ) -> list[Outcome]:
        self.calls += 1
        return [
            Outcome(m.message_id, failure=self.failure)
            if m.topic == self.stuck
            else Outcome(m.message_id, transport=self.name)
            for m in messages
        ]

    def close(self) -> None:
        """Nothing to release."""


STUCK = "media.story.published"
ALERT = "child-safety.incident.reported"


def to(topic: str, n: int) -> OutboundMessage:
    return OutboundMessage(f"{topic}-{n}", topic, b"{}", frozenset())


def test_a_timeout_beside_stored_messages_leaves_the_other_groups_on_the_broker() -> None:
    broker = OneQueueStuck(STUCK)
    breaker = BreakerTransport(broker, open_seconds=5, clock=Clock())
    mixed = breaker.publish([to(STUCK, 1), to(ALERT, 1)])
    assert [o.failure for o in mixed] == [Failure.TIMEOUT, None]  # the first to the fallback
    # The next call's emergency, for other groups, is still stored by the broker.
    assert breaker.publish([to(ALERT, 2)])[0].transport == "rabbitmq"
    assert breaker.state is State.CLOSED
    assert broker.calls == 2


def test_a_timeout_in_a_call_the_broker_stored_nothing_of_opens_the_circuit() -> None:
    breaker = BreakerTransport(OneQueueStuck(STUCK), open_seconds=5, clock=Clock())
    breaker.publish([to(STUCK, 1), to(STUCK, 2)])
    assert breaker.state is State.OPEN


def test_an_unavailable_message_opens_the_circuit_even_beside_stored_ones() -> None:
    breaker = BreakerTransport(
        OneQueueStuck(STUCK, Failure.UNAVAILABLE), open_seconds=5, clock=Clock()
    )
    breaker.publish([to(STUCK, 1), to(ALERT, 1)])
    assert breaker.state is State.OPEN


def test_a_half_open_probe_that_stored_anything_closes_the_circuit() -> None:
    broker, clock = OneQueueStuck(STUCK), Clock()
    breaker = BreakerTransport(broker, open_seconds=5, clock=clock)
    breaker.publish([to(STUCK, 1)])  # nothing stored: open
    clock.now += 5
    assert breaker.state is State.HALF_OPEN
    breaker.publish([to(STUCK, 2), to(ALERT, 1)])
    assert breaker.state is State.CLOSED
