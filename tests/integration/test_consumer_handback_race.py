"""The consumer_timeout guard's hand-back with deliveries in flight at its cancel, on the real
local RabbitMQ, through a proxy that reads the frames (tests/integration/faults.py).

The guard cancels its consumer and hands the deliveries it holds back with one ``basic.nack``
(multiple, requeue). The broker may already have sent more when it takes the cancel: they reach
the consumer before the ``cancel-ok``. pika's own cancel rejected each of them (``basic.reject``,
requeue), outside the nack. RabbitMQ 4.3 counts a reject as a failed delivery against a quorum
queue's delivery limit and a nack not (rabbitmq-server#15387); 3.10, the local broker, counts
both once. So the local proof is on the wire: no reject, and the one nack reaches the highest
delivery the consumer got before the ``cancel-ok``.

The race is made deterministic by the proxy: while the first handler runs, it keeps what the
broker sends from the consumer until the consumer sends ``basic.cancel``, and the handler
publishes messages the broker then sends to the consumer (its prefetch has room): all of them
are in flight when the cancel goes out.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from fabric.adapters.rabbitmq import RabbitSettings
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer, consumer_settler
from fabric.consumer import Delivery, MessageProcessor
from tests.integration import test_dead_letters as dead_letters
from tests.integration.conftest import AMQP, GUEST
from tests.integration.faults import FaultProxy, Frame, is_method
from tests.integration.queue_waits import settled_empty
from tests.integration.test_consumer_guards import delivery_counts

pytestmark = pytest.mark.integration
amqp, settings = dead_letters.amqp, dead_letters.settings  # the broker's fixture and settings

BASIC_CANCEL = (60, 30)
BASIC_CANCEL_OK = (60, 31)
BASIC_DELIVER = (60, 60)
BASIC_REJECT = (60, 90)
BASIC_NACK = (60, 120)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    faults = FaultProxy(AMQP)
    yield faults
    faults.close()


@pytest.fixture
def queues(amqp: Any) -> Iterator[tuple[str, str]]:
    """A quorum queue of this test's own, with a delivery limit of 1 (a message returned twice
    is dead-lettered), and its dead-letter queue; both deleted afterwards."""
    name = f"handback-race-{uuid.uuid4().hex[:12]}"
    dlq = f"{name}.dlq"
    amqp.queue_declare(dlq, durable=True, arguments={"x-queue-type": "quorum"})
    amqp.queue_declare(
        name,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": 1,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dlq,
        },
    )
    yield name, dlq
    amqp.queue_delete(name)
    amqp.queue_delete(dlq)


def publish(channel: Any, queue: str, message_id: str) -> None:
    channel.basic_publish(
        "",
        queue,
        b'{"note": "not child data"}',
        pika.BasicProperties(message_id=message_id, type="community.update", delivery_mode=2),
    )


def delivery_tag(frame: Frame) -> int:
    """The delivery tag of a ``basic.deliver`` (after its consumer tag) or ``basic.nack``."""
    at = 4
    if frame.method == BASIC_DELIVER:
        at += 1 + frame.payload[at]  # the consumer tag, a short string
    return int(struct.unpack_from(">Q", frame.payload, at)[0])


def test_deliveries_in_flight_at_the_cancel_go_back_with_the_hand_back_nack(
    broker_vhost: str,
    amqp: Any,
    proxy: FaultProxy,
    *,
    queues: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before, pika's cancel rejected each delivery in flight at the cancel: on RabbitMQ 4.3 each
    # of those messages came back one failed delivery nearer the queue's delivery limit for a
    # hand-back that says nothing about it, and a slow spell dead-lettered healthy messages.
    queue, dlq = queues
    deliveries = delivery_counts(monkeypatch)
    ready = [f"ready-{i:02d}" for i in range(5)]
    late = [f"late-{i:02d}" for i in range(20)]  # in flight when the consumer cancels
    for message_id in ready:
        publish(amqp, queue, message_id)
    handled: list[str] = []

    def sent_to_consumer() -> list[Frame]:
        return [f for to_client, f in list(proxy.seen) if to_client and f.method == BASIC_DELIVER]

    def handler(delivery: Delivery) -> None:
        handled.append(delivery.message_id)
        if len(handled) > 1:
            return
        started = time.monotonic()
        proxy.hold_replies(until=is_method(BASIC_CANCEL))
        for message_id in late:
            publish(amqp, queue, message_id)
        while len(sent_to_consumer()) < len(ready) + len(late):
            assert time.monotonic() - started < 5, "the broker did not send the late messages"
            time.sleep(0.01)
        # Slow: the next delivery may have waited past half the consumer timeout (1 s).
        time.sleep(max(0.0, 1.2 - (time.monotonic() - started)))

    consumer = RabbitMqConsumer(
        RabbitSettings(AMQP[0], proxy.port, lambda: GUEST, vhost=broker_vhost),
        queue,
        MessageProcessor(handler),
        prefetch=50,
        settler=consumer_settler(
            settings(broker_vhost), dead_letters.WORK, consumer="consumer:handback-race"
        ),
        consumer_timeout_s=2.0,
    )
    total = len(ready) + len(late)
    with caplog.at_level(logging.WARNING, logger="fabric.adapters.rabbitmq_consumer"):
        counts = consumer.run(max_messages=total, idle_timeout_s=5)

    assert counts == {"done": total}
    assert sorted(handled) == sorted(ready + late), "each handled once, none lost"
    frames = list(proxy.seen)
    cancel_ok = next(i for i, (to_client, f) in enumerate(frames) if f.method == BASIC_CANCEL_OK)
    received = [
        delivery_tag(f)
        for to_client, f in frames[:cancel_ok]
        if to_client and f.method == BASIC_DELIVER
    ]
    assert len(received) == total, "all came before the cancel-ok"
    sent = [f for to_client, f in frames if not to_client]
    assert not [f for f in sent if f.method == BASIC_REJECT], "no delivery was rejected"
    nacks = [f for f in sent if f.method == BASIC_NACK]
    assert len(nacks) == 1, "one nack hands everything back"
    bits = nacks[0].payload[12]
    assert bits == 0b11, "multiple, requeue"
    assert delivery_tag(nacks[0]) == max(received), "up to the last delivery before cancel-ok"
    # The run asked for ``total`` messages prefetches no more than that: halved from 25, not 50.
    back_once = f"{total - 1} handed back to the queue, prefetch now {total // 2}"
    assert caplog.text.count(back_once) == 1
    # One hand-back: each message came back at most once (a second return would have
    # dead-lettered it at this queue's delivery limit of 1), and nothing was parked.
    assert max(count for each in deliveries.values() for count in each) <= 1, deliveries
    assert all(len(each) == 1 for each in deliveries.values()), "each taken once"
    settled_empty(amqp, dlq, queue)


def test_a_stopped_consumer_hands_what_it_holds_back_with_one_nack(
    broker_vhost: str, amqp: Any, proxy: FaultProxy, queues: tuple[str, str]
) -> None:
    # Before, pika's cancel rejected each delivery the consumer held and had not handled when it
    # stopped (prefetched, or taken when it found ``stop`` set): on RabbitMQ 4.3 every stop of a
    # consumer (every deploy) spent one failed delivery of each of up to a prefetch of messages.
    queue, dlq = queues
    ids = [f"held-{i:02d}" for i in range(10)]
    for message_id in ids:
        publish(amqp, queue, message_id)
    stop = threading.Event()
    handled: list[str] = []

    def handler(delivery: Delivery) -> None:
        handled.append(delivery.message_id)
        stop.set()
        time.sleep(0.2)  # the broker sends the rest of the prefetch meanwhile

    consumer = RabbitMqConsumer(
        RabbitSettings(AMQP[0], proxy.port, lambda: GUEST, vhost=broker_vhost),
        queue,
        MessageProcessor(handler),
        prefetch=10,
        settler=consumer_settler(
            settings(broker_vhost), dead_letters.WORK, consumer="consumer:handback-race"
        ),
    )
    assert consumer.run(stop=stop) == {"done": 1}

    frames = list(proxy.seen)
    cancel_ok = next(i for i, (_, f) in enumerate(frames) if f.method == BASIC_CANCEL_OK)
    received = [
        delivery_tag(f)
        for to_client, f in frames[:cancel_ok]
        if to_client and f.method == BASIC_DELIVER
    ]
    assert len(received) == len(ids), "the whole prefetch reached the consumer"
    sent = [f for to_client, f in frames if not to_client]
    assert not [f for f in sent if f.method == BASIC_REJECT], "no delivery was rejected"
    nacks = [f for f in sent if f.method == BASIC_NACK]
    assert [(delivery_tag(f), f.payload[12]) for f in nacks] == [(max(received), 0b11)]
    # All but the handled one are back in the queue, each returned once, none parked.
    assert dead_letters.settled_depth(amqp, queue, len(ids) - 1) == len(ids) - 1
    back = {}
    while (got := amqp.basic_get(queue, auto_ack=True))[0] is not None:
        back[got[1].message_id] = got[1].headers["x-delivery-count"]
    assert back == dict.fromkeys(set(ids) - set(handled), 1)
    settled_empty(amqp, dlq)
