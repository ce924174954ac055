"""What bounds the long-running consumer, on the real local RabbitMQ: the queue's delivery limit
(``topology.DELIVERY_LIMIT``, *L*) for a message that keeps coming back, and ``max_messages``
through an outage.

A quorum queue counts each return of a message (``x-delivery-count``) and dead-letters it
itself, without an audit record, on the return that takes the count past *L*: the delivery
carrying *L* still reaches a handler. So the toolkit runs the handler on every delivery, and
where it hands deliveries back itself (the end of a run, a stop, the consumer_timeout guard, an
exception unwinding ``run``) it parks one carrying *L* as ``max-receives``, with its audit
record, instead of returning it to the broker's silent dead letter.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from fabric import topology
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
from fabric.audit import decode_audit_batch
from fabric.consumer import Delivery, MessageProcessor, Systemic
from fabric.envelope import new_message_id
from tests.integration import test_dead_letters as dead_letters
from tests.integration.conftest import AMQP
from tests.integration.queue_waits import depth, settled_depth, settled_empty

pytestmark = pytest.mark.integration
WORK, DLQ = dead_letters.WORK, dead_letters.DLQ
LIMIT = topology.DELIVERY_LIMIT
publish = dead_letters.publish
amqp, settings = dead_letters.amqp, dead_letters.settings  # the broker's fixture and settings


class Crashed(BaseException):
    """What a handler raises that no ``except Exception`` catches: a ``KeyboardInterrupt``, a
    ``SystemExit`` from a SIGTERM handler. It unwinds ``run``, which hands back what it holds."""


def audit_records(channel: Any) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    while True:
        method, _, body = channel.basic_get(topology.AUDIT_QUEUE, auto_ack=True)
        if method is None:
            return records
        records += decode_audit_batch(body).records


def events(channel: Any) -> list[tuple[str, Any, Any]]:
    """(event, message id, reason) of every audit record the consumers sent, taken off the
    queue."""
    return [(r["event"], r["message_id"], r.get("reason")) for r in audit_records(channel)]


def take(channel: Any, queue: str, count: int) -> list[tuple[str, dict[str, Any]]]:
    """(message id, headers) of ``count`` messages taken off ``queue`` (waiting for them)."""
    assert settled_depth(channel, queue, count) == count
    taken = []
    for _ in range(count):
        method, properties, _ = channel.basic_get(queue, auto_ack=True)
        assert method is not None
        taken.append((properties.message_id, properties.headers or {}))
    return taken


def hand_back(channel: Any, message_ids: list[str], times: int) -> None:
    """Takes the messages off the work queue ``times`` over and returns them unhandled
    (``basic.nack``, requeue): what a run's end, a stop or the consumer_timeout guard does to
    the deliveries it holds, each return counted by the broker (RabbitMQ 3.10 to 4.2)."""
    for _ in range(times):
        held: list[int] = []
        deadline = time.monotonic() + 5
        while len(held) < len(message_ids):
            assert time.monotonic() < deadline, "the returned messages did not come back"
            method, _, _ = channel.basic_get(WORK, auto_ack=False)
            if method is not None:
                held.append(method.delivery_tag)
        for tag in held:
            channel.basic_nack(tag, requeue=True)


def test_a_healthy_message_handed_back_to_the_limit_is_still_handled(
    broker_vhost: str, amqp: Any
) -> None:
    # Ten returns that were no failure of the message (runs that ended, stops, the
    # consumer_timeout guard, failed Lambda invocations of its batch: all counted on 3.10 to
    # 4.2). Before, the toolkit parked its next delivery as max-receives before the handler
    # ran, though the broker would still have given it to the handler.
    message_id = new_message_id()
    publish(amqp, WORK, message_id)
    hand_back(amqp, [message_id], LIMIT)
    seen: list[tuple[str, int]] = []

    def handler(delivery: Delivery) -> None:
        seen.append((delivery.message_id, delivery.delivery_count))

    consumer = RabbitMqConsumer(settings(broker_vhost), WORK, MessageProcessor(handler))
    assert consumer.run(max_messages=1, idle_timeout_s=2) == {"done": 1}

    assert seen == [(message_id, LIMIT)]
    assert events(amqp) == [("delivered", message_id, None)]
    settled_empty(amqp, WORK, DLQ)


def test_a_run_that_ends_holding_a_delivery_at_the_limit_parks_it_with_a_record(
    broker_vhost: str, amqp: Any
) -> None:
    # Two messages returned ten times each, and a fresh one behind them. A run that handles one
    # message ends holding the other two: returned once more, the one at the limit was
    # dead-lettered by the broker, silently (x-death delivery_limit, no dead-lettered record:
    # the compliance report undercounted). The toolkit parks it instead, before its one nack
    # hands the fresh one back (a multiple nack covers every lower tag: the park comes first).
    at_limit = [new_message_id(), new_message_id()]
    for message_id in at_limit:
        publish(amqp, WORK, message_id)
    hand_back(amqp, at_limit, LIMIT)
    fresh = new_message_id()
    publish(amqp, WORK, fresh)  # behind the returned ones: a quorum queue serves returns first
    handled: list[tuple[str, int]] = []
    stop = threading.Event()

    def handler(delivery: Delivery) -> None:
        handled.append((delivery.message_id, delivery.delivery_count))
        stop.set()  # ends the run holding what it prefetched (max_messages would prefetch less)

    consumer = RabbitMqConsumer(settings(broker_vhost), WORK, MessageProcessor(handler))
    counts = consumer.run(stop=stop)

    assert counts == {"done": 1, "dead-letter": 1}
    ((first, count),) = handled
    assert first in at_limit
    assert count == LIMIT, "the delivery carrying the limit reached its handler"
    (other,) = set(at_limit) - {first}
    ((parked, headers),) = take(amqp, DLQ, 1)
    assert parked == other
    assert headers[topology.DEAD_LETTER_REASON_HEADER] == "max-receives"
    assert "x-death" not in headers, "parked by the toolkit, not dead-lettered by the broker"
    ((back, headers),) = take(amqp, WORK, 1)
    assert (back, headers.get("x-delivery-count")) == (fresh, 1), "handed back, once"
    assert events(amqp) == [
        ("delivered", first, None),
        ("dead-lettered", other, "max-receives"),
    ]
    settled_empty(amqp, WORK, DLQ)


def test_runs_asked_for_one_message_each_hand_back_no_more_than_one(
    broker_vhost: str, amqp: Any
) -> None:
    # With the prefetch (20) taken whatever max_messages asked, each run of one message ended
    # holding the next 19 and handed them back: in a loop of such runs the eleventh message had
    # come back ten times before its turn and was parked unhandled. A run of N takes at most N.
    message_ids = [new_message_id() for _ in range(LIMIT + 2)]
    for message_id in message_ids:
        publish(amqp, WORK, message_id)
    handled: list[tuple[str, int]] = []

    def handler(delivery: Delivery) -> None:
        handled.append((delivery.message_id, delivery.delivery_count))

    consumer = RabbitMqConsumer(settings(broker_vhost), WORK, MessageProcessor(handler))
    for _ in message_ids:
        assert consumer.run(max_messages=1, idle_timeout_s=5) == {"done": 1}

    assert [message_id for message_id, _ in handled] == message_ids
    assert max(count for _, count in handled) <= 1, handled
    settled_empty(amqp, WORK, DLQ)


def test_the_consumer_timeout_guard_parks_a_delivery_at_the_limit_instead_of_handing_it_back(
    broker_vhost: str, amqp: Any
) -> None:
    # The guard hands back what waited too long behind a slow handler: returned, a delivery
    # carrying the limit was dead-lettered by the broker without a record.
    at_limit = [new_message_id(), new_message_id()]
    for message_id in at_limit:
        publish(amqp, WORK, message_id)
    hand_back(amqp, at_limit, LIMIT)
    handled: list[str] = []

    def slow(delivery: Delivery) -> None:
        handled.append(delivery.message_id)
        time.sleep(1.2)  # the next delivery may have waited past half the timeout (1 s)

    consumer = RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(slow), consumer_timeout_s=2.0
    )
    counts = consumer.run(idle_timeout_s=1)

    assert counts == {"done": 1, "dead-letter": 1}
    (first,) = handled
    (other,) = set(at_limit) - {first}
    ((parked, headers),) = take(amqp, DLQ, 1)
    assert parked == other
    assert headers[topology.DEAD_LETTER_REASON_HEADER] == "max-receives"
    assert "x-death" not in headers
    assert events(amqp) == [
        ("delivered", first, None),
        ("dead-lettered", other, "max-receives"),
    ]
    settled_empty(amqp, WORK, DLQ)


def test_a_consumer_stopped_during_a_systemic_pause_hands_the_message_back_once(
    broker_vhost: str, amqp: Any
) -> None:
    # Before, the paused message was nacked while the consumer still consumed: the broker sent
    # it straight back, the consumer took it, found ``stop`` set and nacked it again. Two
    # deliveries of its limit for one stop, in an outage, which is not its fault.
    message_id = new_message_id()
    publish(amqp, WORK, message_id)
    stop = threading.Event()

    def handler(_delivery: Delivery) -> None:
        stop.set()
        raise Systemic("the database is down")

    consumer = RabbitMqConsumer(settings(broker_vhost), WORK, MessageProcessor(handler))
    assert consumer.run(stop=stop) == {"systemic": 1}

    ((back, headers),) = take(amqp, WORK, 1)
    assert (back, headers.get("x-delivery-count")) == (message_id, 1)
    assert events(amqp) == []
    settled_empty(amqp, WORK, DLQ)


def test_an_exception_unwinding_the_run_costs_each_held_delivery_one_return(
    broker_vhost: str, amqp: Any
) -> None:
    # A KeyboardInterrupt (or a SIGTERM handler's SystemExit) during a handler left the held
    # deliveries to the connection's closure with the consumer still live: pika rejected the
    # prefetched ones, the broker sent them straight back to it, and the closure returned them
    # again. Each message came back two deliveries nearer the limit for one exit.
    ids = [new_message_id() for _ in range(4)]
    for message_id in ids:
        publish(amqp, WORK, message_id)
    handled: list[str] = []

    def handler(delivery: Delivery) -> None:
        handled.append(delivery.message_id)
        raise KeyboardInterrupt

    consumer = RabbitMqConsumer(settings(broker_vhost), WORK, MessageProcessor(handler))
    with pytest.raises(KeyboardInterrupt):
        consumer.run(idle_timeout_s=2)

    assert handled == ids[:1]
    returned = take(amqp, WORK, len(ids))
    assert sorted(message_id for message_id, _ in returned) == sorted(ids)
    counts = {message_id: headers.get("x-delivery-count") for message_id, headers in returned}
    assert counts == dict.fromkeys(ids, 1)
    assert events(amqp) == []
    settled_empty(amqp, WORK, DLQ)


def test_a_message_that_crashes_its_handler_every_time_gets_every_delivery_then_a_record(
    broker_vhost: str, amqp: Any
) -> None:
    # The honest outcome for a handler that raises what nothing catches on every delivery of a
    # message: each exit hands the message back, one return each; the handler runs on every
    # delivery the broker makes (counts 0 to the limit: limit + 1 runs); the exit on the last
    # one parks it as max-receives with its record instead of returning it to the broker's
    # silent dead letter. Before, the toolkit parked that last delivery without running the
    # handler. (A process that is killed cannot hand anything back: the next test.)
    message_id = new_message_id()
    publish(amqp, WORK, message_id)
    tries: list[int] = []

    def crashes(delivery: Delivery) -> None:
        tries.append(delivery.delivery_count)
        raise Crashed

    outcomes: list[object] = []
    for _ in range(LIMIT + 1):
        consumer = RabbitMqConsumer(settings(broker_vhost), WORK, MessageProcessor(crashes))
        try:
            outcomes.append(consumer.run(max_messages=1, idle_timeout_s=2))
        except Crashed:
            outcomes.append("crashed")

    assert tries == list(range(LIMIT + 1)), "the handler ran on every delivery"
    assert outcomes == ["crashed"] * (LIMIT + 1)
    ((parked, headers),) = take(amqp, DLQ, 1)
    assert parked == message_id
    assert headers[topology.DEAD_LETTER_REASON_HEADER] == "max-receives"
    assert "x-death" not in headers, "parked by the toolkit, not by the broker"
    assert events(amqp) == [("dead-lettered", message_id, "max-receives")]
    settled_empty(amqp, WORK, DLQ)


KILLED_CONSUMER = textwrap.dedent(
    """
    import os, signal, sys
    from fabric import topology
    from fabric.adapters.rabbitmq import RabbitSettings
    from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
    from fabric.consumer import MessageProcessor
    from fabric.stakeholders import Stakeholder

    host, port, vhost, poison = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

    def handler(delivery):
        print("handled", delivery.message_id, delivery.delivery_count, flush=True)
        if delivery.message_id == poison:
            os.kill(os.getpid(), signal.SIGKILL)

    settings = RabbitSettings(host=host, port=port, credentials=lambda: ("guest", "guest"),
                              vhost=vhost)
    queue = topology.queue_name(Stakeholder.COMMUNITY)
    RabbitMqConsumer(settings, queue, MessageProcessor(handler), prefetch=1).run(idle_timeout_s=1)
    """
)


def test_a_message_that_kills_its_process_every_time_is_left_to_the_broker_limit(
    broker_vhost: str, amqp: Any
) -> None:
    # The one silent dead letter left: a process killed (SIGKILL, out of memory) with the
    # message cannot hand it back, and the broker dead-letters it on the return past the limit,
    # with x-death delivery_limit and no audit record (BrokerDlqDepth alarms on it). The handler
    # ran on every delivery; a message prefetched behind it (prefetch 1 here: none) would have
    # lost a delivery with each kill without running.
    poison, innocent = new_message_id(), new_message_id()
    publish(amqp, WORK, poison)
    publish(amqp, WORK, innocent)
    runs: list[list[tuple[str, int]]] = []
    for _ in range(LIMIT + 2):
        process = subprocess.run(
            [sys.executable, "-c", KILLED_CONSUMER, *map(str, AMQP), broker_vhost, poison],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        handled = [line.split() for line in process.stdout.splitlines()]
        runs.append([(message_id, int(count)) for _, message_id, count in handled])
        if process.returncode != -signal.SIGKILL:
            assert process.returncode == 0, process.stderr[-2000:]
            break

    assert [run[0] for run in runs[: LIMIT + 1]] == [(poison, n) for n in range(LIMIT + 1)]
    assert runs[-1] == [(innocent, 0)], "then the next message, untouched by the kills"
    (letter,) = dead_letters.dead_letter_queue(broker_vhost).peek(10)
    assert (letter.message_id, letter.reason) == (poison, "delivery_limit")
    assert events(amqp) == [("delivered", innocent, None)], "no dead-lettered record"
    settled_empty(amqp, WORK)


def test_a_run_asked_for_some_messages_takes_that_many_through_a_dependency_outage(
    broker_vhost: str, amqp: Any
) -> None:
    # Each wait of a systemic pause counted as a message: asked for 5, a run that met three
    # failed tries stopped after 2 messages and left 3 in the queue.
    ids = [new_message_id() for _ in range(5)]
    for message_id in ids:
        publish(amqp, WORK, message_id)
    outage, done = [3], []

    def handler(delivery: Delivery) -> None:
        if outage[0]:
            outage[0] -= 1
            raise Systemic("the database is down")
        done.append(delivery.message_id)

    counts = RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(handler), backoff_s=0.01, max_backoff_s=0.01
    ).run(max_messages=5, idle_timeout_s=5)

    assert sorted(done) == sorted(ids)
    assert counts == {"systemic": 3, "done": 5}
    assert depth(amqp, WORK) == 0
