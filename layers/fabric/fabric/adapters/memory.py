"""In-memory Transport, AuditSink, Metrics and FallbackSource: test doubles shipped with the
library."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fabric.audit import AuditRecord
from fabric.errors import TransportUnavailable
from fabric.ports import Failure, OutboundMessage, Outcome, PreparedAudit, Received


@dataclass
class MemoryTransport:
    """Stores what it is given in ``published``; ``failure`` makes every publish fail that way.

    ``fail_ids`` fails only the named message ids, to exercise partial failures.
    """

    name: str = "memory"
    failure: Failure | None = None
    fail_ids: set[str] = field(default_factory=set)
    published: list[OutboundMessage] = field(default_factory=list)

    def publish(
        self,
        messages: Iterable[OutboundMessage],
        *,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        """Store each message unless told to fail it; one Outcome per message, in order.

        ``meanwhile`` runs once every message is taken, before the outcomes are returned.
        """
        outcomes = []
        for message in messages:
            failure = self.failure or (
                Failure.NACKED if message.message_id in self.fail_ids else None
            )
            if failure is None:
                self.published.append(message)
                outcomes.append(Outcome(message.message_id, transport=self.name))
            else:
                outcomes.append(Outcome(message.message_id, failure=failure))
        if meanwhile is not None:
            meanwhile()
        return outcomes

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class MemoryAuditSink:
    """Keeps audit records in ``records``; ``available=False`` simulates a lost audit path."""

    available: bool = True
    records: list[AuditRecord] = field(default_factory=list)
    bodies: dict[str, bytes] = field(default_factory=dict)

    def prepare(
        self, records: Sequence[AuditRecord], bodies: Mapping[str, bytes] | None = None
    ) -> PreparedAudit:
        """Nothing to encode: the records are kept as they are."""
        return PreparedAudit(records, bodies or {})

    def emit(
        self,
        records: Sequence[AuditRecord],
        bodies: Mapping[str, bytes] | None = None,
        *,
        prepared: PreparedAudit | None = None,
    ) -> bool:
        """Keep the records (and bodies) when available."""
        if self.available:
            self.records.extend(records)
            self.bodies.update(bodies or {})
        return self.available

    def emit_each(self, batches: Sequence[PreparedAudit]) -> list[bool]:
        """``emit`` each batch, in order."""
        return [self.emit(batch.records, batch.bodies, prepared=batch) for batch in batches]


@dataclass
class MemoryMetrics:
    """Adds up every published count in ``totals``; ``calls`` counts the publications."""

    totals: Counter[str] = field(default_factory=Counter)
    calls: int = 0

    def count(self, counts: Mapping[str, int]) -> None:
        """Add ``counts`` to the totals."""
        self.totals.update(counts)
        self.calls += 1


@dataclass
class MemoryRedriveLedger:
    """The redrive ledger in memory; ``available=False`` simulates a ledger that cannot be read."""

    available: bool = True
    keys: set[str] = field(default_factory=set)

    def moved(self, keys: Sequence[str]) -> set[str]:
        """The recorded ``keys``.

        Raises:
            TransportUnavailable: when not available.
        """
        if not self.available:
            raise TransportUnavailable("the ledger is unavailable")
        return self.keys & set(keys)

    def record(self, keys: Sequence[str]) -> None:
        """Record ``keys``."""
        self.keys.update(keys)


@dataclass
class MemoryFallbackSource:
    """Fallback queues in memory, by queue name: ``queues`` holds what waits in each.

    A received message is hidden until deleted (a visibility timeout longer than any test);
    ``receives`` lists every receive as ``(queue, wait)``.
    """

    queues: dict[str, list[Received]] = field(default_factory=dict)
    receives: list[tuple[str, bool]] = field(default_factory=list)
    _hidden: dict[str, Received] = field(default_factory=dict, repr=False)

    def send(self, queue: str, *messages: Received) -> None:
        """Put ``messages`` at the back of ``queue``."""
        self.queues.setdefault(queue, []).extend(messages)

    def receive(self, queue: str, limit: int, *, wait: bool = True) -> list[Received]:
        """Up to ``limit`` (at most 10) messages from the front of ``queue``, now hidden."""
        self.receives.append((queue, wait))
        waiting = self.queues.setdefault(queue, [])
        taken, waiting[:] = waiting[: min(limit, 10)], waiting[min(limit, 10) :]
        self._hidden.update((item.handle, item) for item in taken)
        return taken

    def delete(self, queue: str, handles: Sequence[str]) -> set[str]:
        """Forget the received messages with these handles; returns the handles deleted."""
        return {handle for handle in handles if self._hidden.pop(handle, None) is not None}
