"""How the long-running consumer hands back what it could not settle (no broker needed)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pika.exceptions
import pytest

from fabric import topology
from fabric.adapters.rabbitmq import RabbitSettings
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer, _Arrivals, _Pending
from fabric.consumer import Decision, Delivery, MessageProcessor, Verdict
from fabric.stakeholders import Stakeholder

WORK = topology.queue_name(Stakeholder.MEDIA)


class RecordingChannel:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.is_open = True
        self.connection = self  # pika's channel.connection: read for a Channel.Close first

    def process_data_events(self, time_limit: float | None = None) -> None:
        pass

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.calls.append(("ack", tag, multiple))

    def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True) -> None:
        self.calls.append(("nack", tag, requeue))

    def basic_reject(self, tag: int, requeue: bool = True) -> None:
        self.calls.append(("reject", tag, requeue))


class RefusingSettler:
    """Stores every retry and park except the ones named (a full tier, a missing DLQ)."""

    def __init__(self, refused: set[str]) -> None:
        self.refused = refused

    def settle(self, items: Sequence[tuple[Delivery, Decision]]) -> list[bool]:
        return [delivery.message_id not in self.refused for delivery, _ in items]


def delivery(message_id: str) -> Delivery:
    return Delivery(message_id=message_id, topic="media.story", body=b"{}", queue=WORK)


def test_a_failed_message_whose_retry_was_refused_is_rejected_so_the_delivery_limit_counts_it() -> (
    None
):
    # RabbitMQ 4.3 counts a requeue against the quorum queue's delivery limit only for
    # basic.reject, not for basic.nack (rabbitmq-server#15387). A poison message whose park
    # kept being refused was nacked back, run and refused again every second, forever; the
    # docs promise the delivery limit bounds it (as on 3.10-4.2, where both count).
    channel = RecordingChannel()
    counts: Counter[str] = Counter()
    settler: Any = RefusingSettler({"b"})
    pending = _Pending(channel, settler, counts, lambda: None, limit=10)
    pending.add(1, delivery("a"), Decision(Verdict.DONE))
    pending.add(2, delivery("b"), Decision(Verdict.DEAD_LETTER, reason="poison"))

    pending.flush()

    assert channel.calls == [("ack", 1, False), ("reject", 2, True)]
    assert counts == {"done": 1, "systemic": 1}


def test_deliveries_parked_at_the_delivery_limit_are_acknowledged_one_by_one() -> None:
    # Parked instead of handed back, before the hand-back's multiple nack: a multiple
    # acknowledgement would have covered the lower tags that go back. A refused park is not
    # acknowledged: it goes back with the others (and the broker dead-letters it).
    channel = RecordingChannel()
    counts: Counter[str] = Counter()
    settler: Any = RefusingSettler({"refused"})
    pending = _Pending(channel, settler, counts, lambda: None, limit=10)

    parked = pending.park([(4, delivery("parked")), (6, delivery("refused")), (7, delivery("x"))])

    assert parked == {4, 7}
    assert channel.calls == [("ack", 4, False), ("ack", 7, False)]
    assert counts == {"dead-letter": 2}


def test_a_delivery_counts_as_waiting_since_the_settlement_that_made_room_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The consumer_timeout guard's bound: with a prefetch of 2, the consumer's third delivery
    # can only have come once its first was settled, and its fourth once its second was. It
    # errs long (the start, or when a settlement started), never short: a short bound let
    # deliveries wait out the broker's consumer_timeout.
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    arrivals = _Arrivals(2)
    now[0] = 101.0
    # A consumer started after a hand-back: the channel's tags go on from where they were.
    assert (arrivals.waited(5), arrivals.waited(6)) == (1.0, 1.0)
    now[0] = 102.0
    arrivals.settled(1)
    now[0] = 103.0
    arrivals.settled(1)
    now[0] = 110.0
    assert (arrivals.waited(7), arrivals.waited(8)) == (8.0, 7.0)


def test_a_delivery_after_the_consumer_found_nothing_to_take_counts_as_waiting_since_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # From the credit alone, the first delivery after a quiet spell looked as old as the spell,
    # and was handed back: every quiet quarter of an hour in production.
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    arrivals = _Arrivals(2)
    arrivals.settled(1)
    now[0] = 1000.0
    arrivals.quiet()  # the consumer read the connection and held nothing
    now[0] = 1000.5
    assert arrivals.waited(1) == 0.5
    now[0] = 2000.0
    arrivals.settled(1)
    now[0] = 2001.0
    assert arrivals.waited(4) == 1.0, "after the quiet spell, the credit bounds it again"


def test_a_decided_message_is_acknowledged_before_a_slow_handler_starts_not_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The group was settled only on the next add: a finished message stayed unacknowledged for
    # the whole next handler. Quick handlers keep their groups (one audit batch, one ack).
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    channel = RecordingChannel()
    settler: Any = RefusingSettler(set())
    pending = _Pending(channel, settler, Counter(), lambda: None, limit=10)
    for tag in (1, 2, 3):  # quick handlers: 1 ms each
        pending.handler_starts()
        now[0] += 0.001
        pending.add(tag, delivery(f"quick-{tag}"), Decision(Verdict.DONE))
    pending.handler_starts()
    assert channel.calls == [], "quick handlers keep their group"
    now[0] += 1.0  # a slow handler
    pending.add(4, delivery("slow"), Decision(Verdict.DONE))
    assert channel.calls == [("ack", 4, True)]
    pending.handler_starts()  # the next handler may be as slow
    assert channel.calls == [("ack", 4, True)], "nothing else was pending"
    now[0] += 1.0
    pending.add(5, delivery("slow-2"), Decision(Verdict.DONE))
    assert channel.calls == [("ack", 4, True)]
    pending.handler_starts()
    assert channel.calls == [("ack", 4, True), ("ack", 5, True)], "acknowledged before it runs"


class CountingSettler(RefusingSettler):
    def __init__(self) -> None:
        super().__init__(set())
        self.settled: list[str] = []

    def settle(self, items: Sequence[tuple[Delivery, Decision]]) -> list[bool]:
        self.settled += [delivery.message_id for delivery, _ in items]
        return super().settle(items)


def test_nothing_decided_is_settled_once_the_broker_closed_the_channel() -> None:
    # The broker's consumer_timeout closed the channel during a handler and put its
    # unacknowledged deliveries back in the queue: a park or retry published now is a second
    # copy of a message that is back in its work queue (tests/integration/
    # test_consumer_channel_loss.py shows it on a broker).
    channel = RecordingChannel()
    settler = CountingSettler()
    counts: Counter[str] = Counter()
    pending = _Pending(channel, settler, counts, lambda: None, limit=10)  # type: ignore[arg-type]
    pending.add(1, delivery("a"), Decision(Verdict.DEAD_LETTER, reason="poison"))
    channel.is_open = False

    with pytest.raises(pika.exceptions.ChannelClosed):
        pending.flush()

    assert settler.settled == []
    assert channel.calls == []
    assert counts == {}
    pending.flush()  # dropped: nothing left to settle


class InterruptedSettler(CountingSettler):
    """Its first settlement stores everything, then the signal comes (``KeyboardInterrupt``)."""

    def settle(self, items: Sequence[tuple[Delivery, Decision]]) -> list[bool]:
        stored = super().settle(items)
        if len(self.settled) == len(items):
            raise KeyboardInterrupt
        return stored


def test_a_group_whose_settlement_was_interrupted_is_kept_to_be_settled_again() -> None:
    # The group was taken out of the pending ones before its settlement: interrupted there, the
    # consumer's exit had no record of it, and its hand-back (or the closing connection) put
    # the messages back though their parks and delivered records were stored.
    channel = RecordingChannel()
    settler = InterruptedSettler()
    counts: Counter[str] = Counter()
    pending = _Pending(channel, settler, counts, lambda: None, limit=2)  # type: ignore[arg-type]
    pending.add(1, delivery("a"), Decision(Verdict.DONE))
    with pytest.raises(KeyboardInterrupt):
        pending.add(2, delivery("b"), Decision(Verdict.DEAD_LETTER, reason="poison"))

    assert channel.calls == []
    assert pending.holds(1)
    assert pending.holds(2)
    pending.flush()  # the exit's hand-back settles first

    assert settler.settled == ["a", "b", "a", "b"], "settled again: a second park at worst"
    assert channel.calls == [("ack", 2, True)]
    assert counts == {"done": 1, "dead-letter": 1}
    assert not pending.holds(2)


class InterruptedRejects(RecordingChannel):
    """A channel whose first reject is interrupted before it is sent."""

    def basic_reject(self, tag: int, requeue: bool = True) -> None:
        if not any(call[0] == "interrupted" for call in self.calls):
            self.calls.append(("interrupted", tag, requeue))
            raise KeyboardInterrupt
        super().basic_reject(tag, requeue)


def test_an_interrupted_group_keeps_what_was_neither_acknowledged_nor_rejected() -> None:
    # One by one (a park refused): what was acknowledged before the interrupt is not settled
    # again, nor acknowledged twice (an unknown delivery tag closes the channel). The one whose
    # reject was not sent is kept: dropped, the next group's multiple acknowledgement would
    # have covered it, and a message whose park was refused would have been lost.
    channel = InterruptedRejects()
    settler = CountingSettler()
    settler.refused = {"b"}
    pending = _Pending(channel, settler, Counter(), lambda: None, limit=10)  # type: ignore[arg-type]
    pending.add(1, delivery("a"), Decision(Verdict.DONE))
    pending.add(2, delivery("b"), Decision(Verdict.DEAD_LETTER, reason="poison"))
    pending.add(3, delivery("c"), Decision(Verdict.DONE))
    with pytest.raises(KeyboardInterrupt):
        pending.flush()
    assert channel.calls == [("ack", 1, False), ("interrupted", 2, True)]
    assert [pending.holds(tag) for tag in (1, 2, 3)] == [False, True, True]

    settler.refused = set()  # its DLQ is back
    pending.flush()
    assert settler.settled == ["a", "b", "c", "b", "c"]
    assert channel.calls[2:] == [("ack", 3, True)]


def test_a_cancel_that_fails_for_a_reason_of_its_own_still_settles_what_was_decided(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The end of a run settled what was decided only after its cancel: a cancel that raised
    # anything but a pika error (StopIteration from a consume generator an interrupt had
    # finished, pika's internals changed) skipped the settlement, and the decided messages came
    # back with the connection and ran again.
    channel = RecordingChannel()  # no consumer pika knows of: the cancel fails
    settler = CountingSettler()
    consumer = RabbitMqConsumer(
        RabbitSettings("127.0.0.1", 5672, lambda: ("user", "password")),
        WORK,
        MessageProcessor(lambda _delivery: None),
        settler=settler,  # type: ignore[arg-type]
    )
    pending = _Pending(channel, settler, Counter(), lambda: None, limit=10)  # type: ignore[arg-type]
    pending.add(1, delivery("a"), Decision(Verdict.DONE))

    consumer._finish(channel, pending, None)

    assert channel.calls == [("ack", 1, True)]
    assert "could not be cancelled" in caplog.text
