"""The consumer toolkit: process fabric messages once, retry with spacing, park what cannot be.

A consumer team writes one function, ``handler(delivery)``, and picks an entry point:

- ``RabbitMqConsumer``: a long-running consumer on its group's work queue (pika);
- ``rabbitmq_batch_handler``: a Lambda function behind an Amazon MQ event source;
- ``sqs_batch_handler``: a Lambda function behind an SQS event source (partial batch failures).

What the handler's outcome means:

- returns: done, the message is acknowledged;
- raises ``Retry`` or any other exception: the attempt failed. The message is republished to its
  group's delay tier for this attempt (RabbitMQ: TTL queues that dead-letter back to the work
  queue, no plugin needed) and acknowledged; after ``max_attempts`` attempts it is parked in the
  group's dead-letter queue instead, with the reason, time and failing exception class in its
  headers (never the exception's text, which may hold child data);
- raises ``Poison`` (or ``DecryptionFailed``, ``MessageRejected``: the message itself is bad):
  parked at once, without retries;
- raises ``Systemic``: the consumer itself cannot work (its database is down). Nothing of the
  batch is settled: it comes back as a whole (RabbitMQ event sources have no partial batch
  response) and the broker's delivery limit bounds how often.

Handlers are plain functions: an ``async def`` handler is refused when the processor is built,
and a handler that returns an awaitable anyway is parked as poison (``HandlerReturnedAwaitable``).
The handler runs on every delivery, whatever its ``x-delivery-count``. Where the long-running
consumer hands deliveries back itself, one that the queue's delivery limit would dead-letter on
that return (``last_delivery``) is parked as ``max-receives`` with its audit record instead
(``fabric.adapters.rabbitmq_consumer``).

``Idempotency`` (Powertools on DynamoDB, keyed on consumer name + ``message_id``) makes a
handler run at most once to completion per message, whether a copy is redelivered after a crash,
delivered twice, or delivered to two instances at the same moment (the second is retried later).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import inspect
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from fabric import metrics as metric_names
from fabric import topology
from fabric.audit import AuditEvent, AuditRecord, sha256_hex
from fabric.audit_writer import CONSUMER_NAME, ERROR_NAME, is_topic
from fabric.envelope import (
    Classification,
    Envelope,
    JsonValue,
    Reason,
    Rejection,
    from_wire,
    normalize_message_id,
)
from fabric.errors import DecryptionFailed, FabricError, MessageRejected
from fabric.ports import (
    AuditSink,
    Metrics,
    OutboundMessage,
    PayloadCipher,
    PreparedAudit,
    Transport,
)
from fabric.protection import open_envelope
from fabric.stakeholders import Stakeholder

_LOG = logging.getLogger(__name__)
# Every tier once, then the DLQ: 1 first attempt + 3 retries.
DEFAULT_MAX_ATTEMPTS = 4


class Retry(FabricError):
    """Raised by a handler: this attempt failed, try the message again after the next delay."""


class InProgress(Retry):
    """Another copy of the message holds its idempotency record: not an attempt of this one.

    After a consumer died mid-handler the record stands until it expires; counting each clash
    as a failed attempt parked an emergency as ``max-attempts`` before its handler ever ran
    again. A clash is retried on the message's current delay tier, without counting."""


class Poison(FabricError):
    """Raised by a handler: this message can never be processed; park it now."""


class Systemic(FabricError):
    """Raised by a handler: the consumer cannot process anything now; settle nothing."""


class HandlerReturnedAwaitable(TypeError):
    """A handler returned an awaitable (a coroutine): the toolkit calls handlers synchronously,
    so its body never ran. Before, the coroutine object was taken for a return value and the
    message acknowledged and audited ``delivered``. The message is parked as poison under this
    name (a redrive brings it back once the handler is a plain function)."""


@dataclass(frozen=True)
class Delivery:
    """One message as a consumer handler receives it.

    ``queue`` is the work queue (RabbitMQ) or queue ARN (SQS) it came from; ``attempt`` counts
    from 1 across retry tiers (SQS: the receive count); ``headers`` are the string headers;
    ``correlation_id`` and ``reply_to`` are the AMQP properties, kept on retries and parks;
    ``delivery_count`` is the quorum queue's ``x-delivery-count`` (RabbitMQ; 0 elsewhere): how
    many earlier deliveries of the message it counted against its delivery limit.
    """

    message_id: str
    topic: str
    body: bytes
    queue: str
    attempt: int = 1
    headers: Mapping[str, str] = field(default_factory=dict)
    correlation_id: str | None = None
    redelivered: bool = False
    reply_to: str | None = None
    delivery_count: int = 0

    def envelope(self) -> Envelope:
        """The envelope of the body (restricted payloads still sealed: see fabric.protection).

        Raises:
            MessageRejected: the body is not a fabric envelope.
        """
        return from_wire(self.body)

    def payload(self, cipher: PayloadCipher, environment: str) -> JsonValue:
        """The envelope's payload, opened when it is ``restricted``: checked against the
        context rebuilt from this envelope and ``environment`` (the consumer's own, never the
        message's), see ``fabric.protection.open_envelope``.

        Raises:
            MessageRejected: the body is not a fabric envelope.
            DecryptionFailed: the sealed payload does not open in that context.
            EncryptionUnavailable: the key service cannot decrypt now (retry later).
        """
        envelope = self.envelope()
        if envelope.classification is not Classification.RESTRICTED:
            return envelope.payload
        opened: JsonValue = json.loads(open_envelope(cipher, envelope.to_dict(), environment))
        return opened


Handler = Callable[[Delivery], object]


class Verdict(StrEnum):
    """What to do with a delivery after its handler ran."""

    DONE = "done"
    RETRY = "retry"
    DEAD_LETTER = "dead-letter"
    SYSTEMIC = "systemic"


@dataclass(frozen=True)
class Decision:
    """A verdict, with the delay tier (retry: 0 is the shortest) or the reason (dead letter),
    and when it was reached (the ``at`` of its audit record, however late it is settled)."""

    verdict: Verdict
    tier: int = 0
    reason: str | None = None
    error: str | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    counted: bool = True  # a retry that is an attempt of the message (an ``InProgress`` is not)


class _Deadline:
    """What Powertools asks a Lambda context for: how long an in-progress record may stand.

    ``seconds``, or less when the Lambda invocation ``context`` ends sooner: a record must never
    outlive the invocation that holds it."""

    def __init__(self, seconds: float, context: Any = None) -> None:
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        if callable(remaining):
            seconds = min(seconds, remaining() / 1000)
        self._until = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._until - time.monotonic()) * 1000))


# The longest an emergency handler may run, and so how long a record in progress blocks the
# other copies of an emergency after its consumer crashed (docs/dead-letters.md, Idempotency).
EMERGENCY_PROCESSING_TIMEOUT_S = 5.0


class Idempotency:
    """Runs a handler at most once to completion per (consumer, message id), on DynamoDB.

    Built on Powertools idempotency (the table: partition key ``id``, TTL ``expiration``). A
    record in progress blocks other copies of the message for as long as its handler may run: an
    emergency's (from a ``fabric.<group>.emergency`` work queue) ``emergency_timeout_s``, inside
    Lambda too (capped by the invocation's remaining time); any other message's
    ``processing_timeout_s`` outside Lambda, or the invocation's remaining time inside. That is
    also how long a consumer that crashed mid-handler blocks the message. A handler that runs
    past its window is logged: a copy delivered after the window may run too. A handler that
    raises leaves no record, so its retry runs again.
    """

    def __init__(
        self,
        table_name: str,
        *,
        consumer: str,
        client: Any = None,
        expires_after_s: int = 14 * 24 * 3600,
        processing_timeout_s: float = 60.0,
        emergency_timeout_s: float = EMERGENCY_PROCESSING_TIMEOUT_S,
    ) -> None:
        from aws_lambda_powertools.utilities.idempotency import (
            DynamoDBPersistenceLayer,
            IdempotencyConfig,
            idempotent_function,
        )

        self._config = IdempotencyConfig(
            event_key_jmespath="message_id",
            raise_on_no_idempotency_key=True,
            expires_after_seconds=expires_after_s,
        )
        self._timeout = processing_timeout_s
        self._emergency_timeout = emergency_timeout_s
        store = DynamoDBPersistenceLayer(table_name=table_name, boto3_client=client)

        @idempotent_function(  # type: ignore[untyped-decorator]
            data_keyword_argument="key",
            persistence_store=store,
            config=self._config,
            key_prefix=f"consumer#{consumer}",
        )
        def once(*, key: dict[str, str], handler: Handler, delivery: Delivery) -> None:
            handler(delivery)

        self._once = once

    def run(self, handler: Handler, delivery: Delivery, context: Any = None) -> None:
        """``handler(delivery)`` unless a copy of this message already completed.

        Raises:
            Retry: another copy is being processed right now.
            Systemic: the table cannot be reached.
            MessageRejected: the message id is not text: it cannot key a record (bad input,
                parked as poison).
            Exception: whatever the handler raises.
        """
        from aws_lambda_powertools.utilities.idempotency.exceptions import (
            IdempotencyAlreadyInProgressError,
            IdempotencyPersistenceLayerError,
        )

        if not isinstance(delivery.message_id, str):
            # Powertools hashes the key (``json.dumps``, in ``save_inprogress``) before it
            # calls the table, and wraps the ``TypeError`` of a key that is not text in the
            # ``IdempotencyPersistenceLayerError`` of a table that failed. Taken for an outage,
            # one message whose id was bytes paused its consumer for good on a healthy table.
            # A text key always hashes: what that error wraps below comes from the table.
            raise MessageRejected(
                Rejection(Reason.INVALID_MESSAGE_ID, "the message id is not text")
            )

        deadline: Any
        if is_emergency(delivery.queue):
            # An emergency's handler must be done within seconds: a Lambda's remaining time (up
            # to its timeout, minutes) blocked the alert that long after a crash.
            deadline = _Deadline(self._emergency_timeout, context)
        else:  # outside Lambda, a deadline object stands in for the context
            deadline = context or _Deadline(self._timeout)
        self._config.register_lambda_context(deadline)
        window_s = deadline.get_remaining_time_in_millis() / 1000
        finished: list[bool] = []

        def watched(item: Delivery) -> None:
            started = time.monotonic()
            handler(item)
            finished.append(True)
            took = time.monotonic() - started
            if took > window_s:
                _LOG.warning(
                    "the handler of %s ran %.1f s, past its in-progress window of %.1f s: a copy "
                    "delivered after the window may have been processed too",
                    item.message_id,
                    took,
                    window_s,
                )

        try:
            self._once(key={"message_id": delivery.message_id}, handler=watched, delivery=delivery)
        except IdempotencyAlreadyInProgressError:
            raise InProgress("another copy of this message is being processed") from None
        except IdempotencyPersistenceLayerError as exc:
            if finished:
                # The handler's side effect is done; only its COMPLETED record was not saved.
                # Handing the message back (Systemic) ran the handler a second time once the
                # in-progress record expired: settle it as done instead.
                _LOG.error(
                    "%s was processed but its idempotency record not saved: %s",
                    delivery.message_id,
                    type(exc.__cause__ or exc).__name__,
                )
                return
            raise Systemic("the idempotency table cannot be reached") from exc


@dataclass(frozen=True)
class MessageProcessor:
    """Runs a handler for one delivery and decides what becomes of it.

    Raises:
        ValueError: ``max_attempts`` is less than 1.
        TypeError: ``handler`` is an ``async def`` function (or an object whose ``__call__``
            is): the toolkit calls handlers synchronously, and a coroutine's body never runs.
    """

    handler: Handler
    idempotency: Idempotency | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if inspect.iscoroutinefunction(self.handler) or inspect.iscoroutinefunction(
            type(self.handler).__call__  # an object with an async __call__
        ):
            raise TypeError(
                "the handler is an async function: the consumer toolkit calls handlers "
                "synchronously, so its body would never run; give it a plain function "
                "(asyncio.run inside it, if it must await)"
            )

    def process(self, delivery: Delivery, context: Any = None) -> Decision:
        """Never raises: every outcome of the handler is a Decision."""
        if not delivery.message_id:
            return Decision(Verdict.DEAD_LETTER, reason="no-message-id")
        handler = functools.partial(_call, self.handler)
        try:
            if self.idempotency is None:
                handler(delivery)
            else:
                self.idempotency.run(handler, delivery, context)
        except Exception as exc:
            return self._failed(delivery, exc)
        return Decision(Verdict.DONE)

    def _failed(self, delivery: Delivery, exc: Exception) -> Decision:
        error = error_name(exc)
        if isinstance(exc, Systemic):
            _LOG.warning("systemic failure on %s: %s", delivery.message_id, error)
            return Decision(Verdict.SYSTEMIC, error=error)
        if isinstance(exc, Poison | DecryptionFailed | MessageRejected | HandlerReturnedAwaitable):
            # DecryptionFailed (fabric.protection.open_payload) and MessageRejected
            # (Delivery.envelope) say the message itself is bad: no retry can succeed. Nor can
            # one of a handler that returns an awaitable (its body never runs).
            return Decision(Verdict.DEAD_LETTER, reason="poison", error=error)
        # Attempt n waits in tier n-1: the tiers grow about sixfold (5 s, 30 s, 300 s);
        # attempts past the last tier wait in the last.
        tier = max(0, delivery.attempt - 1)
        if isinstance(exc, InProgress):  # not this message's failure: its attempts unspent
            return Decision(Verdict.RETRY, tier=tier, error=error, counted=False)
        _LOG.warning("attempt %d of %s failed: %s", delivery.attempt, delivery.message_id, error)
        if delivery.attempt >= self.max_attempts:
            return Decision(Verdict.DEAD_LETTER, reason="max-attempts", error=error)
        return Decision(Verdict.RETRY, tier=tier, error=error)


def _call(handler: Handler, delivery: Delivery) -> None:
    """``handler(delivery)``; an awaitable it returns is closed, never awaited.

    Raises:
        HandlerReturnedAwaitable: it returned one (inside ``Idempotency.run`` too, so that no
            record says the message was processed).
    """
    result = handler(delivery)
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if callable(close):
            close()  # no "coroutine was never awaited" warning, and nothing of it runs later
        raise HandlerReturnedAwaitable(f"the handler returned {type(result).__name__}")


def last_delivery(queue: str, count: int) -> bool:
    """Whether a delivery from ``queue`` whose ``x-delivery-count`` is ``count`` is the last the
    queue's delivery limit allows: returned once more, the broker dead-letters it itself,
    without an audit record. Only a fabric work queue's limit is known
    (``topology.DELIVERY_LIMIT``, *L*); a queue of the consumer's own is never at it.

    A quorum queue counts the returns of a message (a nack or reject with requeue, a channel or
    connection closed while it held the message unacknowledged: a crashed consumer) and, on the
    return that takes the count past its ``x-delivery-limit`` *L* (``count > L`` in rabbit_fifo),
    dead-letters it with ``x-death`` reason ``delivery_limit``. Each redelivery carries the count
    so far as ``x-delivery-count`` (absent on the first): the deliveries carry 0, 1, ..., *L*,
    and the one carrying *L* is the last (checked on RabbitMQ 3.10.8 with *L* = 10: eleven
    deliveries, 0 to 10, and the eleventh return dead-letters it). That last delivery still
    reaches the handler; only a return of it is the toolkit's to avoid.

    RabbitMQ 3.10 to 4.2 count every return, and ``x-delivery-count`` is that count. From 4.3
    (rabbitmq-server#15387) only a failed delivery raises it (a reject, a consumer that went
    down with the message), not a nack; but the header and the limit still share that count
    (rabbit_fifo's ``return_one`` compares ``delivery_count`` with the limit, and the same
    ``delivery_count`` becomes the header; 4.3's new ``x-acquired-count`` counts every
    acquisition and is not read here). There a nack at *L* would not dead-letter the message,
    and the consumer's park comes one return early, for a message that *L* consumers went down
    with. That is read in RabbitMQ's source, not run: only 3.10 runs here (the local broker and
    the drills)."""
    if count < topology.DELIVERY_LIMIT:
        return False
    try:
        group_of(queue)
    except ValueError:  # an SQS queue, or a queue of the consumer's own: its limit unknown
        return False
    return True


def error_name(exc: BaseException) -> str:
    """The class of ``exc`` as retry headers and audit records name it: its class's name, or
    the nearest base class's when that name is not one the audit writer takes (``ERROR_NAME``:
    ASCII, at most 64 characters; ``type()`` makes a class of any name). Never the exception's
    text, which may hold child data."""
    return next(cls.__name__ for cls in type(exc).__mro__ if ERROR_NAME.fullmatch(cls.__name__))


def _consumer_name(consumer: str) -> str:
    """``consumer``, checked: it is each audit record's ``source``, and the audit writer refuses
    a batch whose name is not a code (``fabric.audit_writer.CONSUMER_NAME``).

    Raises:
        ValueError: it is not (at most 64 of A-Z a-z 0-9 . _ : -).
    """
    if not CONSUMER_NAME.fullmatch(consumer):
        raise ValueError("a consumer name is at most 64 of A-Z a-z 0-9 . _ : - (no spaces)")
    return consumer


# -- RabbitMQ ---------------------------------------------------------------------------------


def group_of(work_queue: str) -> tuple[Stakeholder, bool]:
    """The group and path of a work queue name (``fabric.<group>[.emergency]``).

    Raises:
        ValueError: not a work queue of the fabric.
    """
    for group in Stakeholder:
        for emergency in (False, True):
            if topology.queue_name(group, emergency=emergency) == work_queue:
                return group, emergency
    raise ValueError(f"{work_queue!r} is not a work queue of the fabric")


def is_emergency(queue: str) -> bool:
    """Whether ``queue`` is an emergency work queue (``fabric.<group>.emergency``)."""
    try:
        return group_of(queue)[1]
    except ValueError:  # an SQS queue, or a queue of the consumer's own
        return False


def header_text(value: object) -> str | None:
    """An AMQP header value as text (pika gives bytes or numbers); None for tables and lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    return None


def string_headers(headers: Mapping[Any, Any] | None) -> dict[str, str]:
    """The headers a consumer sees and a republish keeps: strings and numbers, not ``x-*``.

    A header whose name is not text is left out: pika gives a name that is not UTF-8 as bytes,
    and ``startswith`` raised before the handler, at every delivery of the message (its
    queue-mates dead-lettered by the delivery limit, without an audit record)."""
    return {
        name: text
        for name, value in (headers or {}).items()
        if isinstance(name, str)
        and not name.startswith("x-")
        and (text := header_text(value)) is not None
    }


def rabbitmq_delivery(
    queue: str,
    *,
    message_id: object,
    topic: object,
    body: bytes,
    headers: Mapping[Any, Any] | None,
    correlation_id: object = None,
    redelivered: bool = False,
    reply_to: object = None,
) -> Delivery:
    """A Delivery from AMQP properties (the attempt comes from ``fabric-attempt``, the delivery
    count from ``x-delivery-count``).

    A property that is not text is taken as absent: pika gives a short string that is not
    UTF-8 as bytes, and a group's user can publish one into its own work queue (through its
    retry exchange). A message id that is not text is parked as ``no-message-id``, with its
    audit record; before, it raised in the settlement or the idempotency key (taken for a table
    outage), and the consumer stopped or paused at that message for good."""
    kept = string_headers(headers)
    return Delivery(
        message_id=_text(message_id) or "",
        topic=_text(topic) or "",
        body=body,
        queue=queue,
        attempt=_attempt(kept.get(topology.ATTEMPT_HEADER, "1")),
        headers=kept,
        correlation_id=_text(correlation_id),
        redelivered=redelivered,
        reply_to=_text(reply_to),
        delivery_count=delivery_count(headers),
    )


def _text(value: object) -> str | None:
    """``value`` if it is text; None otherwise (absent, or bytes that are not UTF-8)."""
    return value if isinstance(value, str) else None


def delivery_count(headers: Mapping[Any, Any] | None) -> int:
    """A RabbitMQ delivery's ``x-delivery-count`` (a quorum queue's returns of the message so
    far); 0 when it has none (its first delivery, or a classic queue)."""
    count = (headers or {}).get("x-delivery-count")
    return int(count) if isinstance(count, int) and not isinstance(count, bool) else 0


def _attempt(text: str) -> int:
    """The attempt a ``fabric-attempt`` header names; 1 for anything the toolkit does not write.

    ``str.isdigit`` passes "²" and digit strings longer than ``int`` converts (4,300 digits):
    either raised in the consume loop, which then stopped at that message each time."""
    if text.isascii() and text.isdigit() and len(text) <= _MAX_ATTEMPT_DIGITS:
        return max(1, int(text))
    return 1


_MAX_ATTEMPT_DIGITS = 9


def settlement_records(
    items: Sequence[tuple[Delivery, Decision]], stored: Sequence[bool], *, consumer: str
) -> list[AuditRecord]:
    """The audit records of what was settled: ``delivered`` (done), ``retried`` (with the
    attempt that failed and the delay queue), ``dead-lettered`` (with the reason and the DLQ).
    Nothing for what was not settled: it comes back.

    A message id or topic that is not in the envelope's syntax is recorded as absent: it is
    whatever the message's publisher set, and the trail is locked for seven years (the fabric
    itself only sends valid ones)."""
    records = []
    for (delivery, decision), done in zip(items, stored, strict=True):
        event = _EVENTS.get(decision.verdict)
        if not done or event is None:
            continue
        records.append(
            AuditRecord(
                event=event,
                at=decision.at,
                message_id=normalize_message_id(delivery.message_id),
                source=consumer,
                topic=delivery.topic if is_topic(delivery.topic) else None,
                body_sha256=sha256_hex(delivery.body),
                reason=decision.reason if event is AuditEvent.DEAD_LETTERED else decision.error,
                attempt=delivery.attempt,
                queues=(_destination(delivery, decision) or delivery.queue,),
            )
        )
    return records


_EVENTS = {
    Verdict.DONE: AuditEvent.DELIVERED,
    Verdict.RETRY: AuditEvent.RETRIED,
    Verdict.DEAD_LETTER: AuditEvent.DEAD_LETTERED,
}


def _destination(delivery: Delivery, decision: Decision) -> str | None:
    """Where a RabbitMQ retry or dead letter goes; None otherwise (done, or not a work queue)."""
    if decision.verdict not in (Verdict.RETRY, Verdict.DEAD_LETTER):
        return None
    try:
        group, emergency = group_of(delivery.queue)
    except ValueError:
        return None
    if decision.verdict is Verdict.RETRY:
        tiers = topology.retry_tiers(emergency=emergency)
        seconds = tiers[min(decision.tier, len(tiers) - 1)]
        return topology.retry_queue_name(group, seconds, emergency=emergency)
    return topology.dead_letter_queue_name(group, emergency=emergency)


# Audit records kept for the next batch while the audit path refuses them (bounded memory).
MAX_UNSENT_AUDIT_RECORDS = 10_000
# How soon an idle consumer sends kept-back audit batches again (``_AuditBacklog.resend``):
# first after this many seconds, then after twice as long each time the path refuses them, up
# to ``RESEND_MAX_WAIT_S``.
RESEND_FIRST_WAIT_S = 1.0
RESEND_MAX_WAIT_S = 60.0
# Kept-back audit batches sent with a batch in one publish (one confirm window): about 0.1 s of
# the consumer's thread on a local broker for one-record batches.
RESEND_CHUNK = 500


class _AuditBacklog:
    """Emits settlement records, and keeps each batch the audit path could not store: a
    settlement is never undone for its audit batch, but the batch goes out again, as it was
    prepared (its message ids: the batch ids by which the audit writer drops a batch it
    already wrote, so a batch whose confirm was lost but which was stored is not written
    twice), with the next batch, or once due while the consumer is idle (``resend``). Up to
    ``RESEND_CHUNK`` kept batches go with it in one publish, pipelined in one confirm window
    (``AuditSink.emit_each``), so a long backlog costs the consumer's thread a chunk at a
    time, not a round trip a batch; each batch stored leaves the backlog, each refused one
    stays (a full audit queue takes what it has room for). At most
    ``MAX_UNSENT_AUDIT_RECORDS`` records are kept, the oldest batches dropped beyond; a
    process that ends meanwhile loses them, as the log says.

    A refused batch is logged (``audit batch of ... could not be stored``: alarm on it) and,
    given ``metrics``, counted: ``AuditRecordsUnsent`` (kept for the next batch) and
    ``AuditRecordsLost`` (dropped beyond the bound)."""

    def __init__(
        self,
        audit: AuditSink | None,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._kept: deque[PreparedAudit] = deque()  # oldest first
        self._wait = RESEND_FIRST_WAIT_S
        self._resend_at = 0.0

    @property
    def kept(self) -> int:
        """The records kept back, waiting for the audit path."""
        return sum(len(batch.records) for batch in self._kept)

    def emit(self, records: list[AuditRecord]) -> None:
        if self._audit is None or not (records or self._kept):
            return
        # ``records`` join the backlog only once refused, and a kept batch leaves it only once
        # the audit path has it: an interrupt during the send (a SIGTERM while a settlement is
        # under way) loses none of them, and the consumer's second settlement on its way out
        # sends ``records`` again.
        fresh = self._audit.prepare(records) if records else None
        if not self._send(self._audit, fresh) and fresh is not None:
            self._keep(fresh)

    def resend(self) -> None:
        """Sends kept batches once due: a consumer with nothing to settle would otherwise keep
        them until its next settlement, or lose them when it stops."""
        if self._audit is None or not self._kept or self._clock() < self._resend_at:
            return
        self._send(self._audit, None)
        if self._kept:
            _LOG.warning(
                "kept-back audit batches could not be stored; %d consumer record(s) kept",
                self.kept,
            )

    def _send(self, audit: AuditSink, fresh: PreparedAudit | None) -> bool:
        """Sends the oldest ``RESEND_CHUNK`` kept batches and ``fresh`` together; those stored
        leave the backlog. Whether the last batch sent (``fresh``, when given) was stored."""
        chunk = list(itertools.islice(self._kept, RESEND_CHUNK))
        stored = audit.emit_each([*chunk, fresh] if fresh is not None else chunk)
        refused = [batch for batch, done in zip(chunk, stored, strict=False) if not done]
        # One assignment: an interrupt (a SIGTERM's SystemExit) leaves the backlog before or
        # after, never without the refused batches.
        self._kept = deque([*refused, *itertools.islice(self._kept, len(chunk), None)])
        if all(stored):
            self._wait = RESEND_FIRST_WAIT_S
            self._resend_at = self._clock()  # what is left of a long backlog: at the next look
        else:
            self._resend_at = self._clock() + self._wait
            self._wait = min(self._wait * 2, RESEND_MAX_WAIT_S)
        return bool(stored) and stored[-1]

    def _keep(self, prepared: PreparedAudit) -> None:
        """Keeps ``prepared``, refused; beyond the bound the oldest whole batches go (the
        newest is always kept)."""
        self._kept.append(prepared)
        kept, dropped = self.kept, 0
        while kept > MAX_UNSENT_AUDIT_RECORDS and len(self._kept) > 1:
            oldest = len(self._kept.popleft().records)
            kept, dropped = kept - oldest, dropped + oldest
        _LOG.error(
            "audit batch of %d consumer record(s) could not be stored; %d kept for the next, "
            "%d dropped",
            len(prepared.records),
            kept,
            dropped,
        )
        if self._metrics is not None:
            self._metrics.count(
                {
                    metric_names.AUDIT_RECORDS_UNSENT: kept,
                    metric_names.AUDIT_RECORDS_LOST: dropped,
                }
            )


class RabbitMqSettler:
    """Carries out retry and dead-letter decisions on RabbitMQ, through the group's retry
    exchange (the only exchange a stakeholder user may publish to, with the audit exchange),
    with confirms; audits what it settled when given an ``audit`` sink."""

    def __init__(
        self,
        transport_for: Callable[[Stakeholder], Transport],
        *,
        audit: AuditSink | None = None,
        consumer: str = "consumer",
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``transport_for(group)`` publishes to ``fabric.x.retry.<group>`` with the message's
        ``redeliver_to`` as routing key; ``consumer`` names the consumer in audit records;
        ``metrics`` (``fabric.adapters.emf.EmfMetrics``, say) counts the audit records the
        audit path refused (``AuditRecordsUnsent``, ``AuditRecordsLost``); ``clock`` times
        the resends of kept-back audit batches (``resend_audit``).

        Raises:
            ValueError: ``consumer`` is not a name the audit writer takes (``_consumer_name``).
        """
        self._transport_for = transport_for
        self._backlog = _AuditBacklog(audit, metrics, clock=clock)
        self._consumer = _consumer_name(consumer)

    def settle(self, items: Sequence[tuple[Delivery, Decision]]) -> list[bool]:
        """Republish each RETRY / DEAD_LETTER item; True where it is stored (DONE: True, no
        publish; SYSTEMIC: False). Order kept.

        The audit records of what was settled go out with the batches an earlier call could
        not store: a settlement is never undone for its audit batch (the message is where it
        belongs), but the batch is sent again, under its own batch ids, with the next one
        (up to ``MAX_UNSENT_AUDIT_RECORDS`` records kept) instead of being dropped."""
        stored = [decision.verdict is Verdict.DONE for _, decision in items]
        by_group: dict[Stakeholder, list[tuple[int, OutboundMessage]]] = {}
        for index, (delivery, decision) in enumerate(items):
            if decision.verdict in (Verdict.RETRY, Verdict.DEAD_LETTER):
                group, emergency = group_of(delivery.queue)
                by_group.setdefault(group, []).append(
                    (index, _republished(delivery, decision, group, emergency))
                )
        for group, entries in by_group.items():
            outcomes = self._transport_for(group).publish(message for _, message in entries)
            for (index, _), outcome in zip(entries, outcomes, strict=True):
                stored[index] = outcome.stored
        self._backlog.emit(settlement_records(items, stored, consumer=self._consumer))
        return stored

    def resend_audit(self) -> None:
        """Sends the audit batches kept back from earlier settlements once due (first after
        ``RESEND_FIRST_WAIT_S``, backing off to ``RESEND_MAX_WAIT_S`` while the path refuses
        them): for a consumer with nothing to settle, between deliveries."""
        self._backlog.resend()


def _republished(
    delivery: Delivery, decision: Decision, group: Stakeholder, emergency: bool
) -> OutboundMessage:
    headers = dict(delivery.headers)
    headers[topology.ERROR_HEADER] = decision.error or "unknown"
    destination = _destination(delivery, decision)
    if decision.verdict is Verdict.RETRY:
        headers[topology.ATTEMPT_HEADER] = str(delivery.attempt + int(decision.counted))
    else:
        headers[topology.DEAD_LETTER_REASON_HEADER] = decision.reason or "unknown"
        headers[topology.DEAD_LETTERED_AT_HEADER] = str(int(time.time()))
    return OutboundMessage(
        message_id=delivery.message_id,
        topic=delivery.topic,
        body=delivery.body,
        audience=frozenset({group}),
        emergency=emergency,
        headers=headers,
        correlation_id=delivery.correlation_id,
        reply_to=delivery.reply_to,
        redeliver_to=destination,
    )


class BatchFailed(FabricError):
    """Raised by the Amazon MQ batch handler so that the event source redelivers the batch."""


def rabbitmq_batch_handler(
    processor: MessageProcessor,
    settler: RabbitMqSettler,
    *,
    backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Callable[[Mapping[str, Any], Any], dict[str, int]]:
    """A Lambda handler for an Amazon MQ for RabbitMQ event source.

    Each message is processed on its own; failures go to their retry tier or DLQ before the
    function returns, so one bad message never fails its batch. Returns the counts per verdict.

    A systemic failure is tried again within the invocation, after waits doubling from
    ``backoff_s`` to ``max_backoff_s``, while the invocation has time left for another wait
    and a margin: every failed invocation is one more delivery of the whole batch, and the
    queue's delivery limit (10) would dead-letter healthy messages after ten quick failures.

    Raises:
        BatchFailed: a systemic failure that outlasted the invocation, or a retry/dead letter
            that could not be stored; the event source then redelivers the whole batch
            (handlers are idempotent).
    """

    def handler(event: Mapping[str, Any], context: Any) -> dict[str, int]:
        deliveries = list(_amazon_mq_deliveries(event))
        decisions: list[tuple[Delivery, Decision]] = []
        for delivery in deliveries:
            decision = processor.process(delivery, context)
            wait = backoff_s
            while decision.verdict is Verdict.SYSTEMIC and wait + _MARGIN_S < _left(context):
                sleep(wait)
                wait = min(wait * 2, max_backoff_s)
                decision = processor.process(delivery, context)
            if decision.verdict is Verdict.SYSTEMIC:
                raise BatchFailed(f"systemic failure: {decision.error}")
            decisions.append((delivery, decision))
        if not all(settler.settle(decisions)):
            raise BatchFailed("a retry or dead letter could not be stored")
        counts = {str(verdict): 0 for verdict in Verdict if verdict is not Verdict.SYSTEMIC}
        for _, decision in decisions:
            counts[str(decision.verdict)] += 1
        return counts

    return handler


# Time kept back from a Lambda invocation's end for settling and answering.
_MARGIN_S = 10.0


def _left(context: Any) -> float:
    """Seconds the invocation has left (0 without a Lambda context)."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    return remaining() / 1000 if callable(remaining) else 0.0


def _amazon_mq_deliveries(event: Mapping[str, Any]) -> Iterable[Delivery]:
    """Deliveries of an ``aws:rmq`` event: ``rmqMessagesByQueue`` maps ``queue::vhost`` to
    messages with ``basicProperties`` (headers: strings as ``{"bytes": [...]}``) and base64
    ``data``.

    Raises:
        ValueError: the event is not an Amazon MQ for RabbitMQ event.
    """
    by_queue = event.get("rmqMessagesByQueue")
    if event.get("eventSource") != "aws:rmq" or not isinstance(by_queue, Mapping):
        raise ValueError("not an Amazon MQ for RabbitMQ event")
    for key, messages in by_queue.items():
        queue = str(key).split("::", 1)[0]
        for message in messages:
            properties = message.get("basicProperties") or {}
            headers = {  # a table (no "bytes") stays a mapping, which string_headers leaves out
                name: bytes(value["bytes"])
                if isinstance(value, Mapping) and isinstance(value.get("bytes"), list)
                else value
                for name, value in (properties.get("headers") or {}).items()
            }
            yield rabbitmq_delivery(
                queue,
                message_id=properties.get("messageId"),
                topic=properties.get("type"),
                body=base64.b64decode(message.get("data", "")),
                headers=headers,
                correlation_id=properties.get("correlationId"),
                redelivered=bool(message.get("redelivered")),
                reply_to=properties.get("replyTo"),
            )


# -- SQS --------------------------------------------------------------------------------------


class RecordFailed(FabricError):
    """One SQS record failed; SQS retries it after its visibility timeout."""


def sqs_batch_handler(
    processor: MessageProcessor,
    *,
    audit: AuditSink | None = None,
    consumer: str = "consumer",
    max_receives: int | None = None,
    metrics: Metrics | None = None,
) -> Callable[[Mapping[str, Any], Any], dict[str, Any]]:
    """A Lambda handler for an SQS event source with ``ReportBatchItemFailures``.

    Returns exactly the failed records in ``batchItemFailures``. SQS spaces the retries by the
    queue's visibility timeout and parks a record in the queue's DLQ after ``maxReceiveCount``
    receives, so RETRY and DEAD_LETTER both report the record as failed here, and are audited
    as ``retried`` (SQS, not the toolkit, moves it to the DLQ), except on the last receive:
    given the queue's ``maxReceiveCount`` as ``max_receives``, a record that fails its last
    receive is audited ``dead-lettered`` (SQS parks it next), so the trail says where it went.
    ``metrics`` counts the audit records the audit path refused (see ``RabbitMqSettler``).

    Raises:
        ValueError: ``max_receives`` is not positive, or ``consumer`` is not a name the audit
            writer takes (``_consumer_name``).
    """
    if max_receives is not None and max_receives < 1:
        raise ValueError("max_receives must be the queue's maxReceiveCount, at least 1")
    _consumer_name(consumer)
    from aws_lambda_powertools.utilities.batch import (
        BatchProcessor,
        EventType,
        process_partial_response,
    )
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

    batch = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

    settled: list[tuple[Delivery, Decision]] = []
    backlog = _AuditBacklog(audit, metrics)  # a warm function sends what an invocation could not

    def record_handler(record: SQSRecord, lambda_context: Any = None) -> None:
        # Powertools passes the invocation's context to a handler that names ``lambda_context``:
        # an idempotency record in progress then stands for the invocation's remaining time,
        # not the 60 s default, so a copy arriving meanwhile is not processed a second time.
        delivery, malformed = _sqs_delivery(record)
        if malformed:  # not the fabric's: the handler would read headers it never sent
            decision = Decision(
                Verdict.DEAD_LETTER, reason="malformed-headers", error="MessageRejected"
            )
        else:
            decision = processor.process(delivery, lambda_context)
        last = max_receives is not None and delivery.attempt >= max_receives
        if last and decision.verdict is not Verdict.DONE:  # SQS parks it after this receive
            reason = decision.reason or "max-receives"
            decision = dataclasses.replace(decision, verdict=Verdict.DEAD_LETTER, reason=reason)
        elif decision.verdict is Verdict.DEAD_LETTER:
            decision = dataclasses.replace(decision, verdict=Verdict.RETRY)
        settled.append((delivery, decision))
        if decision.verdict is not Verdict.DONE:
            raise RecordFailed(f"{decision.verdict}: {decision.error or decision.reason}")

    def handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
        settled.clear()
        response = process_partial_response(
            event=dict(event), record_handler=record_handler, processor=batch, context=context
        )
        backlog.emit(settlement_records(settled, [True] * len(settled), consumer=consumer))
        return dict(response)

    return handler


def _sqs_delivery(record: Any) -> tuple[Delivery, bool]:
    """The delivery of an SQS record, and whether its ``fabric-headers`` attribute is malformed
    (not a JSON object of strings: its headers are then left out)."""
    from fabric.adapters.sns import HEADERS_ATTRIBUTE, MESSAGE_ID_ATTRIBUTE, TOPIC_ATTRIBUTE

    attributes = {name: value.string_value for name, value in record.message_attributes.items()}
    body = record.body.encode("utf-8")
    message_id = attributes.get(MESSAGE_ID_ATTRIBUTE)
    topic = attributes.get(TOPIC_ATTRIBUTE)
    headers_text = attributes.get(HEADERS_ATTRIBUTE)
    if not message_id or not topic:
        try:
            envelope = from_wire(body)
            message_id, topic = message_id or envelope.message_id, topic or envelope.topic
        except FabricError:
            message_id = message_id or ""
    headers = _json_headers(headers_text) if headers_text else {}
    receive_count = record.attributes.approximate_receive_count
    delivery = Delivery(
        message_id=message_id or "",
        topic=topic or "",
        body=body,
        queue=record.event_source_arn,
        attempt=int(receive_count) if receive_count else 1,
        headers=headers or {},
    )
    return delivery, headers is None


def _json_headers(text: str) -> dict[str, str] | None:
    """A JSON object of string values, or None. Before, a record whose headers did not parse
    raised before it was decided: failed on every receive, and parked by SQS without an
    audit record."""
    try:
        headers = json.loads(text)
    except ValueError:
        return None
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return None
    return headers
