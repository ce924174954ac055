"""The RabbitMQ transport against the real broker: confirmed means stored, and failures say so."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.ports import Failure, OutboundMessage
from tests.integration.conftest import AMQP, management
from tests.integration.faults import FaultProxy

pytestmark = pytest.mark.integration


def transport(vhost: str, exchange: str, **overrides: Any) -> RabbitMqTransport:
    """A transport onto ``exchange``. Its connect timeout is wide, so an AMQP handshake slowed
    by a busy shared broker is not taken for an outage: a test of that bound passes its own."""
    overrides.setdefault("connect_timeout", 10)
    settings = RabbitSettings(
        host=AMQP[0],
        port=overrides.pop("port", AMQP[1]),
        credentials=lambda: ("guest", "guest"),
        vhost=vhost,
        connection_name=f"fabric-test-{uuid.uuid4().hex[:8]}",
        **overrides,
    )
    return RabbitMqTransport(settings, exchange_for=lambda _m: exchange)


def messages(count: int, topic: str = "work.item") -> list[OutboundMessage]:
    return [
        OutboundMessage(str(uuid.uuid4()), topic, b'{"n": %d}' % i, frozenset())
        for i in range(count)
    ]


def quorum_queue(channel: Any, name: str, exchange: str, **arguments: Any) -> None:
    channel.exchange_declare(exchange, "topic", durable=True)
    channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum", **arguments})
    channel.queue_bind(name, exchange, "#")


def test_every_confirmed_message_is_in_the_queue(vhost: str, channel: Any) -> None:
    quorum_queue(channel, "work", "ingress")
    sender = transport(vhost, "ingress", confirm_window=50)
    batch = messages(1000)
    outcomes = sender.publish(batch)
    assert [o.message_id for o in outcomes] == [m.message_id for m in batch]
    assert all(o.stored and o.transport == "rabbitmq" for o in outcomes)
    assert channel.queue_declare("work", passive=True).method.message_count == 1000
    _method, properties, body = channel.basic_get("work", auto_ack=True)
    assert properties.delivery_mode == 2
    assert properties.message_id == batch[0].message_id
    assert body == batch[0].body
    sender.close()


def test_publishes_written_together_arrive_whole_and_in_order(vhost: str, channel: Any) -> None:
    # Frames of many publishes go out in one write; bodies larger than a frame (128 KiB) are
    # split into several body frames, and every message must still arrive byte for byte.
    quorum_queue(channel, "mixed", "ingress")
    sizes = [0, 1, 131_064, 131_065, 400_000, 7, *range(10, 2_000, 37)]
    batch = [
        OutboundMessage(str(uuid.uuid4()), "work.item", bytes([i % 251]) * size, frozenset())
        for i, size in enumerate(sizes)
    ]
    sender = transport(vhost, "ingress")
    assert all(o.stored for o in sender.publish(batch))
    received = []
    for _ in batch:
        _method, properties, body = channel.basic_get("mixed", auto_ack=True)
        received.append((properties.message_id, body))
    assert received == [(m.message_id, m.body) for m in batch]
    sender.close()


def test_a_message_no_queue_takes_is_returned_not_accepted(vhost: str, channel: Any) -> None:
    channel.exchange_declare("empty", "topic", durable=True)
    (outcome,) = transport(vhost, "empty").publish(messages(1))
    assert outcome.failure is Failure.RETURNED
    assert not outcome.stored


def test_a_full_queue_with_reject_publish_nacks_the_overflow(vhost: str, channel: Any) -> None:
    quorum_queue(channel, "small", "ingress", **{"x-max-length": 5, "x-overflow": "reject-publish"})
    sender = transport(vhost, "ingress")
    # One at a time: a quorum queue applies its limit as appends are committed, so a burst that
    # is already in flight can overshoot it; later publishes are refused.
    outcomes = [sender.publish([message])[0] for message in messages(20)]
    stored = [o.stored for o in outcomes].count(True)
    assert 5 <= stored < 10
    assert {o.failure for o in outcomes if not o.stored} == {Failure.NACKED}
    assert channel.queue_declare("small", passive=True).method.message_count == stored


def test_an_unreachable_broker_is_reported_within_the_connect_timeout(vhost: str) -> None:
    started = time.monotonic()
    outcomes = transport(vhost, "ingress", port=1, connect_timeout=0.5).publish(messages(3))
    assert [o.failure for o in outcomes] == [Failure.UNAVAILABLE] * 3
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("fault", ["blackhole", "refuse"])
def test_a_broker_that_does_not_answer_costs_one_connection_attempt(vhost: str, fault: str) -> None:
    # A second connection in the same call would only wait out the same timeout again: an
    # emergency that probes a dead broker would be answered after 2 s instead of 1.
    proxy = FaultProxy(AMQP)
    getattr(proxy, fault)()
    sender = transport(vhost, "ingress", port=proxy.port, connect_timeout=1.0)
    started = time.monotonic()
    try:
        outcomes = sender.publish(messages(3))
        elapsed = time.monotonic() - started
    finally:
        proxy.close()
    assert [o.failure for o in outcomes] == [Failure.UNAVAILABLE] * 3
    assert proxy.attempts == 1
    assert elapsed < 1.9


def test_a_connection_closed_behind_its_back_is_replaced_on_next_use(
    vhost: str, channel: Any
) -> None:
    quorum_queue(channel, "work", "ingress")
    sender = transport(vhost, "ingress")
    assert all(o.stored for o in sender.publish(messages(5)))
    name = sender._settings.connection_name
    for connection in management("GET", "connections"):
        if connection.get("client_properties", {}).get("connection_name") == name:
            management("DELETE", f"connections/{connection['name']}")
    time.sleep(0.5)
    assert all(o.stored for o in sender.publish(messages(5)))
    assert channel.queue_declare("work", passive=True).method.message_count == 10


@pytest.mark.parametrize("window", [None, 50])
def test_meanwhile_runs_once_after_every_message_reached_the_broker(
    vhost: str, channel: Any, window: int | None
) -> None:
    # It runs while the transport waits for confirms: by then every message must already be on
    # its way, or the broker could not store the last chunk while the caller's work goes on.
    # With a small window the last chunk is published in a confirm's callback, whose turn of
    # the loop scheduled meanwhile before pika wrote that chunk (then 950 to 990 of 1000).
    quorum_queue(channel, "work", "ingress")
    batch = messages(1000)
    sent: list[int] = []
    queued: list[int] = []

    def produce() -> Iterator[OutboundMessage]:
        for message in batch:
            sent.append(1)
            yield message

    def meanwhile() -> None:
        queued.append(len(sent))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the I/O loop is ours: nothing more is sent now
            count = channel.queue_declare("work", passive=True).method.message_count
            if count == len(batch):
                break
            time.sleep(0.05)
        queued.append(count)

    sender = transport(vhost, "ingress", **({} if window is None else {"confirm_window": window}))
    outcomes = sender.publish(produce(), meanwhile=meanwhile)
    assert queued == [1000, 1000]  # called once, with every message taken and in the queue
    assert all(o.stored for o in outcomes)
    sender.close()


def test_a_failing_meanwhile_fails_the_call_and_the_next_call_reconnects(
    vhost: str, channel: Any
) -> None:
    quorum_queue(channel, "work", "ingress")
    sender = transport(vhost, "ingress")

    def broken() -> None:
        raise RuntimeError("the caller's own bug")

    with pytest.raises(RuntimeError, match="own bug"):
        sender.publish(messages(5), meanwhile=broken)  # their fate unknown: no confirm awaited
    later = messages(5)
    assert all(o.stored for o in sender.publish(later))
    stored = []
    while (got := channel.basic_get("work", auto_ack=True))[0] is not None:
        stored.append(got[1].message_id)
    assert stored[-5:] == [m.message_id for m in later]
