"""A RabbitMQ dead-letter queue as the redrive sees it (``fabric.ports.DeadLetterQueue``).

Letters are taken with ``basic.get`` and left unacknowledged: RabbitMQ hands an unacknowledged
message to nobody else, and gives it back when the channel closes, so a run walks the queue once
and whatever it does not remove returns by itself, also after a crash. Moving republishes a
letter to its work queue through the redeliver exchange (never through routing, which would give
the other groups a second copy), with its body, message id, correlation, reply-to (not one
RabbitMQ reserves: ``fabric.envelope.amqp_reply_to``), topic and application headers (the
letter's ``headers``, where the redrive sets its mark, ``fabric-redrive-id``: the toolkit and the
broker keep it when they dead-letter the message again), and the redrive counter raised; only
then is it acknowledged in the DLQ.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from fabric import topology
from fabric.adapters.rabbitmq import RabbitSettings, open_blocking_connection
from fabric.consumer import header_text, string_headers
from fabric.errors import TransportUnavailable
from fabric.ports import DeadLetter, OutboundMessage, Transport
from fabric.stakeholders import Stakeholder

_LOG = logging.getLogger(__name__)
# Headers that describe one dead-lettering or one attempt; a redriven message starts afresh.
_DROPPED_HEADERS = frozenset(
    {
        topology.ATTEMPT_HEADER,
        topology.DEAD_LETTER_REASON_HEADER,
        topology.DEAD_LETTERED_AT_HEADER,
        topology.ERROR_HEADER,
        topology.REDRIVES_HEADER,
    }
)
_DELIVERY_ERRORS = (pika.exceptions.AMQPError, OSError)


class HeldLetters:
    """One queue read with ``basic.get`` and left unacknowledged on one connection of one run.

    What ``get`` took stays held until ``ack`` or ``close``; a lost connection gives it all
    back. Shared by the dead-letter queues and the overflow queue (``rabbitmq_overflow``).
    """

    def __init__(self, settings: RabbitSettings, queue: str) -> None:
        self.queue = queue
        self._settings = settings
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def get(self, limit: int) -> list[tuple[str, str, pika.BasicProperties, bytes]]:
        """Up to ``limit`` letters as (handle, routing key, properties, body), held.

        Raises:
            TransportUnavailable: the broker cannot be reached or the queue does not exist.
        """
        channel = self._open()
        taken: list[tuple[str, str, pika.BasicProperties, bytes]] = []
        try:
            while len(taken) < limit:
                method, properties, body = channel.basic_get(self.queue, auto_ack=False)
                if method is None:
                    break
                taken.append((str(method.delivery_tag), method.routing_key, properties, body))
        except _DELIVERY_ERRORS as exc:
            self.close()
            raise TransportUnavailable(f"cannot read {self.queue}: {type(exc).__name__}") from exc
        return taken

    def ack(self, handles: Sequence[str]) -> set[str]:
        """Acknowledge (remove) held letters; a lost channel means nothing more was removed."""
        removed: set[str] = set()
        if self._channel is None:
            return removed
        try:
            for handle in handles:
                self._channel.basic_ack(int(handle))
                removed.add(handle)
            # An ack has no reply; a cheap round trip makes sure the broker has read them. Not a
            # passive queue.declare: RabbitMQ 4.2.6 and 4.3.0 want configure permission for it,
            # which the platform user does not have; basic.qos needs none (and only affects
            # consumers, which this channel has none of: it takes letters with basic.get).
            self._channel.basic_qos(prefetch_count=0)
        except _DELIVERY_ERRORS as exc:
            _LOG.warning("letters not acknowledged in %s: %s", self.queue, type(exc).__name__)
            self.close()
            return set()
        return removed

    @property
    def holding(self) -> bool:
        """Whether the connection that took the letters is still open (holding them)."""
        return self._connection is not None and self._connection.is_open

    def side_channel(self) -> BlockingChannel:
        """A new channel on the connection that holds the letters, never on a new one: once
        that connection is lost, the letters are back in the queue and must not be moved.

        Raises:
            TransportUnavailable: the connection is gone, or the channel cannot be opened.
        """
        if self._connection is None or not self._connection.is_open:
            raise TransportUnavailable(f"the letters of {self.queue} are no longer held")
        try:
            return self._connection.channel()
        except _DELIVERY_ERRORS as exc:
            self.close()
            raise TransportUnavailable(f"cannot open a channel: {type(exc).__name__}") from exc

    def close(self) -> None:
        """Close the connection: RabbitMQ gives every unacknowledged letter back to the queue."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(*_DELIVERY_ERRORS):
                connection.close()

    def _open(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self.close()
        try:
            self._connection = open_blocking_connection(self._settings)
            self._channel = self._connection.channel()
        except _DELIVERY_ERRORS as exc:
            self.close()
            raise TransportUnavailable(f"cannot open {self.queue}: {type(exc).__name__}") from exc
        return self._channel


class RabbitMqDeadLetterQueue:
    """One group's dead-letter queue (``fabric.<group>[.emergency].dlq``) and its way back."""

    def __init__(self, settings: RabbitSettings, queue: str, *, origin: Transport) -> None:
        """``origin`` publishes to the broker; messages with ``redeliver_to`` set must reach the
        redeliver exchange (``fabric.bootstrap.exchange_for`` does that).

        Raises:
            ValueError: ``queue`` is not one of the fabric's dead-letter queues.
        """
        self.name = queue
        self._work_queue = topology.work_queue_of(queue)
        self._group = Stakeholder(queue.split(".")[1])
        self._emergency = self._work_queue.endswith(".emergency")
        self._held = HeldLetters(settings, queue)
        self._origin = origin
        self.out_of_time = False  # never: a move sends its whole batch at once

    def peek(self, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` letters, held unacknowledged on this run's channel.

        Raises:
            TransportUnavailable: the broker cannot be reached or the queue does not exist.
        """
        return [
            self._letter(handle, properties, body)
            for handle, _, properties, body in self._held.get(limit)
        ]

    def move(
        self, letters: Sequence[DeadLetter], *, budget_s: float | None = None
    ) -> list[DeadLetter]:
        """Republish to the work queue with confirms; returns the letters confirmed stored.
        ``budget_s`` is not needed: the batch goes out at once, its confirms bounded by the
        publisher's confirm timeout."""
        outcomes = self._origin.publish(self._outbound(letter) for letter in letters)
        return [letter for letter, outcome in zip(letters, outcomes, strict=True) if outcome.stored]

    def remove(self, letters: Sequence[DeadLetter]) -> set[str]:
        """Acknowledge in the DLQ; a lost channel means nothing more was removed."""
        return self._held.ack([letter.handle for letter in letters])

    def release(self) -> int:
        """Close the channel: RabbitMQ gives every unacknowledged letter back to the queue at
        once (none stays hidden: 0)."""
        self._held.close()
        self._origin.close()
        return 0

    # -- internals ----------------------------------------------------------------------------

    def _letter(self, handle: str, properties: pika.BasicProperties, body: bytes) -> DeadLetter:
        headers: Mapping[str, Any] = properties.headers or {}
        records = deaths(headers)
        last_death: Mapping[str, Any] = records[0] if records else {}
        reason = header_text(headers.get(topology.DEAD_LETTER_REASON_HEADER)) or header_text(
            last_death.get("reason")
        )
        return DeadLetter(
            handle=handle,
            message_id=str(properties.message_id or ""),
            topic=str(properties.type or ""),
            body=body,
            origin=self._work_queue,
            reason=reason or "unknown",
            dead_lettered_at=dead_lettered_at(headers, last_death),
            redrives=count(headers.get(topology.REDRIVES_HEADER)),
            correlation_id=properties.correlation_id,
            reply_to=properties.reply_to,
            headers={
                name: text
                for name, text in string_headers(headers).items()
                if name not in _DROPPED_HEADERS
            },
        )

    def _outbound(self, letter: DeadLetter) -> OutboundMessage:
        return OutboundMessage(
            message_id=letter.message_id,
            topic=letter.topic,
            body=letter.body,
            audience=frozenset({self._group}),
            emergency=self._emergency,
            headers={**letter.headers, topology.REDRIVES_HEADER: str(letter.redrives + 1)},
            redeliver_to=letter.origin,
            correlation_id=letter.correlation_id,
            reply_to=letter.reply_to,
        )


# Headers a letter carries are anyone's (a client may publish ``x-death`` and ``fabric-*``
# headers on RabbitMQ 3.10): reading one that is malformed must not stop a run at that letter,
# which would keep every letter behind it in the queue. A bad value reads as absent.
_MAX_COUNT_DIGITS = 18  # int() refuses past 4300 digits; a real count has a few


def deaths(headers: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A letter's ``x-death`` records, newest first; none when the header is not a list."""
    records = headers.get("x-death")
    if not isinstance(records, list):
        return []
    return [record for record in records if isinstance(record, Mapping)]


def count(value: object) -> int:
    """A counter header (``fabric-redrives``, ...) as a number; 0 when absent or not one."""
    text = header_text(value)
    if text is None or not text.isascii() or not text.isdigit():
        return 0  # "²" is a digit to isdigit() and not a number to int()
    return int(text) if len(text) <= _MAX_COUNT_DIGITS else 0


def dead_lettered_at(headers: Mapping[str, Any], death: Mapping[str, Any]) -> datetime | None:
    """When a letter was dead-lettered: ``fabric-dead-lettered-at``, else the time of the
    ``x-death`` record ``death``."""
    stamp = header_text(headers.get(topology.DEAD_LETTERED_AT_HEADER))
    if stamp is not None:
        # Out of range: ValueError (year), OverflowError or OSError (time_t), by magnitude.
        with contextlib.suppress(ValueError, OverflowError, OSError):
            return datetime.fromtimestamp(float(stamp), UTC)
    moment = death.get("time")
    return moment if isinstance(moment, datetime) else None
