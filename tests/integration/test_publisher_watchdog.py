"""The publisher's confirm watchdog on the real broker, with the transport's clock in the test's
hands: a confirm timeout must mean the broker was silent, never that the caller's code was slow.

The clock is the real one plus the time the test says the caller's code took, so the order of
events in pika's loop is fixed by the test instead of by how fast the machine happens to be.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.ports import OutboundMessage
from tests.integration.conftest import AMQP
from tests.integration.faults import BASIC_ACK, FaultProxy
from tests.integration.test_rabbitmq_transport import messages, quorum_queue

pytestmark = pytest.mark.integration

TIMEOUT = 5.0  # the confirm timeout: far longer than the local broker ever takes to confirm


class SteppedClock:
    """``time.monotonic``, plus the time the test says the caller's code took."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skipped

    def advance(self, seconds: float) -> None:
        self.skipped += seconds


def wait_until_confirmed(proxy: FaultProxy, tag: int) -> None:
    """Return once the broker's confirm of delivery tag ``tag`` is in the client's socket."""
    deadline = time.monotonic() + 5
    while not any(
        to_client
        and frame.method == BASIC_ACK
        and struct.unpack_from(">Q", frame.payload, 4)[0] >= tag  # the delivery tag
        for to_client, frame in list(proxy.seen)
    ):
        assert time.monotonic() < deadline, f"the broker did not confirm delivery tag {tag}"
        time.sleep(0.005)
    time.sleep(0.05)  # the proxy writes a frame to the client right after recording it


def test_a_source_slow_in_a_confirm_callback_after_an_overdue_look_is_not_a_broker_timeout(
    vhost: str, channel: Any
) -> None:
    # The watchdog looks twice before it calls a confirm overdue: the loop may have been busy in
    # the caller's code with confirms unread on the socket. Here the first look finds the
    # confirms overdue because of a slow source; the loop then reads them, and their callback
    # pulls the rest of the batch from the source, which is slow again. The watchdog's second
    # look comes before the loop reads the socket again: it used to call that a broker timeout
    # (the rest of the batch failed over, the breaker counted a systemic failure), found only
    # by test_a_slow_source_is_not_a_broker_timeout failing now and then.
    quorum_queue(channel, "work", "ingress")
    proxy = FaultProxy(AMQP)
    clock = SteppedClock()
    settings = RabbitSettings(
        host=AMQP[0],
        port=proxy.port,
        credentials=lambda: ("guest", "guest"),
        vhost=vhost,
        confirm_timeout=TIMEOUT,
        # 50 messages go out with the first chunk, before the loop runs, and one with the next
        # chunk, which the loop runs; the rest wait for room, that is for confirms.
        confirm_window=51,
        connection_name=f"fabric-test-{uuid.uuid4().hex[:8]}",
    )
    sender = RabbitMqTransport(settings, exchange_for=lambda _m: "ingress", clock=clock)
    batch = messages(100)

    def produce() -> Iterator[OutboundMessage]:
        yield from batch[:50]
        # Pulled by the loop's next chunk, the watchdog's first look due right after it.
        wait_until_confirmed(proxy, 50)  # messages 1-50 are confirmed: the loop reads that next
        # Message 51 reaches the broker only once `meanwhile` lets it: its confirm, read with
        # those of 1-50, would be progress after the source's last step.
        proxy.blackhole()
        clock.advance(2 * TIMEOUT)  # so the first look finds the confirms overdue
        # Message 51 here; the others from inside the callbacks of the confirms of 1-50, up to
        # the end of the batch in the callback of the last one (only it leaves enough room).
        yield from batch[50:]
        clock.advance(2 * TIMEOUT)  # its last step is slow too; the second look comes next
        # The batch is all taken, in the last confirm callback: a timer set now runs in the same
        # turn of the loop, right after the watchdog's second look.
        assert sender._connection is not None
        sender._connection.ioloop.call_later(0, let_51_through)

    def let_51_through() -> None:
        # The broker now gets message 51 and confirms it, and the loop reads that before the
        # watchdog's third look.
        proxy.restore()
        wait_until_confirmed(proxy, 51)

    try:
        outcomes = sender.publish(produce())
    finally:
        sender.close()
        proxy.close()
    assert [o.message_id for o in outcomes] == [m.message_id for m in batch]
    assert [o.failure for o in outcomes if not o.stored] == []
    assert channel.queue_declare("work", passive=True).method.message_count == 100
