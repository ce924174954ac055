"""A long-running consumer of one work queue on pika, for the consumer toolkit.

Manual acknowledgements with a prefetch window: a message is acknowledged only after its handler
completed, or after its retry or dead letter was confirmed stored by the broker. Decided
messages are settled together, up to the prefetch or 50 ms at a time: one confirm window for
their retries and parks, and one audit batch for all of them, before their acknowledgements
(one ``basic.ack`` with ``multiple`` for the group when all of it was settled). A
consumer that dies before acknowledging leaves the message to RabbitMQ, which redelivers it
(and, after the queue's delivery limit, dead-letters it itself with an ``x-death`` record).

A systemic failure (the handler's dependency is down: ``Systemic``) pauses the consumer instead
of handing the message back: it keeps the message, takes nothing new, and tries it again after
waits that double from ``backoff_s`` to ``max_backoff_s``, with the connection kept alive
meanwhile. Handing it back would raise its delivery count each time, and the queue's delivery
limit would dead-letter healthy messages (emergencies among them) within seconds of an outage.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions

from fabric import topology
from fabric.adapters.rabbitmq import (
    RabbitMqTransport,
    RabbitSettings,
    open_blocking_connection,
)
from fabric.audit_sink import TransportAuditSink
from fabric.consumer import (
    Decision,
    Delivery,
    MessageProcessor,
    RabbitMqSettler,
    Verdict,
    group_of,
    rabbitmq_delivery,
)
from fabric.ports import MessageKind, Metrics, OutboundMessage, Transport
from fabric.stakeholders import Stakeholder

_LOG = logging.getLogger(__name__)


def retry_transport(settings: RabbitSettings, group: Stakeholder) -> Transport:
    """A confirming publisher to ``group``'s retry exchange (routing key: ``redeliver_to``),
    and of audit batches to the audit exchange."""
    exchange = topology.retry_exchange_name(group)

    def exchange_for(message: OutboundMessage) -> str:
        return topology.AUDIT_EXCHANGE if message.kind is MessageKind.AUDIT else exchange

    return RabbitMqTransport(settings, exchange_for=exchange_for)


def consumer_settler(
    settings: RabbitSettings, queue: str, *, consumer: str, metrics: Metrics | None = None
) -> RabbitMqSettler:
    """The settler of a consumer of ``queue``: retries and dead letters through the group's
    retry exchange, and an audit record of everything it settles on the audit exchange, both
    over one connection as the group's user. ``metrics`` counts audit records kept for a later
    batch or lost (``RabbitMqSettler``)."""
    group = group_of(queue)[0]
    transport = retry_transport(settings, group)
    return RabbitMqSettler(
        lambda _group: transport,
        audit=TransportAuditSink([transport], emitted_by=consumer),
        consumer=consumer,
        metrics=metrics,
    )


class RabbitMqConsumer:
    """Consumes ``queue`` with ``processor``; retries and dead letters go through ``settler``."""

    def __init__(
        self,
        settings: RabbitSettings,
        queue: str,
        processor: MessageProcessor,
        *,
        prefetch: int = 20,
        settler: RabbitMqSettler | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._processor = processor
        self._prefetch = prefetch
        self._settler = settler or consumer_settler(
            settings, queue, consumer=f"consumer:{group_of(queue)[0]}"
        )
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._sleep = sleep

    def run(
        self,
        *,
        max_messages: int | None = None,
        idle_timeout_s: float | None = None,
        stop: threading.Event | None = None,
    ) -> Counter[str]:
        """Consume until ``max_messages`` were settled, nothing arrived for ``idle_timeout_s``,
        or ``stop`` is set; returns the count per verdict.

        Raises:
            pika.exceptions.AMQPError: the connection failed (what was not acknowledged is
                redelivered to the next consumer); ``ConsumerCancelled`` when the broker
                cancelled the consumer (its queue was deleted): run it again.
        """
        counts: Counter[str] = Counter()
        connection = open_blocking_connection(self._settings)
        keeper = _HeartbeatKeeper(connection, every_s=self._settings.heartbeat / 4)
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self._prefetch)
            pending = _Pending(channel, self._settler, counts, self._backoff, limit=self._prefetch)
            idle_since = time.monotonic()
            for method, properties, body in channel.consume(
                self._queue, auto_ack=False, inactivity_timeout=0.1
            ):
                if stop is not None and stop.is_set():
                    break
                if method is None:
                    pending.flush()
                    if (
                        idle_timeout_s is not None
                        and time.monotonic() - idle_since > idle_timeout_s
                    ):
                        break
                    continue
                idle_since = time.monotonic()
                delivery = rabbitmq_delivery(
                    self._queue,
                    message_id=properties.message_id,
                    topic=properties.type,
                    body=body,
                    headers=properties.headers,
                    correlation_id=properties.correlation_id,
                    redelivered=bool(method.redelivered),
                    reply_to=properties.reply_to,
                )
                with keeper.serving():
                    decision = self._processor.process(delivery)
                wait = self._backoff_s
                while decision.verdict is Verdict.SYSTEMIC and not (
                    stop is not None and stop.is_set()
                ):
                    if not channel.is_open:  # the broker took the message back (consumer_timeout)
                        raise pika.exceptions.ChannelClosed(406, "closed during a systemic pause")
                    pending.flush()  # what was decided before is settled first
                    counts[str(Verdict.SYSTEMIC)] += 1
                    connection.sleep(wait)  # serves heartbeats while it waits
                    wait = min(max(wait * 2, 0.01), self._max_backoff_s)
                    with keeper.serving():
                        decision = self._processor.process(delivery)
                pending.add(method.delivery_tag, delivery, decision)
                if max_messages is not None and pending.total >= max_messages:
                    break
            else:
                # pika's generator ends only when the broker cancelled the consumer (its queue
                # deleted or its node lost): returning counts would look like a finished run
                # while nothing consumes the queue any more.
                pending.flush()
                raise pika.exceptions.ConsumerCancelled(
                    f"the broker cancelled the consumer of {self._queue}"
                )
            pending.flush()
            with contextlib.suppress(pika.exceptions.AMQPError):
                channel.cancel()
        finally:
            keeper.stop()
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                if connection.is_open:
                    connection.close()
        return counts

    def _backoff(self) -> None:
        # After something was not settled, so that a consumer whose dependency is down does
        # not spin.
        self._sleep(self._backoff_s)


class _HeartbeatKeeper:
    """Serves the connection (heartbeats) from a helper thread while a handler runs.

    pika's blocking connection sends and reads heartbeats only while its own thread is inside
    pika: a handler that ran past about twice the heartbeat lost the connection, and the message
    and every prefetched one came back one delivery nearer the delivery limit. pika is not
    thread-safe, so the consumer's thread holds ``_lock`` whenever it may touch the connection
    and lets go of it only around the handler; the helper touches the connection only while it
    holds the lock. A quick handler costs a lock release and acquire, not a thread handoff."""

    def __init__(self, connection: Any, *, every_s: float) -> None:
        self._connection = connection
        self._every_s = max(every_s, 0.05)
        self._lock = threading.Lock()
        self._lock.acquire()  # the consumer's thread holds it outside handlers
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="heartbeats", daemon=True)
        if every_s > 0:  # heartbeat 0: none negotiated, nothing to serve
            self._thread.start()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()  # waits out a pass of the helper under way

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _serve(self) -> None:
        while not self._stopped.wait(self._every_s):
            if not self._lock.acquire(blocking=False):
                continue  # the consumer's thread is in pika itself
            try:
                if self._connection.is_open:
                    self._connection.process_data_events(time_limit=0)
            except (pika.exceptions.AMQPError, OSError):
                pass  # a lost connection: the consumer's next call on it raises
            finally:
                self._lock.release()


class _Pending:
    """Decided deliveries not yet settled: settled together (one confirm window for the
    retries and parks, one audit batch), then acknowledged; at most ``limit`` of them (the
    prefetch) or ``max_age_s`` old. A delivery that is not settled is rejected back to the
    queue (its delivery count rises, on every RabbitMQ version); a systemic verdict is nacked
    back (RabbitMQ 4.3 and later do not count that against the delivery limit)."""

    def __init__(
        self,
        channel: Any,
        settler: RabbitMqSettler,
        counts: Counter[str],
        backoff: Callable[[], None],
        *,
        limit: int,
        max_age_s: float = 0.05,
    ) -> None:
        self._channel = channel
        self._settler = settler
        self._counts = counts
        self._backoff = backoff
        self._limit = limit
        self._max_age_s = max_age_s
        self._items: list[tuple[int, Delivery, Decision]] = []
        self._since = 0.0

    @property
    def total(self) -> int:
        """Settled or waiting: how many deliveries this run has taken."""
        return sum(self._counts.values()) + len(self._items)

    def add(self, tag: int, delivery: Delivery, decision: Decision) -> None:
        if decision.verdict is Verdict.SYSTEMIC:
            self.flush()
            self._channel.basic_nack(tag, requeue=True)
            self._counts[str(Verdict.SYSTEMIC)] += 1
            self._backoff()
            return
        if not self._items:
            self._since = time.monotonic()
        self._items.append((tag, delivery, decision))
        if len(self._items) >= self._limit or time.monotonic() - self._since > self._max_age_s:
            self.flush()

    def flush(self) -> None:
        if not self._items:
            return
        items, self._items = self._items, []
        stored = self._settler.settle([(delivery, decision) for _, delivery, decision in items])
        if all(stored):
            # ``items`` are all the deliveries this channel has handed out and not settled
            # (a systemic one waits before it joins; those still prefetched have higher tags),
            # so one acknowledgement covers them: a quarter less of the broker's CPU per
            # drained message than one acknowledgement each (BENCHMARKS.md, consumer_drain).
            self._channel.basic_ack(items[-1][0], multiple=True)
            self._counts.update(str(decision.verdict) for _, _, decision in items)
            return
        for (tag, _, decision), done in zip(items, stored, strict=True):
            if done:
                self._channel.basic_ack(tag)
                self._counts[str(decision.verdict)] += 1
            else:
                # A reject, not a nack: RabbitMQ 4.3 counts only a reject against the queue's
                # delivery limit, which must bound a message whose retry or park keeps being
                # refused (3.10-4.2 count both).
                self._channel.basic_reject(tag, requeue=True)
                self._counts[str(Verdict.SYSTEMIC)] += 1
        self._backoff()
