"""The overflow queue (``fabric.overflow``) as the redrive sees it (a ``DeadLetterQueue``).

A terminal queue (a group's DLQ, ``fabric.unrouted``, ``fabric.audit``) dead-letters a letter
that reaches its delivery limit into the overflow queue with its own name as routing key. Moving
puts each letter back in that queue through ``fabric.x.overflow.return``, as it was: the same
body and properties (message id, type, correlation id, reply-to, content type and encoding,
user-id, timestamp) and every header, ``x-death`` included, persistent (but for a reply-to
RabbitMQ reserves, which is left off: ``fabric.envelope.amqp_reply_to``). Two headers change:

- ``fabric-overflow-returns`` is raised by one. The ledger knows each overflow of a message by
  it, so a letter that overflows again after a return is a new occurrence that moves again,
  not one "already moved" and removed.
- ``fabric-dead-letter-reason`` and ``fabric-dead-lettered-at`` are written from the ``x-death``
  record of the original dead-lettering (the newest one not written by a terminal queue) when
  the letter lacks them. RabbitMQ 3.10 keeps a client's ``x-death``, 4.x ignores it; with these
  headers the DLQ redrive still reads the original reason and time on both.

Letters are published on a confirm-mode channel of the connection that holds them, mandatory,
one at a time, and acknowledged in the overflow queue only after their queue confirmed them. Not
through a ``Transport``: it republishes string headers only and sets its own properties. pika's
blocking confirm has no timeout: a broker that keeps the connection alive but never confirms
holds the run until the function's timeout, which closes the connection and gives every letter
back (one whose confirm was lost may then arrive twice, with the same message id).

A letter's user-id (an audit batch's publisher, which the audit writer checks) may change too:
RabbitMQ lets only that user publish it. A batch of a user the audit writer trusts
(``fabric.topology.TRUSTED_AUDIT_PUBLISHERS``: the platform's batches) goes back under this
connection's user when that user is trusted too (the redrive's); its records' ``publisher`` then
names the redrive.

A letter that cannot go back is never moved and never removed: its routing key (or the queue of
its newest ``x-death`` record) is not a terminal queue of this topology, or it carries a user-id
this connection's user may not publish it with (a stakeholder's consumer records: publishing
them without one, or as the redrive, would make the audit writer refuse them, or trust them).
``peek`` returns it in its place with ``stays`` saying why; the redrive counts and lists it, and
moves the others.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from fabric import topology
from fabric.adapters.rabbitmq import RabbitSettings
from fabric.adapters.rabbitmq_dlq import HeldLetters, count, dead_lettered_at, deaths
from fabric.consumer import header_text, string_headers
from fabric.envelope import amqp_reply_to
from fabric.errors import TransportUnavailable
from fabric.ports import DeadLetter

_LOG = logging.getLogger(__name__)
# How many times a letter was put back from the overflow queue: its ledger occurrence.
RETURNS_HEADER = "fabric-overflow-returns"
_REFUSED = (pika.exceptions.UnroutableError, pika.exceptions.NackError)
_DELIVERY_ERRORS = (pika.exceptions.AMQPError, OSError)


class RabbitMqOverflowQueue:
    """``fabric.overflow`` and the way back to each letter's terminal queue."""

    def __init__(
        self,
        settings: RabbitSettings,
        *,
        trusted: Collection[str] | None = None,
    ) -> None:
        """``trusted``: the users whose audit batches the audit writer trusts (see above; by
        default ``fabric.topology.TRUSTED_AUDIT_PUBLISHERS``)."""
        self.name = topology.OVERFLOW_QUEUE
        self._settings = settings
        self._trusted = frozenset(topology.TRUSTED_AUDIT_PUBLISHERS if trusted is None else trusted)
        self._held = HeldLetters(settings, self.name)
        self._terminal = frozenset(topology.terminal_queues())
        # What goes back, by handle: (terminal queue, properties to publish, body).
        self._returns: dict[str, tuple[str, pika.BasicProperties, bytes]] = {}
        self._publisher: BlockingChannel | None = None
        self.out_of_time = False  # the last move stopped at its budget (DeadLetterQueue)

    def peek(self, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` letters, held unacknowledged; one that cannot go back says why
        (``stays``).

        Raises:
            TransportUnavailable: the broker cannot be reached or the queue does not exist.
        """
        if not self._held.holding:  # a new connection: whatever was held went back
            self._returns.clear()
        taken = self._held.get(limit)
        user = self._settings.credentials()[0] if taken else ""
        return [
            self._letter(handle, routing_key, properties, body, user)
            for handle, routing_key, properties, body in taken
        ]

    def move(
        self, letters: Sequence[DeadLetter], *, budget_s: float | None = None
    ) -> list[DeadLetter]:
        """Publish each letter to the return exchange (confirmed, mandatory); returns the ones
        their terminal queue confirmed stored. None is published once ``budget_s`` is spent
        (``out_of_time`` then says so)."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        self.out_of_time = False
        moved: list[DeadLetter] = []
        for letter in letters:
            if deadline is not None and time.monotonic() >= deadline:
                self.out_of_time = True
                break  # the run's time is up: the rest stay
            held = self._returns.get(letter.handle)
            if held is None:
                continue  # one that cannot go back
            queue, properties, body = held
            try:
                self._publishing().basic_publish(
                    topology.OVERFLOW_RETURN_EXCHANGE, queue, body, properties, mandatory=True
                )
            except _REFUSED as exc:  # unroutable, or refused (the queue is full): it stays
                _LOG.warning("%s refused letter %r: %s", queue, letter.message_id, exc)
                continue
            except (TransportUnavailable, *_DELIVERY_ERRORS) as exc:
                _LOG.warning("cannot put letters back: %s", type(exc).__name__)
                self._publisher = None
                break
            moved.append(letter)
        return moved

    def remove(self, letters: Sequence[DeadLetter]) -> set[str]:
        """Acknowledge in the overflow queue; a lost channel means nothing more was removed."""
        # Only letters that can go back: one that cannot stays, whatever the ledger says.
        removed = self._held.ack(
            [h for h in (letter.handle for letter in letters) if h in self._returns]
        )
        for handle in removed:
            self._returns.pop(handle, None)
        return removed

    def release(self) -> int:
        """Close the connection: RabbitMQ gives every unacknowledged letter back at once (none
        stays hidden: 0)."""
        self._held.close()
        self._publisher = None
        self._returns.clear()
        return 0

    # -- internals ----------------------------------------------------------------------------

    def _publishing(self) -> BlockingChannel:
        if self._publisher is None or not self._publisher.is_open:
            channel = self._held.side_channel()
            channel.confirm_delivery()
            self._publisher = channel
        return self._publisher

    def _letter(
        self,
        handle: str,
        routing_key: str,
        properties: pika.BasicProperties,
        body: bytes,
        user: str,
    ) -> DeadLetter:
        headers: Mapping[str, Any] = properties.headers or {}
        records = deaths(headers)
        overflowed: Mapping[str, Any] = records[0] if records else {}
        original = next(
            (d for d in records if header_text(d.get("queue")) not in self._terminal), None
        )
        reason = (
            header_text(headers.get(topology.DEAD_LETTER_REASON_HEADER))
            or header_text((original or overflowed).get("reason"))
            or "unknown"
        )
        returns = count(headers.get(RETURNS_HEADER))
        # The user-id it goes back with: its own, or this connection's user's (see above).
        resigned = user if {properties.user_id, user} <= self._trusted else properties.user_id
        problem = _problem(routing_key, overflowed, resigned, user, self._terminal)
        if problem is None:
            returned = _returned(properties, original, returns)
            returned.user_id = resigned
            self._returns[handle] = (routing_key, returned, body)
        else:
            self._returns.pop(handle, None)
        return DeadLetter(
            handle=handle,
            message_id=str(properties.message_id or ""),
            topic=str(properties.type or ""),
            body=body,
            origin=routing_key,
            reason=reason,
            dead_lettered_at=dead_lettered_at(headers, original or overflowed),
            redrives=returns,
            headers=string_headers(headers),
            # One ledger entry per terminal queue and overflow: the same message may overflow
            # from two groups' DLQs, and again after it was put back.
            copy_id=f"{routing_key}#{returns}",
            correlation_id=properties.correlation_id,
            reply_to=properties.reply_to,
            stays=problem,
        )


def _problem(
    routing_key: str,
    overflowed: Mapping[str, Any],
    user_id: str | None,
    user: str,
    terminal: frozenset[str],
) -> str | None:
    """Why a letter cannot go back, or None."""
    if routing_key not in terminal:
        return f"its routing key {routing_key!r} is not a terminal queue of the fabric"
    came_from = header_text(overflowed.get("queue"))
    if came_from is not None and came_from != routing_key:
        return f"its routing key {routing_key!r} is not the queue it came from ({came_from!r})"
    if user_id and user_id != user:
        return f"published as {user_id!r}: only that broker user may publish it with its user-id"
    return None


def _returned(
    properties: pika.BasicProperties, original: Mapping[str, Any] | None, returns: int
) -> pika.BasicProperties:
    """The properties to put a letter back with: its own, persistent, the return counted, and
    the original dead-letter reason and time in headers when only ``x-death`` had them. A
    reply-to RabbitMQ reserves is left off (``fabric.envelope.amqp_reply_to``)."""
    headers = dict(properties.headers or {})
    headers[RETURNS_HEADER] = str(returns + 1)
    if original is not None:
        reason = header_text(original.get("reason"))
        if reason is not None:
            headers.setdefault(topology.DEAD_LETTER_REASON_HEADER, reason)
        moment = original.get("time")
        if isinstance(moment, datetime):
            headers.setdefault(topology.DEAD_LETTERED_AT_HEADER, str(int(moment.timestamp())))
    returned = copy.copy(properties)
    returned.headers = headers
    returned.reply_to = amqp_reply_to(properties.reply_to)
    returned.delivery_mode = pika.DeliveryMode.Persistent.value
    return returned
