"""A long-running consumer of one work queue on pika, for the consumer toolkit.

Manual acknowledgements with a prefetch window (20 by default; 1 on an emergency queue, see
``RabbitMqConsumer``): a message is acknowledged only after its handler completed, or after its
retry or dead letter was confirmed stored by the broker. Decided messages are settled together,
up to the prefetch or 50 ms at a time: one confirm window for their retries and parks, and one
audit batch for all of them, before their acknowledgements
(one ``basic.ack`` with ``multiple`` for the group when all of it was settled). A group that
the next handler would keep past 50 ms (judged by the last handler's time) is settled before
that handler starts. A consumer that dies before acknowledging leaves the message to RabbitMQ,
which redelivers it (and, after the queue's delivery limit, dead-letters it itself with an
``x-death`` record and no audit record).

The handler runs on every delivery, whatever its ``x-delivery-count``. Where the consumer hands
deliveries back itself (the end of a run, a stop, the consumer_timeout guard below, an exception
unwinding ``run``), it cancels first and returns them with one ``basic.nack`` (multiple,
requeue), one delivery counted each; one the queue's delivery limit would dead-letter on that
return (``fabric.consumer.last_delivery``) is parked as ``max-receives``, with its audit record,
before the nack (``_give_back``). A group whose settlement an exception interrupted is settled
again before that nack (``_leave``); a cancel the broker does not confirm in time drops the
connection (``_cancel``).

A systemic failure (the handler's dependency is down: ``Systemic``) pauses the consumer instead
of handing the message back: it keeps the message, takes nothing new, and tries it again after
waits that double from ``backoff_s`` to ``max_backoff_s``, with the connection kept alive
meanwhile. Handing it back would raise its delivery count each time, and the queue's delivery
limit would dead-letter healthy messages (emergencies among them) within seconds of an outage.

The broker's ``consumer_timeout`` (30 minutes by default, on Amazon MQ too) closes the channel
when a delivery stays unacknowledged longer, and a delivery waiting in the prefetch window behind
slow handlers counts. Before a handler starts, the consumer works out how long its delivery may
have waited (from the prefetch credit and the last time it found nothing to take,
``_Arrivals``); from half the timeout on, it cancels, hands that delivery and every one
prefetched behind it (those in flight when the broker confirmed the cancel included) back with
one ``basic.nack`` (one delivery counted each) and consumes again with half the prefetch
(``consumer_timeout_s``; docs/dead-letters.md). A handler that itself outlasts the timeout loses
its channel: the broker takes the message (and the decided ones not yet acknowledged) back, and
the consumer raises ``ChannelClosed`` without publishing their retries or parks (``_Pending``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
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
    delivery_count,
    group_of,
    is_emergency,
    last_delivery,
    rabbitmq_delivery,
)
from fabric.ports import MessageKind, Metrics, OutboundMessage, Transport
from fabric.stakeholders import Stakeholder

_LOG = logging.getLogger(__name__)
# RabbitMQ's consumer_timeout default (and Amazon MQ's): 30 minutes.
DEFAULT_CONSUMER_TIMEOUT_S = 1800.0
# The prefetch of a consumer that is not given one: a work queue's, and an emergency queue's.
DEFAULT_PREFETCH = 20
EMERGENCY_PREFETCH = 1


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
        prefetch: int | None = None,
        settler: RabbitMqSettler | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        consumer_timeout_s: float = DEFAULT_CONSUMER_TIMEOUT_S,
    ) -> None:
        """``prefetch`` is how many deliveries the consumer may hold unacknowledged: by default
        ``DEFAULT_PREFETCH``, and ``EMERGENCY_PREFETCH`` (1) on an emergency queue
        (``fabric.<group>.emergency``). An emergency prefetched behind a slow or hung handler,
        or a systemic pause, waited for it while the other instances of the consumer idled
        (the heartbeats kept the connection, so nothing released it): with 1, the next one goes
        to another instance. The cost is a burst's pace: each emergency is settled and audited
        alone (a 1,000-message burst took 3.9 s on one local instance, against 0.3 s with 20):
        run more instances, or pass a prefetch. A prefetch given is used as it is.

        ``consumer_timeout_s`` is the broker's ``consumer_timeout`` (or the queue's
        ``x-consumer-timeout``, RabbitMQ 3.12 and later), in seconds: a delivery that may have
        waited half of it is handed back before its handler starts.

        Raises:
            ValueError: ``prefetch`` or ``consumer_timeout_s`` is not positive.
        """
        if prefetch is None:
            prefetch = EMERGENCY_PREFETCH if is_emergency(queue) else DEFAULT_PREFETCH
        if prefetch < 1 or consumer_timeout_s <= 0:
            raise ValueError("prefetch and consumer_timeout_s must be positive")
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
        self._consumer_timeout_s = consumer_timeout_s
        # How long the broker may take to confirm a cancel: as long as a connection and a
        # confirm may take.
        self._cancel_timeout_s = settings.connect_timeout + settings.confirm_timeout

    def run(
        self,
        *,
        max_messages: int | None = None,
        idle_timeout_s: float | None = None,
        stop: threading.Event | None = None,
    ) -> Counter[str]:
        """Consume until ``max_messages`` messages were taken and settled (or handed back),
        nothing arrived for ``idle_timeout_s``, or ``stop`` is set; returns the count per
        verdict (``systemic`` counts each failed try of a pause, not messages).

        Raises:
            pika.exceptions.AMQPError: the connection failed (what was not acknowledged is
                redelivered to the next consumer); ``ChannelClosed`` when the broker closed the
                channel (its ``consumer_timeout`` fired during a handler) and took back what was
                not acknowledged; ``ConsumerCancelled`` when the broker cancelled the consumer
                (its queue was deleted): run it again.
            BaseException: whatever a handler raised that is no ``Exception``
                (``KeyboardInterrupt``, ``SystemExit``), once what the consumer held went back
                as at the end of a run (``_leave``).
        """
        counts: Counter[str] = Counter()
        connection = open_blocking_connection(self._settings)
        keeper = _HeartbeatKeeper(connection, every_s=self._settings.heartbeat / 4)
        try:
            channel = connection.channel()
            # A run asked for fewer messages than the prefetch takes no more: the rest would
            # only go back at its end, each one delivery nearer the queue's delivery limit.
            pending = _Pending(
                channel,
                self._settler,
                counts,
                self._backoff,
                limit=(prefetch := min(self._prefetch, max_messages or self._prefetch)),
            )
            idle_since = time.monotonic()
            messages = self._consume(channel, prefetch)
            held = None  # the delivery taken and not decided: its handler ran or never will
            try:
                while (item := next(messages, None)) is not None:
                    method, _, _ = item
                    if stop is not None and stop.is_set():
                        held = None if method is None else item  # taken, never handled
                        break
                    if method is None:
                        pending.idle()
                        if (
                            idle_timeout_s is not None
                            and time.monotonic() - idle_since > idle_timeout_s
                        ):
                            break
                        continue
                    idle_since = time.monotonic()
                    # The broker's consumer_timeout counts the wait in the prefetch window too.
                    if (waited := pending.arrivals.waited(method.delivery_tag)) >= (
                        self._consumer_timeout_s / 2
                    ):
                        messages = self._hand_back(channel, item, pending, waited)
                        continue
                    held = item
                    delivery = self._delivery(item)
                    pending.handler_starts()
                    with keeper.serving():
                        decision = self._processor.process(delivery)
                    if decision.verdict is Verdict.SYSTEMIC:
                        decision = self._pause(
                            delivery,
                            channel=channel,
                            keeper=keeper,
                            pending=pending,
                            counts=counts,
                            stop=stop,
                        )
                    if decision.verdict is Verdict.SYSTEMIC:  # stopped during a pause
                        break  # ``held`` goes back with the rest: not the message's fault
                    pending.add(method.delivery_tag, delivery, decision)
                    held = None
                    if max_messages is not None and pending.taken >= max_messages:
                        break
                else:
                    # pika's generator ends only when the broker cancelled the consumer (its
                    # queue deleted or its node lost): returning counts would look like a
                    # finished run while nothing consumes the queue any more.
                    pending.flush()
                    raise pika.exceptions.ConsumerCancelled(
                        f"the broker cancelled the consumer of {self._queue}"
                    )
                self._finish(channel, pending, held)
            except BaseException:
                self._leave(channel, pending, held)
                raise
        finally:
            keeper.stop()
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                if connection.is_open:
                    connection.close()
        return counts

    def _pause(
        self,
        delivery: Delivery,
        *,
        channel: Any,
        keeper: _HeartbeatKeeper,
        pending: _Pending,
        counts: Counter[str],
        stop: threading.Event | None,
    ) -> Decision:
        """The systemic pause of ``delivery``, whose handler just failed systemically: tries it
        again after waits that double from ``backoff_s`` to ``max_backoff_s``, keeping it,
        until its verdict is not systemic (returned) or ``stop`` is set (a systemic verdict
        returned). Each failed try is counted ``systemic``.

        Raises:
            pika.exceptions.ChannelClosed: the broker closed the channel (its consumer_timeout)
                and took the message back.
        """
        wait = self._backoff_s
        while True:
            counts[str(Verdict.SYSTEMIC)] += 1
            if stop is not None and stop.is_set():
                return Decision(Verdict.SYSTEMIC)
            if not channel.is_open:  # the broker took the message back (consumer_timeout)
                raise pika.exceptions.ChannelClosed(406, "closed during a systemic pause")
            pending.flush()  # what was decided before is settled first
            channel.connection.sleep(wait)  # serves heartbeats while it waits
            wait = min(max(wait * 2, 0.01), self._max_backoff_s)
            with keeper.serving():
                decision = self._processor.process(delivery)
            if decision.verdict is not Verdict.SYSTEMIC:
                return decision

    def _consume(self, channel: Any, prefetch: int) -> Iterator[Any]:
        """The deliveries of a new consumer of the queue with ``prefetch`` (RabbitMQ applies a
        prefetch to the consumers that start after it)."""
        channel.basic_qos(prefetch_count=prefetch)
        return channel.consume(self._queue, auto_ack=False, inactivity_timeout=0.1)  # type: ignore[no-any-return]

    def _delivery(self, item: Any) -> Delivery:
        method, properties, body = item
        return rabbitmq_delivery(
            self._queue,
            message_id=properties.message_id,
            topic=properties.type,
            body=body,
            headers=properties.headers,
            correlation_id=properties.correlation_id,
            redelivered=bool(method.redelivered),
            reply_to=properties.reply_to,
        )

    def _hand_back(
        self, channel: Any, item: Any, pending: _Pending, waited: float
    ) -> Iterator[Any]:
        """Hands delivery ``item`` and every one prefetched behind it back to the queue, and
        consumes again with half the prefetch (RabbitMQ applies a prefetch to consumers that
        start after it): the window held more than the handlers get through in half the
        consumer timeout. Returns the new consumer's deliveries.

        One ``basic.nack`` (multiple, requeue) covers them, each counted once (``_give_back``):
        RabbitMQ 4.3 and later do not count a nack against the delivery limit; 3.10 to 4.2
        count it, as they count the channel closure the timeout would bring, which would also
        lose the acknowledgement of the handler under way and stop the run. It also covers the
        deliveries that were in flight when the broker took the cancel (``_cancel``)."""
        # The consumer goes first: a nack (or an acknowledgement) while it was active gave it
        # credit, the broker sent the returned messages straight back to it, and the cancel
        # returned them again (two deliveries counted each).
        back = self._give_back(
            channel, pending, [item, *_cancel(channel, pending, timeout_s=self._cancel_timeout_s)]
        )
        pending.limit = max(1, pending.limit // 2)
        pending.arrivals = _Arrivals(pending.limit)
        _LOG.warning(
            "%s: a delivery may have waited %.0f s of the consumer timeout (%.0f s) in the "
            "prefetch window; %d handed back to the queue, prefetch now %d",
            self._queue,
            waited,
            self._consumer_timeout_s,
            back,
            pending.limit,
        )
        return self._consume(channel, pending.limit)

    def _finish(self, channel: Any, pending: _Pending, held: Any) -> None:
        """Ends the run's consumer: cancels it, settles what was decided, and gives ``held`` (a
        delivery it took and did not decide, or None) and every delivery it still holds back
        (``_give_back``), as a hand-back does. pika's cancel rejected each (RabbitMQ 4.3: one
        failed delivery each, at every stop of a consumer) and left ``held`` to the
        connection's closure. A cancel that fails leaves what the consumer holds to the
        connection, and what it decided is settled all the same."""
        try:
            items = [] if held is None else [held]
            items += _cancel(channel, pending, timeout_s=self._cancel_timeout_s)
        except pika.exceptions.AMQPError:
            items = []  # the channel is gone, and what it held went back with it
        except Exception:
            _LOG.exception("%s: the consumer could not be cancelled", self._queue)
            items = []
        self._give_back(channel, pending, items)

    def _leave(self, channel: Any, pending: _Pending, held: Any) -> None:
        """``_finish`` for an exception unwinding ``run`` (a handler's ``KeyboardInterrupt``, a
        ``SystemExit`` from a SIGTERM handler, a lost connection): what the consumer holds goes
        back once. Left to the connection's closure, it went back twice: pika rejected each
        prefetched delivery while the consumer was still live, the broker sent them straight
        back to it, and the closure returned them again. Whatever fails here is left to the
        closure (one return each). ``_finish`` may have run in part: what it did is not
        done twice.

        The exception may have come while a group was being settled (``_Pending.flush``):
        its retries, parks and audit batch published, or some of them, or none, and nothing
        acknowledged. The group is settled again here, before the hand-back's nack, which
        would otherwise return it: a handled message ran twice (a second ``delivered``
        record), a poison one was parked and back in its work queue. Settled again, a retry or
        park already stored has a second copy (idempotency and the redrive take a message
        once), and its audit records go out twice: at-least-once, with the least repeated.
        Deferring the signal around the settlement instead is not the toolkit's to do: it
        would have to install the process's signal handlers."""
        if held is not None and pending.holds(held[0].delivery_tag):
            held = None  # decided, and added when the exception came: settled with the rest
        try:
            self._finish(channel, pending, held)
        except Exception as exc:  # the exception under way is the one to raise
            _LOG.warning(
                "%s: what the consumer held goes back with its connection (%s)",
                self._queue,
                type(exc).__name__,
            )

    def _give_back(self, channel: Any, pending: _Pending, items: list[Any]) -> int:
        """Settles what was decided, then hands ``items`` (deliveries the consumer took and did
        not decide, in the order of their tags, its consumer cancelled) back to the queue with
        one ``basic.nack`` (multiple, requeue). Returns how many went back.

        One that the queue's delivery limit would dead-letter on this return (its
        ``x-delivery-count`` has reached the limit: ``last_delivery``) is parked as
        ``max-receives`` instead, with its audit record: returned, the broker dead-letters it
        without one. Its handler ran on each of its deliveries that reached it; the others
        (held behind another message at a hand-back, a stop or a crash) count all the same.
        The parks are confirmed and acknowledged one by one before the nack, which covers
        every lower tag not yet settled. A park that is not stored goes back with the others,
        to the broker's dead letter."""
        pending.flush()  # before the nack, which covers lower tags
        last = [
            (method.delivery_tag, self._delivery((method, properties, body)))
            for method, properties, body in items
            if last_delivery(self._queue, delivery_count(properties.headers))
        ]
        parked = pending.park(last)
        back = [method.delivery_tag for method, _, _ in items if method.delivery_tag not in parked]
        if back:
            channel.basic_nack(back[-1], multiple=True, requeue=True)
        return len(back)

    def _backoff(self) -> None:
        # After something was not settled, so that a consumer whose dependency is down does
        # not spin.
        self._sleep(self._backoff_s)


def _cancel(channel: Any, pending: _Pending, *, timeout_s: float) -> list[Any]:
    """Cancels the channel's consumer; returns the deliveries it holds that the consume
    generator has not yielded (method, properties, body), those the broker sent before it
    confirmed the cancel included. Nothing when the consumer is gone already (the broker
    cancelled it, or ``_cancel`` ran before).

    pika's own cancel rejects (``basic.reject``, requeue) every delivery that reaches it between
    the ``basic.cancel`` and the broker's ``cancel-ok``: the ones in flight when the broker took
    the cancel. RabbitMQ 4.3 counts a reject as a failed delivery against the queue's delivery
    limit (rabbitmq-server#15387), and the hand-back's nack did not cover them. So the cancel
    goes to the broker behind pika's back (``_impl._rpc``, pika 1.x), what still comes until the
    ``cancel-ok`` is taken (the broker sends nothing for the consumer after it), and only then
    pika cancels too: the broker, which no longer knows the consumer, confirms again, and
    nothing is left for pika to reject.

    The deliveries are taken from the generator's buffer (``_queue_consumer_generator``, pika
    1.x), not through the generator: an exception that came while the consumer waited inside it
    (a ``KeyboardInterrupt``) finished it, and ``next`` raised ``StopIteration``; what was
    decided was then never settled, and a delivery at the delivery limit was left to pika's
    reject and the broker's silent dead letter.

    Raises:
        pika.exceptions.ChannelClosed: the channel is closed (the broker's consumer_timeout,
            say): it has no consumer left, and the broker took back what it held. Or the broker
            did not confirm the cancel within ``timeout_s``: pika's close of the connection
            would cancel the consumer again and wait for that confirmation as long, so what was
            decided is settled (its acknowledgements need no reply) and the connection is
            dropped: what the consumer holds goes back with it.
    """
    if not channel.is_open:
        raise pika.exceptions.ChannelClosed(406, "closed before the consumer was cancelled")
    consumer = channel._queue_consumer_generator
    if consumer is None or not channel.consumer_tags:
        return []
    confirmed: list[Any] = []
    channel._impl._rpc(
        pika.spec.Basic.Cancel(consumer_tag=consumer.consumer_tag),
        confirmed.append,
        [(pika.spec.Basic.CancelOk, {"consumer_tag": consumer.consumer_tag})],
    )
    deadline = time.monotonic() + timeout_s
    while not confirmed:
        if not channel.is_open:
            raise pika.exceptions.ChannelClosed(406, "closed while cancelling the consumer")
        if time.monotonic() > deadline:
            try:
                pending.flush()
            finally:
                _drop(channel.connection)
            raise pika.exceptions.ChannelClosed(
                406, f"the broker did not confirm the cancel within {timeout_s:.1f} s"
            )
        channel.connection.process_data_events(time_limit=0.1)
    waiting = consumer.pending_events
    held = [waiting.popleft() for _ in range(channel.get_waiting_message_count())]
    channel.cancel()
    return [(event.method, event.properties, event.body) for event in held]


def _drop(connection: Any) -> None:
    """Ends ``connection`` without the AMQP close, as pika's heartbeat timeout does
    (``_impl._terminate_stream``, pika 1.x): the broker takes back what it held."""
    connection._impl._terminate_stream(
        pika.exceptions.StreamLostError("dropped: the broker did not confirm a cancel")
    )
    deadline = time.monotonic() + 1.0
    with contextlib.suppress(pika.exceptions.AMQPError):  # the loss it reports, as a rule
        while connection.is_open and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.01)


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


class _Arrivals:
    """The longest each delivery of a consumer may have waited, from its prefetch credit and
    from the last time the consumer found nothing to take.

    The broker sends the consumer's ``n``-th delivery only while fewer than ``prefetch`` of its
    deliveries are unsettled, that is once ``n - prefetch`` were settled: the delivery can have
    arrived no earlier than that settlement, or than the consumer's start. Settlements are
    noted when they start, before the broker has them: the bound errs long, never short.

    From the credit alone, the first delivery after a quiet spell looked as old as the spell
    (a quiet night handed back a message every 15 minutes and halved the prefetch each time).
    A delivery that comes after the consumer read the connection and held none (``quiet``)
    was sent after that, however long ago the last settlement was."""

    def __init__(self, prefetch: int) -> None:
        self._prefetch = prefetch
        self._first_tag: int | None = None  # the channel numbers deliveries, not the consumer
        self._settled = 0
        # (deliveries settled so far, when): both only grow.
        self._times: deque[tuple[int, float]] = deque([(0, time.monotonic())])
        self._quiet_at = self._times[0][1]

    def quiet(self) -> None:
        """The consumer read the connection and holds no delivery it has not taken: the ones
        it gets from now on were sent after now."""
        self._quiet_at = time.monotonic()

    def settled(self, count: int) -> None:
        """``count`` more deliveries were acknowledged, rejected or nacked."""
        self._settled += count
        self._times.append((self._settled, time.monotonic()))

    def waited(self, tag: int) -> float:
        """How long delivery ``tag`` may have waited; called in the order of the tags."""
        if self._first_tag is None:
            self._first_tag = tag
        needed = tag - self._first_tag + 1 - self._prefetch
        # The first settlement to reach ``needed``; the ones before it serve no later tag.
        while len(self._times) > 1 and self._times[0][0] < needed:
            self._times.popleft()
        return time.monotonic() - max(self._times[0][1], self._quiet_at)


class _Pending:
    """Decided deliveries not yet settled: settled together (one confirm window for the
    retries and parks, one audit batch), then acknowledged; at most ``limit`` of them (the
    prefetch) or ``max_age_s`` old, and settled before a handler that would keep them past
    ``max_age_s`` starts (``handler_starts``). A delivery that is not settled is
    rejected back to the queue (its delivery count rises, on every RabbitMQ version); a
    message held through a systemic pause is not added: when the consumer stops, it goes back
    with the consumer's hand-back nack (RabbitMQ 4.3 and later do not count that against the
    delivery limit). Deliveries at the limit that a hand-back would return are parked here
    (``park``). ``arrivals`` follows its settlements; it and ``limit`` are renewed when the
    consumer hands deliveries back with a smaller prefetch.

    Nothing is settled on a closed channel: the broker took its unacknowledged deliveries back
    to the queue (``consumer_timeout`` during a handler, a lost connection), so a retry or park
    published then put a second copy beside the message, with its audit record (a poison
    message both parked and back in the work queue, a failed one on two retry chains), and its
    acknowledgement failed. ``flush`` drops them instead and raises ``ChannelClosed``. A
    settlement that an exception interrupts keeps its deliveries, for ``flush`` to settle them
    again (``RabbitMqConsumer._leave``)."""

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
        self.limit = limit
        self.arrivals = _Arrivals(limit)
        self._max_age_s = max_age_s
        self._items: list[tuple[int, Delivery, Decision]] = []
        # Deliveries added: the messages this run took. Not the counts' sum, which has a
        # ``systemic`` for each try of a pause (a run asked for 5 stopped after 2 of them).
        self.taken = 0
        self._since = 0.0
        self._handler_started = 0.0
        self._handler_s = 0.0  # the last handler's time: what the next one likely takes

    def idle(self) -> None:
        """The consumer read the connection and holds no delivery: whatever comes next was sent
        after now (``_Arrivals.quiet``); what was decided is settled, and audit batches kept
        back from earlier settlements are sent again once due."""
        self.arrivals.quiet()
        self.flush()
        self._settler.resend_audit()

    def handler_starts(self) -> None:
        """Settles now what the next ``add`` would find past ``max_age_s``, judging the handler
        about to start by the last one's time (from its start to its ``add``). Before, a
        decided delivery waited for the next ``add``: unacknowledged for a whole next handler,
        however slow. Quick handlers keep their groups: one is settled a handler early at
        most."""
        now = time.monotonic()
        if self._items and now - self._since + self._handler_s > self._max_age_s:
            self.flush()
        self._handler_started = time.monotonic()

    def add(self, tag: int, delivery: Delivery, decision: Decision) -> None:
        """Adds a decided delivery (done, retry or dead letter: a systemic one is held by the
        consumer, not decided)."""
        self.taken += 1
        self._handler_s = time.monotonic() - self._handler_started
        if not self._items:
            self._since = time.monotonic()
        self._items.append((tag, delivery, decision))
        if len(self._items) >= self.limit or time.monotonic() - self._since > self._max_age_s:
            self.flush()

    def holds(self, tag: int) -> bool:
        """Whether delivery ``tag`` was added and is not acknowledged yet."""
        return any(held == tag for held, _, _ in self._items)

    def flush(self) -> None:
        """Settles the decided deliveries: retries and parks published and confirmed (with the
        audit batch), then acknowledged.

        Raises:
            pika.exceptions.ChannelClosed: the channel closed: nothing published, the
                deliveries dropped (the broker put them back in the queue).
        """
        if not self._items:
            return
        # A delivery leaves ``_items`` once its acknowledgement (or reject) is sent: an
        # exception that comes before (a KeyboardInterrupt during the settlement) leaves it to
        # be settled again before the consumer hands anything back (``RabbitMqConsumer.
        # _leave``). Taken out before, one whose reject was not sent could be covered by the
        # next multiple acknowledgement: a message lost. Kept a moment too long, it is
        # acknowledged twice at worst: the broker closes the channel and takes back what was
        # not acknowledged.
        items = list(self._items)
        if self._channel.is_open:  # reads a Channel.Close that came during the last handler
            self._channel.connection.process_data_events(time_limit=0)
        if not self._channel.is_open:
            self._items = []
            raise pika.exceptions.ChannelClosed(
                406, f"closed with {len(items)} decided deliveries unacknowledged: requeued"
            )
        stored = self._settler.settle([(delivery, decision) for _, delivery, decision in items])
        self.arrivals.settled(len(items))  # acknowledged or rejected below
        if all(stored):
            # ``items`` are all the deliveries this channel has handed out and not settled
            # (a systemic one waits before it joins; those still prefetched have higher tags),
            # so one acknowledgement covers them: a quarter less of the broker's CPU per
            # drained message than one acknowledgement each (BENCHMARKS.md, consumer_drain).
            self._channel.basic_ack(items[-1][0], multiple=True)
            self._items = []
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
            del self._items[0]
        self._backoff()

    def park(self, items: list[tuple[int, Delivery]]) -> set[int]:
        """Parks ``items`` (tag, delivery: taken, not decided) as ``max-receives``, each
        acknowledged on its own once stored; returns the tags parked. The caller hands the
        others back (``RabbitMqConsumer._give_back``)."""
        if not items:
            return set()
        decision = Decision(Verdict.DEAD_LETTER, reason="max-receives")
        stored = self._settler.settle([(delivery, decision) for _, delivery in items])
        parked = set()
        for (tag, delivery), done in zip(items, stored, strict=True):
            if done:
                self._channel.basic_ack(tag)
                self._counts[str(Verdict.DEAD_LETTER)] += 1
                parked.add(tag)
            _LOG.warning(
                "%s: %s reached the delivery limit (%d returns); %s",
                delivery.queue,
                delivery.message_id,
                delivery.delivery_count,
                "parked as max-receives instead of handed back"
                if done
                else "its park was refused: handed back, the broker dead-letters it",
            )
        self.arrivals.settled(len(parked))
        return parked
