"""A RabbitMQ dead-letter queue as the redrive sees it (``fabric.ports.DeadLetterQueue``).

Letters are taken with ``basic.get`` and left unacknowledged: RabbitMQ hands an unacknowledged
message to nobody else, and gives it back when the channel closes, so a run walks the queue once
and whatever it does not remove returns by itself, also after a crash. Moving republishes a
letter to its work queue through the redeliver exchange (never through routing, which would give
the other groups a second copy), with its body, message id, correlation, topic and application
headers, and the redrive counter raised; only then is it acknowledged in the DLQ.
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
        self._settings = settings
        self._origin = origin
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def peek(self, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` letters, held unacknowledged on this run's channel.

        Raises:
            TransportUnavailable: the broker cannot be reached or the queue does not exist.
        """
        channel = self._open()
        letters: list[DeadLetter] = []
        try:
            while len(letters) < limit:
                method, properties, body = channel.basic_get(self.name, auto_ack=False)
                if method is None:
                    break
                letters.append(self._letter(str(method.delivery_tag), properties, body))
        except _DELIVERY_ERRORS as exc:
            self._close()
            raise TransportUnavailable(f"cannot read {self.name}: {type(exc).__name__}") from exc
        return letters

    def move(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        """Republish to the work queue with confirms; returns the letters confirmed stored."""
        outcomes = self._origin.publish(self._outbound(letter) for letter in letters)
        return [letter for letter, outcome in zip(letters, outcomes, strict=True) if outcome.stored]

    def remove(self, letters: Sequence[DeadLetter]) -> set[str]:
        """Acknowledge in the DLQ; a lost channel means nothing more was removed."""
        removed: set[str] = set()
        if self._channel is None:
            return removed
        try:
            for letter in letters:
                self._channel.basic_ack(int(letter.handle))
                removed.add(letter.handle)
            # An ack has no reply; a cheap round trip makes sure the broker has read them.
            self._channel.queue_declare(self.name, passive=True)
        except _DELIVERY_ERRORS as exc:
            _LOG.warning("dead letters not acknowledged in %s: %s", self.name, type(exc).__name__)
            self._close()
            return set()
        return removed

    def release(self) -> None:
        """Close the channel: RabbitMQ gives every unacknowledged letter back to the queue."""
        self._close()
        self._origin.close()

    # -- internals ----------------------------------------------------------------------------

    def _open(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self._close()
        try:
            self._connection = open_blocking_connection(self._settings)
            self._channel = self._connection.channel()
        except _DELIVERY_ERRORS as exc:
            self._close()
            raise TransportUnavailable(f"cannot open {self.name}: {type(exc).__name__}") from exc
        return self._channel

    def _close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(*_DELIVERY_ERRORS):
                connection.close()

    def _letter(self, handle: str, properties: pika.BasicProperties, body: bytes) -> DeadLetter:
        headers: Mapping[str, Any] = properties.headers or {}
        deaths = headers.get("x-death") or []
        last_death: Mapping[str, Any] = deaths[0] if deaths else {}
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
            dead_lettered_at=_dead_lettered_at(headers, last_death),
            redrives=_count(headers.get(topology.REDRIVES_HEADER)),
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


def _count(value: object) -> int:
    text = header_text(value)
    return int(text) if text is not None and text.isdigit() else 0


def _dead_lettered_at(headers: Mapping[str, Any], last_death: Mapping[str, Any]) -> datetime | None:
    stamp = header_text(headers.get(topology.DEAD_LETTERED_AT_HEADER))
    if stamp is not None:
        with contextlib.suppress(ValueError, OverflowError):
            return datetime.fromtimestamp(float(stamp), UTC)
    moment = last_death.get("time")
    return moment if isinstance(moment, datetime) else None
