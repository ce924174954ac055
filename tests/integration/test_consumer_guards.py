"""The consumer toolkit's two time guards, on the real local RabbitMQ and moto's DynamoDB.

An emergency whose consumer crashed mid-handler is blocked by its record in progress for the
emergency handler's deadline (seconds), not a minute or a Lambda's whole timeout; the
long-running consumer hands prefetched deliveries back before they wait out the broker's
``consumer_timeout`` behind slow handlers (one delivery counted each, and never a fresh delivery
to a consumer that was idle); and it acknowledges a finished message before a slow handler
after it runs.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import boto3
import pytest

from fabric.adapters import rabbitmq_consumer
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
from fabric.consumer import (
    EMERGENCY_PROCESSING_TIMEOUT_S,
    Delivery,
    Idempotency,
    InProgress,
    MessageProcessor,
    rabbitmq_delivery,
)
from tests.integration import test_dead_letters as dead_letters
from tests.integration.aws_fallback import REGION
from tests.integration.queue_waits import settled_empty

WORK, EMERGENCY_WORK = dead_letters.WORK, dead_letters.EMERGENCY_WORK
publish, depth = dead_letters.publish, dead_letters.depth
# The broker's fixture, its settings and moto's idempotency table, shared with the drills.
amqp, settings, table = dead_letters.amqp, dead_letters.settings, dead_letters.table


class Crashed(BaseException):
    """The consumer's process dies mid-handler: nothing catches it, so nothing is cleaned up
    (Powertools deletes a record in progress only for an ``Exception``)."""


def in_progress_records(table_name: str) -> list[dict[str, Any]]:
    client = boto3.client("dynamodb", region_name=REGION)
    items = client.scan(TableName=table_name)["Items"]
    return [item for item in items if item["status"]["S"] == "INPROGRESS"]


def test_an_emergency_whose_consumer_crashed_mid_handler_runs_again_within_seconds(
    broker_vhost: str, amqp: Any, table: str
) -> None:
    # Before, the record in progress of a crashed consumer stood for 60 s (a Lambda's remaining
    # time inside Lambda): every copy of the alert met it and waited another second in the
    # retry tier, for a minute, before the alert reached anyone.
    def crashes(delivery: Delivery) -> None:
        raise Crashed

    publish(amqp, EMERGENCY_WORK, "child-alert")
    first = RabbitMqConsumer(
        settings(broker_vhost),
        EMERGENCY_WORK,
        MessageProcessor(crashes, idempotency=Idempotency(table, consumer="alerts")),
    )
    with pytest.raises(Crashed):
        first.run(max_messages=1, idle_timeout_s=5)
    crashed_at = time.monotonic()
    assert len(in_progress_records(table)) == 1, "the crash left its record in progress"

    handled: list[tuple[float, int]] = []
    stop = threading.Event()

    def handler(delivery: Delivery) -> None:
        handled.append((time.monotonic() - crashed_at, delivery.attempt))
        stop.set()

    give_up = threading.Timer(20, stop.set)  # the old 60 s window would still be blocking
    give_up.start()
    try:
        counts = RabbitMqConsumer(  # another instance, as after a restart: its own store
            settings(broker_vhost),
            EMERGENCY_WORK,
            MessageProcessor(handler, idempotency=Idempotency(table, consumer="alerts")),
        ).run(stop=stop, idle_timeout_s=20)
    finally:
        give_up.cancel()

    assert len(handled) == 1, f"the alert was not processed again ({counts})"
    after, attempt = handled[0]
    # Never while the crashed copy was within its deadline; then within a retry tier (1 s).
    assert EMERGENCY_PROCESSING_TIMEOUT_S - 1 < after < EMERGENCY_PROCESSING_TIMEOUT_S + 3
    assert attempt == 1, "waiting out the crashed copy spent none of the alert's attempts"
    assert counts["done"] == 1
    assert counts["retry"] >= 1
    settled_empty(amqp, EMERGENCY_WORK)


class LambdaContext:
    """What the Lambda runtime hands a function: its invocation has ``seconds`` left."""

    def __init__(self, seconds: float) -> None:
        self._until = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return int((self._until - time.monotonic()) * 1000)


def test_in_lambda_an_emergency_is_blocked_for_its_deadline_not_the_invocations_time(
    table: str,
) -> None:
    # An Amazon MQ event source's function has a timeout of minutes. A function that died of
    # lack of memory mid-handler left a record standing for the rest of that time: a copy of an
    # emergency was held back for up to 15 minutes. A normal message keeps the invocation's
    # time: its handler may legitimately run that long.
    def crashes(delivery: Delivery) -> None:
        raise Crashed

    processed: list[str] = []
    crashed = Idempotency(table, consumer="alerts", emergency_timeout_s=1.0)
    for queue in (EMERGENCY_WORK, WORK):
        with pytest.raises(Crashed):
            crashed.run(crashes, Delivery("m-" + queue, "t", b"{}", queue), LambdaContext(900))

    time.sleep(1.5)
    retried = Idempotency(table, consumer="alerts", emergency_timeout_s=1.0)
    retried.run(
        lambda d: processed.append(d.message_id),
        Delivery("m-" + EMERGENCY_WORK, "t", b"{}", EMERGENCY_WORK),
        LambdaContext(900),
    )
    with pytest.raises(InProgress):
        retried.run(
            lambda d: processed.append(d.message_id),
            Delivery("m-" + WORK, "t", b"{}", WORK),
            LambdaContext(900),
        )

    assert processed == ["m-" + EMERGENCY_WORK]


def test_an_emergency_handler_past_its_deadline_is_logged_as_no_longer_guarded(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The decision's price: a handler that overruns its deadline no longer blocks a copy.
    # The log says so, so that a team whose handler is slower than its deadline finds out.
    side_effects: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def slow(delivery: Delivery) -> None:
        inside.set()
        release.wait(5)
        side_effects.append(delivery.message_id)

    alert = Delivery("late-alert", "t", b"{}", EMERGENCY_WORK)
    idempotency = Idempotency(table, consumer="alerts", emergency_timeout_s=0.5)
    with caplog.at_level(logging.WARNING, logger="fabric.consumer"):
        worker = threading.Thread(target=lambda: idempotency.run(slow, alert))
        worker.start()
        assert inside.wait(5)
        time.sleep(0.8)  # the first copy's handler is still running, past its deadline
        Idempotency(table, consumer="alerts", emergency_timeout_s=0.5).run(
            lambda d: side_effects.append(d.message_id), alert
        )
        release.set()
        worker.join(5)

    assert side_effects == ["late-alert", "late-alert"]
    assert "past its in-progress window" in caplog.text


# -- consumer_timeout ---------------------------------------------------------------------------


def delivery_counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The broker's ``x-delivery-count`` of each delivery the consumer takes, per message id
    (the toolkit keeps string headers only, so a handler does not see it)."""
    counts: dict[str, list[int]] = {}

    def recording(queue: str, **fields: Any) -> Delivery:
        count = (fields["headers"] or {}).get("x-delivery-count", 0)
        counts.setdefault(fields["message_id"], []).append(count)
        return rabbitmq_delivery(queue, **fields)

    monkeypatch.setattr(rabbitmq_consumer, "rabbitmq_delivery", recording)
    return counts


def test_deliveries_waiting_behind_slow_handlers_go_back_before_the_consumer_timeout(
    broker_vhost: str,
    amqp: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The broker closes the channel when a delivery stays unacknowledged past its
    # consumer_timeout, and the time a delivery waits in the prefetch window counts: every
    # prefetched message came back one delivery nearer the delivery limit, the acknowledgement
    # of the handler under way was lost, and run() raised. The local broker's timeout is 30
    # minutes; the guard is shown against a consumer_timeout_s of 5.6 s (it acts at half,
    # 2.8 s): the third handler starts 2 s after the consumer began counting, 0.8 s inside
    # the bound for a loaded host's overhead, and the fourth at least 3 s after, past it.
    deliveries = delivery_counts(monkeypatch)
    # Six prefetched (three handed back), and one behind them that refills the halved window.
    ids = [f"slow-{i:02d}" for i in range(7)]
    for message_id in ids:
        publish(amqp, WORK, message_id)
    seen: list[tuple[str, bool]] = []

    def handler(delivery: Delivery) -> None:
        seen.append((delivery.message_id, delivery.redelivered))
        time.sleep(1.0)

    consumer = RabbitMqConsumer(
        settings(broker_vhost),
        WORK,
        MessageProcessor(handler),
        prefetch=6,
        consumer_timeout_s=5.6,
    )
    with caplog.at_level(logging.WARNING, logger="fabric.adapters.rabbitmq_consumer"):
        counts = consumer.run(max_messages=len(ids), idle_timeout_s=5)

    assert counts == {"done": len(ids)}
    assert sorted(message_id for message_id, _ in seen) == ids, "each handled once"
    # The fourth would have started 3 s after it may have arrived: it and the ones behind it
    # went back; with the prefetch halved, none waited that long again.
    assert seen[:3] == [(message_id, False) for message_id in ids[:3]]
    assert dict(seen)[ids[3]] is True, "handed back, then handled on its next delivery"
    assert caplog.text.count("handed back to the queue, prefetch now 3") == 1
    # One hand-back costs each message it returns one delivery of the queue's limit. Before, the
    # nack gave the consumer credit while it was still consuming, the broker sent the messages
    # straight back to it, and its cancel returned them again: two deliveries each.
    # (A delivery handed back never reaches a handler: each message is taken once.)
    returned = {m: counts for m, counts in deliveries.items() if counts != [0]}
    assert ids[3] in returned
    assert all(counts == [1] for counts in returned.values()), returned
    settled_empty(amqp, WORK)


def test_a_consumer_idle_past_half_the_consumer_timeout_handles_its_next_message(
    broker_vhost: str, amqp: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # From the prefetch credit alone, the first delivery after a quiet spell looked as old as
    # the spell: every quiet quarter of an hour (nights; emergency queues are idle most of the
    # time) handed a fresh message back, spent one of its deliveries, logged a warning and
    # halved the prefetch, down to 1.
    handled: list[tuple[str, bool]] = []
    stop = threading.Event()

    def handler(delivery: Delivery) -> None:
        handled.append((delivery.message_id, delivery.redelivered))
        stop.set()

    consumer = RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(handler), consumer_timeout_s=2.0
    )
    with caplog.at_level(logging.WARNING, logger="fabric.adapters.rabbitmq_consumer"):
        running = threading.Thread(target=lambda: consumer.run(stop=stop, idle_timeout_s=10))
        running.start()
        time.sleep(2.5)  # quiet past the whole consumer timeout, not just half
        publish(amqp, WORK, "after-a-quiet-night")
        running.join(10)

    assert handled == [("after-a-quiet-night", False)], "handled once, on its first delivery"
    assert "handed back" not in caplog.text


class Died(BaseException):
    """The consumer's process dies mid-handler (nothing catches it)."""


def test_a_finished_message_is_acknowledged_before_the_next_slow_handler_runs(
    broker_vhost: str, amqp: Any
) -> None:
    # A finished message waited for its acknowledgement until the next handler ended (the
    # group was settled on the next message's add): a consumer that died in a slow handler
    # handed the message before it back too, and its handler ran again.
    for message_id in ("first", "second"):
        publish(amqp, WORK, message_id)

    def slow(delivery: Delivery) -> None:
        time.sleep(1.0)
        if delivery.message_id == "second":
            raise Died

    with pytest.raises(Died):
        RabbitMqConsumer(settings(broker_vhost), WORK, MessageProcessor(slow)).run(
            max_messages=2, idle_timeout_s=5
        )

    handled_again: list[str] = []
    counts = RabbitMqConsumer(
        settings(broker_vhost),
        WORK,
        MessageProcessor(lambda d: handled_again.append(d.message_id)),
    ).run(idle_timeout_s=1)

    assert handled_again == ["second"], "the finished first message was acknowledged"
    assert counts == {"done": 1}


def test_a_quick_consumer_never_hands_deliveries_back(broker_vhost: str, amqp: Any) -> None:
    # The guard's bound errs long, never short: it must not take a busy, healthy consumer's
    # window for a stuck one. A window of 20 handlings of 30 ms (and a settlement) takes well
    # under a second even on a loaded host, against the guard's 2.5 s (half of 5 s); the run,
    # about 4.5 s, lasts past the guard, which a bound counted from the run's start would not
    # let it finish without a hand-back.
    ids = [f"quick-{i:03d}" for i in range(150)]
    for message_id in ids:
        publish(amqp, WORK, message_id)
    redelivered: list[str] = []

    def handler(delivery: Delivery) -> None:
        if delivery.redelivered:
            redelivered.append(delivery.message_id)
        time.sleep(0.03)

    counts = RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(handler), consumer_timeout_s=5.0
    ).run(max_messages=len(ids), idle_timeout_s=5)

    assert counts == {"done": len(ids)}
    assert redelivered == []
