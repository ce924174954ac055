"""Narrow ports between the fabric's logic and its adapters (transports, ciphers)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from fabric.audit import AuditRecord
from fabric.stakeholders import Stakeholder


class MessageKind(StrEnum):
    """What an OutboundMessage carries."""

    MESSAGE = "message"
    AUDIT = "audit"


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One encoded envelope, ready for a transport, with what routing decided about it.

    ``body`` is the wire form of the envelope (restricted payloads already encrypted);
    ``audience`` is what the routing table resolved (empty: unroutable, the transport must still
    store it where nothing is dropped); ``emergency`` selects the emergency path. ``kind`` tells
    a message apart from a batch of audit records, which travels on the audit path.
    """

    message_id: str
    topic: str
    body: bytes
    audience: frozenset[Stakeholder]
    emergency: bool = False
    kind: MessageKind = MessageKind.MESSAGE
    # Deliver to this one group work queue only (drain, redrive), instead of routing by topic.
    redeliver_to: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    correlation_id: str | None = None
    reply_to: str | None = None


class Failure(StrEnum):
    """Why a transport did not take a message; every one of these means "try the fallback"."""

    UNAVAILABLE = "unavailable"  # no connection, connection lost, blocked, channel closed
    NACKED = "nacked"  # the broker refused to store it (e.g. queue full with reject-publish)
    RETURNED = "returned"  # mandatory message that no queue took
    TIMEOUT = "timeout"  # no confirm within the confirm timeout: fate unknown, store it elsewhere


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one OutboundMessage: stored by ``transport``, or ``failure``."""

    message_id: str
    transport: str | None = None
    failure: Failure | None = None

    @property
    def stored(self) -> bool:
        """True only when the transport confirmed the message is durably stored."""
        return self.failure is None and self.transport is not None


class Transport(Protocol):
    """Publishes messages and reports, per message and in order, whether each is stored.

    A transport never raises for a broker or network problem: it reports ``Failure`` outcomes,
    so that the caller can send exactly those messages elsewhere.
    """

    name: str

    def publish(
        self,
        messages: Iterable[OutboundMessage],
        *,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        """Publish and wait for confirmation; one Outcome per message, in iteration order.

        ``messages`` may be a generator: a transport may consume it lazily, so that preparing
        later messages overlaps with the broker storing earlier ones. ``meanwhile``, if given,
        is called at most once, after the last message was sent and while the transport waits
        for outcomes, so that the caller's work overlaps with the broker's; a transport with no
        such wait may call it before returning, or not at all.
        """
        ...

    def close(self) -> None:
        """Release connections; the transport may be used again (it reconnects)."""
        ...


class PayloadCipher(Protocol):
    """Message-level encryption of restricted payloads, bound to an encryption context."""

    def encrypt(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        """Encrypt ``plaintext``; ``context`` is authenticated and must match on decrypt.

        Raises:
            EncryptionUnavailable: the key service cannot be reached or refuses the key.
        """
        ...

    def decrypt(self, ciphertext: bytes, expected_context: Mapping[str, str]) -> bytes:
        """Decrypt and check that the stored context contains ``expected_context``.

        Raises:
            DecryptionFailed: the ciphertext is corrupt, the key is not allowed, or the context
                does not match (the message is bad: dead-letter it).
            EncryptionUnavailable: the key service cannot be reached (retry later).
        """
        ...


@dataclass(frozen=True)
class PreparedAudit:
    """An audit batch encoded ahead of its ``emit`` by ``AuditSink.prepare``: the records and
    bodies it was made from, and the sink's encoded form of them."""

    records: Sequence[AuditRecord]
    bodies: Mapping[str, bytes]
    encoded: Sequence[OutboundMessage] = ()

    def made_from(self, records: Sequence[AuditRecord], bodies: Mapping[str, bytes]) -> bool:
        """Whether it was prepared from these very objects (identity, not equality: the check
        costs a pointer comparison a record, and an equal copy is no reason to trust it)."""
        return (
            len(records) == len(self.records)
            and len(bodies) == len(self.bodies)
            and all(mine is theirs for mine, theirs in zip(self.records, records, strict=True))
            and all(self.bodies.get(digest) is body for digest, body in bodies.items())
        )


class AuditSink(Protocol):
    """Stores audit records durably (batched; one call per router batch)."""

    def prepare(
        self, records: Sequence[AuditRecord], bodies: Mapping[str, bytes] | None = None
    ) -> PreparedAudit:
        """Encode what ``emit`` would send for ``records`` and ``bodies``, without I/O, so
        that a caller can do it while a broker is still storing its messages."""
        ...

    def emit(
        self,
        records: Sequence[AuditRecord],
        bodies: Mapping[str, bytes] | None = None,
        *,
        prepared: PreparedAudit | None = None,
    ) -> bool:
        """Store ``records`` (and, for the archive, the stored ``bodies`` they name by SHA-256
        hex); True only when they are durably stored. Never raises for I/O.

        ``prepared`` is used when it was made from these same records and bodies
        (``PreparedAudit.made_from``), and ignored otherwise.
        """
        ...

    def emit_each(self, batches: Sequence[PreparedAudit]) -> list[bool]:
        """Store several batches this sink prepared, together (on a broker: one publish, one
        confirm window); whether each was stored whole, in order. Never raises for I/O."""
        ...


class Metrics(Protocol):
    """Operational counters (names in ``fabric.metrics``), published once per call."""

    def count(self, counts: Mapping[str, int]) -> None:
        """Publish ``counts`` (metric name to count). Never raises: metrics are best effort."""
        ...


@dataclass(frozen=True)
class Received:
    """One message taken from a fallback queue, with what the drain needs to put it back."""

    handle: str
    body: bytes
    message_id: str
    topic: str
    headers: Mapping[str, str] = field(default_factory=dict)
    # The times the queue has handed it out, this receive included (SQS's
    # ApproximateReceiveCount); 0 where the source does not say.
    receives: int = 0
    # The group names it was published for: the SNS ``audience`` attribute, which the router's
    # fallback transport sets on every message (``fabric.adapters.sns``), read strictly as a
    # JSON list of strings. None when it carries no such attribute, or one that is no such list
    # (then ``audience_unreadable``): never guessed from anything else.
    audience: frozenset[str] | None = None
    audience_unreadable: bool = False


class FallbackSource(Protocol):
    """The fallback queues, seen from the drain: receive, and delete what is safe elsewhere."""

    def receive(self, queue: str, limit: int, *, wait: bool = True) -> list[Received]:
        """Up to ``limit`` messages, hidden from other receivers for the queue's visibility time.

        ``wait``: wait a moment for messages, so that an empty answer means an empty queue;
        ``False`` answers at once and may miss messages (a cheap look that is asked again).

        Raises:
            TransportUnavailable: the queue service cannot be reached.
        """
        ...

    def delete(self, queue: str, handles: Sequence[str]) -> set[str]:
        """Delete by receive handle; returns the handles actually deleted (every entry checked)."""
        ...


@dataclass(frozen=True)
class DeadLetter:
    """One message held in a dead-letter queue, with what the redrive needs to put it back.

    ``handle`` is the source's own (an AMQP delivery tag, an SQS receipt handle); ``origin`` is
    where it goes back to (a RabbitMQ work queue, an SQS source queue URL); ``reason`` says why
    it was dead-lettered; ``redrives`` counts earlier redrives of this message from this queue;
    ``copy_id`` names this dead-letter copy where the queue has such an id (SQS: every redrive
    sends a new message, so a message dead-lettered again arrives under a new id).
    ``correlation_id`` and ``reply_to`` are the message's AMQP properties, kept on the way back.
    ``stays`` says why a letter cannot go back by itself (its queue keeps it; the redrive counts
    and lists it, and moves the others).
    """

    handle: str
    message_id: str
    topic: str
    body: bytes
    origin: str
    reason: str
    dead_lettered_at: datetime | None
    redrives: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    copy_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    stays: str | None = None


class DeadLetterQueue(Protocol):
    """A dead-letter queue, seen from the redrive: look, put back, then remove.

    Letters returned by ``peek`` are held (hidden from other readers) until ``remove`` or
    ``release``; a crash releases them by itself (channel closed, visibility timeout).

    ``out_of_time``: whether the last ``move`` (and, for a ``fabric.redrive.TimeBoundQueue``,
    ``peek`` or ``remove``) stopped for the run's time: for a move, letters left unsent because
    its ``budget_s`` was spent (the run stops ``time limit``, and the runbook goes on with its
    next chunk). Letters a move did not put back for any other reason were refused or are in
    doubt (the run stops ``origin unavailable``), even when the run's time ran out while it
    waited for an answer.
    """

    name: str
    out_of_time: bool

    def peek(self, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` letters not yet seen in this run; empty when none are left.

        Raises:
            TransportUnavailable: the queue cannot be reached.
        """
        ...

    def move(
        self, letters: Sequence[DeadLetter], *, budget_s: float | None = None
    ) -> list[DeadLetter]:
        """Put ``letters`` back at their origin (redrive count + 1, headers kept); returns the
        ones the origin confirmed stored. They are still in the dead-letter queue.

        ``budget_s``: the seconds the run has left (None: no limit). A queue that puts letters
        back in several requests starts none once it is spent; the letters it did not send are
        not moved (they stay).
        """
        ...

    def remove(self, letters: Sequence[DeadLetter]) -> set[str]:
        """Remove ``letters`` from the dead-letter queue; the handles actually removed (the
        others stay: the run stops ``dead-letter queue unavailable``)."""
        ...

    def release(self) -> int:
        """Give back every held letter not removed (end of a run, or a dry run); returns how
        many of them the queue could not show again: they stay hidden until they come back by
        themselves (on SQS, when their hold ends), and a run started before then misses them."""
        ...


class RedriveLedger(Protocol):
    """Which dead letters a redrive already put back, so a re-run never moves one twice."""

    def moved(self, keys: Sequence[str]) -> set[str]:
        """The ``keys`` recorded as moved.

        Raises:
            TransportUnavailable: the ledger cannot be read (nothing may be moved then).
        """
        ...

    def record(self, keys: Sequence[str]) -> None:
        """Record ``keys`` as moved (kept for the dead-letter retention period, 14 days).

        Raises:
            TransportUnavailable: the ledger cannot be written.
        """
        ...
