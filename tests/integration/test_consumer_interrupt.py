"""An exception that unwinds the long-running consumer's ``run`` at an awkward moment, on the
real local RabbitMQ: a ``KeyboardInterrupt`` (Ctrl-C) or a SIGTERM handler's ``SystemExit``
while a group of decided messages is being settled, while the consumer waits for its next
delivery, or as the settlement starts pika's I/O loop; and a broker that never confirms the
consumer's cancel.

The interrupts are raised at an exact point instead of by a timed signal, so that each test
shows one moment every time: by a settler that raises around the real settlement, from a
callback the consumer's connection runs while the consumer waits inside pika's consume
generator, or as pika's loop marks itself running. Everything else (pika, the broker, the
settlement) is real.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pika
import pytest
from pika.adapters import select_connection

from fabric import topology
from fabric.adapters import rabbitmq_consumer
from fabric.adapters.rabbitmq import RabbitSettings
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer, consumer_settler
from fabric.consumer import Decision, Delivery, MessageProcessor, Poison, RabbitMqSettler
from fabric.envelope import new_message_id
from tests.integration import test_dead_letters as dead_letters
from tests.integration.conftest import AMQP, GUEST
from tests.integration.faults import FaultProxy, Frame
from tests.integration.queue_waits import settled_empty, unheld_depth
from tests.integration.test_consumer_limits import events, hand_back, take

pytestmark = pytest.mark.integration
WORK, DLQ = dead_letters.WORK, dead_letters.DLQ
LIMIT = topology.DELIVERY_LIMIT
publish = dead_letters.publish
amqp, settings = dead_letters.amqp, dead_letters.settings  # the broker's fixture and settings

BASIC_DELIVER = (60, 60)
BASIC_CANCEL_OK = (60, 31)


class InterruptedSettler:
    """The consumer's real settler, with a ``KeyboardInterrupt`` on its first settlement:
    before it publishes anything, or once everything is stored (the signal came as the
    broker's confirms were read)."""

    def __init__(self, settler: RabbitMqSettler, *, stored_first: bool) -> None:
        self._settler = settler
        self._stored_first = stored_first
        self.groups: list[list[str]] = []

    def settle(self, items: Sequence[tuple[Delivery, Decision]]) -> list[bool]:
        self.groups.append([delivery.message_id for delivery, _ in items])
        if len(self.groups) > 1:
            return self._settler.settle(items)
        if self._stored_first:
            self._settler.settle(items)
        raise KeyboardInterrupt


def work_settler(vhost: str) -> RabbitMqSettler:
    return consumer_settler(settings(vhost), WORK, consumer="consumer:interrupt")


def drain(channel: Any, queue: str) -> Counter[str]:
    """How many copies of each message ``queue`` holds once nothing holds them, taken off."""
    unheld_depth(channel, queue)
    copies: Counter[str] = Counter()
    while (got := channel.basic_get(queue, auto_ack=True))[0] is not None:
        copies[got[1].message_id] += 1
    return copies


@pytest.mark.parametrize("stored_first", [False, True], ids=["nothing-stored", "all-stored"])
def test_a_group_interrupted_while_it_is_settled_is_settled_before_the_hand_back(
    broker_vhost: str, amqp: Any, *, stored_first: bool
) -> None:
    # The settlement took its group out of the pending ones before it published: an interrupt
    # during the publish left the exit with no record of them, and the closing connection
    # returned them. A handled message ran again (a second delivered record), and a poison
    # message whose park was stored was parked AND back in its work queue. Now the exit
    # settles the group again before it hands anything back: at worst a second copy of a park
    # (the redrive takes a message once), never a message both parked and live.
    poison = [new_message_id() for _ in range(3)]
    fine = [new_message_id() for _ in range(3)]
    for message_id in [*poison, *fine]:
        publish(amqp, WORK, message_id)
    handled: list[str] = []

    def handler(delivery: Delivery) -> None:
        handled.append(delivery.message_id)
        if delivery.message_id in poison:
            raise Poison("refuses to parse")

    settler = InterruptedSettler(work_settler(broker_vhost), stored_first=stored_first)
    consumer = RabbitMqConsumer(
        settings(broker_vhost),
        WORK,
        MessageProcessor(handler),
        settler=settler,  # type: ignore[arg-type]
    )
    with pytest.raises(KeyboardInterrupt):
        consumer.run(idle_timeout_s=2)

    assert len(handled) == len(set(handled)), "each handler ran once"
    unhandled = set(poison + fine) - set(handled)
    assert drain(amqp, WORK) == Counter(unhandled), "only what never ran went back"
    copies = 2 if stored_first else 1  # settled again: a park stored twice, not a live copy
    assert drain(amqp, DLQ) == Counter({m: copies for m in poison if m in handled})
    expected = sorted(
        ("dead-lettered", m, "poison") if m in poison else ("delivered", m, None) for m in handled
    )
    assert sorted(events(amqp)) == sorted(expected * copies)
    assert sorted(settler.groups[0]) == sorted(handled), "the run stopped at its first settlement"
    assert settler.groups[1:] == settler.groups[:1], "settled again, once, on the way out"
    settled_empty(amqp, WORK, DLQ)


def test_a_message_interrupted_as_its_own_settlement_starts_is_settled_not_handed_back(
    broker_vhost: str, amqp: Any
) -> None:
    # Interrupted in the settlement its own decision started, the message counted as held (taken
    # and not decided) as well as decided: the exit settled it, then handed it back. Carrying
    # the delivery limit, a message its handler had finished was also parked as max-receives:
    # a copy in the DLQ that a redrive would run again.
    message_id = new_message_id()
    publish(amqp, WORK, message_id)
    hand_back(amqp, [message_id], LIMIT)
    handled: list[int] = []

    def handler(delivery: Delivery) -> None:
        handled.append(delivery.delivery_count)

    settler = InterruptedSettler(work_settler(broker_vhost), stored_first=True)
    consumer = RabbitMqConsumer(
        settings(broker_vhost),
        WORK,
        MessageProcessor(handler),
        prefetch=1,  # its decision settles it at once
        settler=settler,  # type: ignore[arg-type]
    )
    with pytest.raises(KeyboardInterrupt):
        consumer.run(idle_timeout_s=2)

    assert handled == [LIMIT]
    assert drain(amqp, DLQ) == Counter(), "not parked: its handler finished"
    assert events(amqp) == [("delivered", message_id, None)] * 2, "settled again on the way out"
    settled_empty(amqp, WORK, DLQ)


def test_an_interrupt_while_a_stopped_run_settles_its_last_group_settles_it_on_the_way_out(
    broker_vhost: str, amqp: Any
) -> None:
    # The end of a run (a stop, max_messages, the idle timeout) settled its last group outside
    # the exit's handling: interrupted there, the connection's closure returned the group, and
    # the handled message ran again.
    ids = [new_message_id() for _ in range(3)]
    for message_id in ids:
        publish(amqp, WORK, message_id)
    stop = threading.Event()
    handled: list[str] = []

    def handler(delivery: Delivery) -> None:
        handled.append(delivery.message_id)
        stop.set()
        time.sleep(0.2)  # the broker sends the rest of the prefetch meanwhile

    settler = InterruptedSettler(work_settler(broker_vhost), stored_first=True)
    consumer = RabbitMqConsumer(
        settings(broker_vhost),
        WORK,
        MessageProcessor(handler),
        settler=settler,  # type: ignore[arg-type]
    )
    with pytest.raises(KeyboardInterrupt):
        consumer.run(stop=stop)

    assert handled == ids[:1]
    back = take(amqp, WORK, len(ids) - 1)
    assert {m: h.get("x-delivery-count") for m, h in back} == dict.fromkeys(ids[1:], 1)
    assert events(amqp) == [("delivered", ids[0], None)] * 2, "settled again on the way out"
    settled_empty(amqp, WORK, DLQ)


@pytest.fixture
def interrupt_loop_start(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Set its one flag, and the next start of a pika ``SelectConnection`` loop (the settler's
    publisher) is interrupted as a signal arriving there would: after ``start`` marked the
    loop running, before its ``try``."""
    armed = [False]
    activate = select_connection._PollerBase.activate_poller

    def activate_poller(self: Any) -> None:
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt
        activate(self)

    monkeypatch.setattr(select_connection._PollerBase, "activate_poller", activate_poller)
    return armed


def test_an_interrupt_as_a_settlement_starts_its_publish_ends_the_run_as_that_interrupt(
    broker_vhost: str, amqp: Any, interrupt_loop_start: list[bool]
) -> None:
    # The publisher dropped its connection on the interrupt and ran the loop to deliver the
    # close; the loop, marked running, refused to start (RuntimeError "IOLoop is not reentrant
    # and is already running"): the run ended with that error over the KeyboardInterrupt, so a
    # SIGTERM shutdown exited as a crash, and the poison message went back to its work queue.
    first, second = new_message_id(), new_message_id()
    publish(amqp, WORK, first)
    publish(amqp, WORK, second)
    real = work_settler(broker_vhost)

    class InterruptedPublish:
        calls = 0

        def settle(self, items: Sequence[tuple[Delivery, Decision]]) -> list[bool]:
            self.calls += 1
            interrupt_loop_start[0] = self.calls == 2  # the publisher is connected by now
            return real.settle(items)

    def poison(_delivery: Delivery) -> None:
        raise Poison("refuses to parse")

    consumer = RabbitMqConsumer(
        settings(broker_vhost),
        WORK,
        MessageProcessor(poison),
        prefetch=1,  # each message settled on its own
        settler=InterruptedPublish(),  # type: ignore[arg-type]
    )
    with pytest.raises(KeyboardInterrupt):
        consumer.run(idle_timeout_s=2)

    assert interrupt_loop_start == [False], "the interrupt came"
    assert set(drain(amqp, DLQ)) == {first, second}, "both parked"
    assert set(events(amqp)) == {
        ("dead-lettered", first, "poison"),
        ("dead-lettered", second, "poison"),
    }
    settled_empty(amqp, WORK, DLQ)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    faults = FaultProxy(AMQP)
    yield faults
    faults.close()


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The connections the consumers open, as they open them."""
    connections: list[Any] = []
    open_connection = rabbitmq_consumer.open_blocking_connection

    def opening(rabbit: RabbitSettings) -> Any:
        connections.append(open_connection(rabbit))
        return connections[-1]

    monkeypatch.setattr(rabbitmq_consumer, "open_blocking_connection", opening)
    return connections


def test_an_interrupt_while_the_consumer_waits_settles_what_it_decided_and_parks_the_last(
    broker_vhost: str, amqp: Any, proxy: FaultProxy, opened: list[Any]
) -> None:
    # An interrupt while the consumer waited for its next delivery finished pika's consume
    # generator. When a delivery reached the consumer during the exit's cancel, the exit took
    # it through the finished generator: StopIteration, and the exit gave up. The message
    # handled just before was never acknowledged (it came back and ran again, no delivered
    # record), and the delivery carrying the limit was not parked: pika rejected it at the
    # close and the broker dead-lettered it silently.
    last = new_message_id()
    publish(amqp, WORK, last)
    hand_back(amqp, [last], LIMIT - 1)
    holder = pika.BlockingConnection(
        pika.ConnectionParameters(
            *AMQP, virtual_host=broker_vhost, credentials=pika.PlainCredentials(*GUEST)
        )
    )
    assert holder.channel().basic_get(WORK, auto_ack=False)[0] is not None  # its LIMIT-th
    handled_first = new_message_id()
    publish(amqp, WORK, handled_first)
    handled: list[tuple[str, int]] = []

    def delivered_to_consumer() -> list[Frame]:
        return [f for to_client, f in list(proxy.seen) if to_client and f.method == BASIC_DELIVER]

    def interrupt() -> None:
        # Runs inside the consumer's wait for its next delivery. The other client goes away:
        # ``last`` returns (its count now LIMIT) and the broker sends it to the consumer.
        holder.close()
        deadline = time.monotonic() + 5
        while len(delivered_to_consumer()) < 2:
            assert time.monotonic() < deadline, "the returned message did not come"
            time.sleep(0.01)
        raise KeyboardInterrupt

    def handler(delivery: Delivery) -> None:
        handled.append((delivery.message_id, delivery.delivery_count))
        opened[0].add_callback_threadsafe(interrupt)

    consumer = RabbitMqConsumer(
        # No heartbeat: no helper thread serves the connection, so the callback runs in the
        # consumer's own wait.
        RabbitSettings(AMQP[0], proxy.port, lambda: GUEST, vhost=broker_vhost, heartbeat=0),
        WORK,
        MessageProcessor(handler),
        settler=work_settler(broker_vhost),
    )
    with pytest.raises(KeyboardInterrupt):
        consumer.run(idle_timeout_s=5)

    assert handled == [(handled_first, 0)]
    ((parked, headers),) = take(amqp, DLQ, 1)
    assert (parked, headers[topology.DEAD_LETTER_REASON_HEADER]) == (last, "max-receives")
    assert "x-death" not in headers, "parked by the toolkit, not dead-lettered by the broker"
    assert events(amqp) == [
        ("delivered", handled_first, None),
        ("dead-lettered", last, "max-receives"),
    ]
    settled_empty(amqp, WORK, DLQ)


class CancelNeverConfirmed(FaultProxy):
    """Forwards everything but the broker's ``basic.cancel-ok``."""

    def _forward(
        self, units: list[tuple[bytes, Frame | None]], *, to_client: bool, client: Any
    ) -> bool:
        kept = [
            (raw, frame)
            for raw, frame in units
            if not (to_client and frame is not None and frame.method == BASIC_CANCEL_OK)
        ]
        return super()._forward(kept, to_client=to_client, client=client)


def test_a_cancel_the_broker_never_confirms_ends_the_run_within_a_bound(
    broker_vhost: str, amqp: Any
) -> None:
    # The end of a run waited for the cancel-ok without a deadline: a broker that kept the
    # connection alive (heartbeats) and never confirmed held the run, and the process, for
    # ever. Now it waits as long as a connect and a confirm may take, acknowledges what was
    # handled, and drops the connection: what it held goes back with it, once.
    proxy = CancelNeverConfirmed(AMQP)
    ids = [new_message_id() for _ in range(3)]
    for message_id in ids:
        publish(amqp, WORK, message_id)
    stop = threading.Event()
    handled: list[str] = []

    def handler(delivery: Delivery) -> None:
        handled.append(delivery.message_id)
        stop.set()
        time.sleep(0.2)  # the broker sends the rest of the prefetch meanwhile

    rabbit = RabbitSettings(AMQP[0], proxy.port, lambda: GUEST, vhost=broker_vhost)
    consumer = RabbitMqConsumer(
        rabbit, WORK, MessageProcessor(handler), settler=work_settler(broker_vhost)
    )
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(consumer.run(stop=stop)))
    started = time.monotonic()
    try:
        runner.start()
        runner.join(timeout=rabbit.connect_timeout + rabbit.confirm_timeout + 5)
        took = time.monotonic() - started
        assert not runner.is_alive(), "the run still waits for the cancel-ok"
    finally:
        proxy.close()  # a run still waiting loses its connection and ends
        runner.join(timeout=10)

    assert outcome == [{"done": 1}]
    assert took < rabbit.connect_timeout + rabbit.confirm_timeout + 3
    back = take(amqp, WORK, len(ids) - 1)
    assert {m: h.get("x-delivery-count") for m, h in back} == dict.fromkeys(
        set(ids) - set(handled), 1
    ), "the rest went back with the dropped connection, once each; the handled one did not"
    assert events(amqp) == [("delivered", handled[0], None)]
    settled_empty(amqp, WORK, DLQ)
