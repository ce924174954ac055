"""The router: validate, admit, protect and publish a batch; one result per message, in order.

A message is ``accepted`` only when a transport confirmed it durably stored; everything else is
``rejected`` with a reason code. Every message, accepted or rejected, leaves one audit record.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from fabric import metrics
from fabric.audit import AuditEvent, AuditRecord, sha256_hex
from fabric.envelope import (
    MAX_ENCODED_BYTES,
    Classification,
    Envelope,
    JsonValue,
    Reason,
    Rejection,
    validate_envelope,
)
from fabric.errors import EncryptionUnavailable
from fabric.jsoncodec import canonical_json
from fabric.ports import (
    AuditSink,
    Failure,
    Metrics,
    OutboundMessage,
    Outcome,
    PayloadCipher,
    PreparedAudit,
    Transport,
)
from fabric.protection import encryption_context, seal_payload
from fabric.routing import Delivery, RoutingTable
from fabric.stakeholders import Stakeholder
from fabric.topology import delivery_headers, routed_queues

_LOG = logging.getLogger(__name__)

ACCEPTED = "accepted"
REJECTED = "rejected"
UNAUTHENTICATED_SOURCE = "unauthenticated"
"""The ``source`` of a refused request's audit record when it named no stakeholder group."""
_PLAN_CACHE_LIMIT = 1_000
_KEYS_DOWN = "the key service cannot be used to encrypt this restricted message; retry later"


@dataclass(frozen=True, slots=True)
class MessageResult:
    """The router's answer for one input message (the public result shape of DESIGN §4)."""

    message_id: str | None
    status: str
    transport: str | None = None
    reason: Reason | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        """``{"message_id", "status", "transport"?, "reason"?, "detail"?}``."""
        out: dict[str, str | None] = {"message_id": self.message_id, "status": self.status}
        if self.transport is not None:
            out["transport"] = self.transport
        if self.reason is not None:
            out["reason"] = str(self.reason)
        if self.detail is not None:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True, slots=True)
class BatchResult:
    """All results of one router call, in input order.

    ``audited`` is False when the call's audit records could not be stored on any path: the
    answers stand (a producer is never told something false), but an entry point that can
    still say "not done", as SQS ingest can, does not let the messages go without their records.
    It is not part of the answer producers receive.
    """

    results: tuple[MessageResult, ...]
    audited: bool = True

    @property
    def accepted(self) -> int:
        """How many messages are durably stored."""
        return sum(r.status == ACCEPTED for r in self.results)

    @property
    def rejected(self) -> int:
        """How many messages were refused or could not be stored."""
        return len(self.results) - self.accepted

    def to_dict(self) -> dict[str, object]:
        """``{"results": [...], "accepted": n, "rejected": m}``."""
        return {
            "results": [r.to_dict() for r in self.results],
            "accepted": self.accepted,
            "rejected": self.rejected,
        }


@dataclass(frozen=True, slots=True)
class _Plan:
    """Where one set of deliveries goes; a router sees few distinct sets, so each is worked
    out once (see ``Router._plan_for``)."""

    audience: frozenset[Stakeholder]
    groups: tuple[str, ...]  # sorted, as audit records list them
    emergency: bool
    queues: tuple[str, ...]  # sorted; the unrouted queue when the table routes it nowhere

    @classmethod
    def of(cls, deliveries: frozenset[Delivery]) -> _Plan:
        audience = frozenset(d.group for d in deliveries)
        return cls(
            audience=audience,
            groups=tuple(sorted(audience)),
            emergency=any(d.emergency for d in deliveries),
            queues=routed_queues(deliveries),
        )


@dataclass(slots=True)
class _Keys:
    """Whether the key service failed earlier in this call."""

    down: bool = False


@dataclass(slots=True)
class _Admitted:
    index: int
    envelope: Envelope
    outbound: OutboundMessage
    encrypted: bool
    plan: _Plan  # where the routing table sends it
    digest: str  # SHA-256 hex of outbound.body, the stored bytes
    # Its accepted and routed records if the first transport stores it, encoded while the
    # broker is still storing earlier messages rather than after the last confirm.
    expected: tuple[AuditRecord, ...] = ()


class Router:
    """Routes batches of raw messages from one authenticated source.

    ``transports`` are tried in order for the messages the previous one could not store (the
    broker first, then the fallback path); a message none of them stores is rejected with
    ``unavailable``. ``metrics``, when given, receives the call's counts per outcome (see
    ``fabric.metrics``): how many went to the broker, to the fallback, were refused, or could
    not be stored at all.
    """

    def __init__(
        self,
        *,
        table: RoutingTable,
        transports: Sequence[Transport],
        cipher: PayloadCipher,
        audit: AuditSink,
        environment: str,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not transports:
            raise ValueError("the router needs at least one transport")
        self._table = table
        self._transports = tuple(transports)
        self._cipher = cipher
        self._audit = audit
        self._environment = environment
        self._metrics = metrics
        self._clock = clock
        self._plans: dict[frozenset[Delivery], _Plan] = {}

    def route(
        self,
        items: Sequence[bytes | str | JsonValue],
        *,
        source: str,
        default_ids: Sequence[str | None] | None = None,
    ) -> BatchResult:
        """Validate, admit, encrypt restricted payloads, publish; one result per item, in order.

        ``default_ids``, one per item when given, is the message id of an item that carries
        none (a normalized id, or None for a random one); see ``validate_envelope``.

        Never raises for bad input, for transport trouble or for a key service that cannot be
        used: a restricted message that cannot be encrypted then is rejected ``unavailable``
        (retry later), never stored in clear, and the rest of the call goes on. After the first
        such failure the call's other restricted messages are not tried again.

        Raises:
            ValueError: ``source`` is empty (the caller's identity is missing: a wiring bug).
            RuntimeError: a transport stopped reading the call's messages (a defect): the call
                fails rather than answer for fewer messages than it was given.
            Whatever the code that prepares a message raises inside the confirm wait (a
                defect too): the call fails, never a partial answer.
        """
        if not source:
            raise ValueError("source must be the authenticated caller's identity")
        now = self._clock()
        results: list[MessageResult | None] = [None] * len(items)
        records: list[AuditRecord] = []
        admitted: list[_Admitted] = []
        first, *others = self._transports
        keys = _Keys()

        def admit_as_published() -> Iterator[OutboundMessage]:
            # Consumed by the first transport as its confirm window has room, so validating and
            # encrypting later messages overlaps with the broker storing earlier ones.
            # The message ids this call took: handed to a transport, or `unavailable` for want
            # of encryption (to be retried). A copy refused for good never entered the fabric,
            # so it does not block a corrected one later in the batch.
            taken: set[str] = set()
            for index, item in enumerate(items):
                default_id = default_ids[index] if default_ids is not None else None
                checked = validate_envelope(item, source, now=now, default_id=default_id)
                if isinstance(checked, Envelope):
                    rejection = self._table.admit(checked)
                    if rejection is None and checked.message_id in taken:
                        rejection = _duplicate(checked.message_id)
                    if rejection is None:
                        candidate = self._prepare_unless_keys_down(
                            index, checked, now, first.name, keys
                        )
                        if isinstance(candidate, _Admitted):
                            taken.add(checked.message_id)
                            admitted.append(candidate)
                            yield candidate.outbound
                            continue
                        if candidate.reason is Reason.UNAVAILABLE:
                            taken.add(checked.message_id)
                        rejection = candidate
                    topic = checked.topic
                else:
                    rejection, topic = checked, None
                results[index] = MessageResult(
                    rejection.message_id,
                    REJECTED,
                    reason=rejection.reason,
                    detail=rejection.message,
                )
                # No hash of what arrived: nothing of it was stored (DESIGN §7 records the
                # SHA-256 of the stored body), and the hash of a child's data, whatever its
                # label (unlabelled, mistyped, refused while the keys are down), would let a
                # reader of the 7-year trail confirm a guess at a low-entropy payload offline.
                # Nor for a message no transport stored (``_reject_unstored``), nor for a
                # refused request (``refuse_request``).
                records.append(
                    AuditRecord(
                        event=AuditEvent.REJECTED,
                        at=now,
                        message_id=rejection.message_id,
                        source=source,
                        topic=topic,
                        reason=str(rejection.reason),
                    )
                )

        prepared: PreparedAudit | None = None

        def prepare_audit() -> None:
            # While the broker stores the last of the batch: encode the audit batch the call
            # will emit if the broker stores every message, as it nearly always does.
            nonlocal prepared
            expected = [*records, *(record for item in admitted for record in item.expected)]
            prepared = self._audit.prepare(expected, _bodies(admitted))

        outcomes = first.publish(admit_as_published(), meanwhile=prepare_audit)
        failures: dict[int, Failure | None] = {}  # why the broker did not take a message
        waiting = self._settle(admitted, outcomes, results, records, now, failures=failures)
        for transport in others:
            if not waiting:
                break
            outcomes = transport.publish([item.outbound for item in waiting])
            waiting = self._settle(waiting, outcomes, results, records, now, failures=failures)
        self._reject_unstored(waiting, results, records, now)
        audited = self._emit(records, admitted, prepared)
        batch = _complete(results, audited=audited)
        if self._metrics is not None and batch.results:
            self._metrics.count(_counts(batch))
        return batch

    def refuse_request(self, *, reason: str, source: str | None) -> bool:
        """Audit a request refused as a whole (an entry point's 400/401/403/413), none of its
        messages routed: one ``rejected`` record with ``message_id`` None and no topic (the
        ids of a refused request are unverified input, and the record stands for the request,
        not for its messages), ``reason`` the request-level code, ``source`` the authenticated
        group or ``UNAUTHENTICATED_SOURCE``. Nothing of the request itself goes into the record,
        not even a hash of it (see ``route``).

        Whether the record was stored (a lost one is logged and counted, as for ``route``).
        Never raises for the request's content."""
        record = AuditRecord(
            event=AuditEvent.REJECTED,
            at=self._clock(),
            message_id=None,
            source=source or UNAUTHENTICATED_SOURCE,
            reason=reason,
        )
        return self._emit([record], [], None)

    def _prepare_unless_keys_down(
        self, index: int, envelope: Envelope, now: datetime, transport: str, keys: _Keys
    ) -> _Admitted | Rejection:
        """``_prepare``, or ``unavailable`` for a restricted message the key service cannot
        encrypt now; after one such failure, the call's other restricted messages are refused
        without asking again (each ask may wait out the SDK's timeouts)."""
        restricted = envelope.classification is Classification.RESTRICTED
        if not (restricted and keys.down):
            try:
                return self._prepare(index, envelope, now, transport)
            except EncryptionUnavailable as exc:
                _LOG.warning("restricted messages cannot be encrypted now: %s", exc)
                keys.down = True
        return Rejection(Reason.UNAVAILABLE, _KEYS_DOWN, envelope.message_id)

    def _prepare(
        self, index: int, envelope: Envelope, now: datetime, transport: str
    ) -> _Admitted | Rejection:
        deliveries = self._table.deliveries(envelope)
        encrypted = envelope.classification is Classification.RESTRICTED
        if encrypted:
            context = encryption_context(
                message_id=envelope.message_id,
                source=envelope.source,
                environment=self._environment,
            )
            sealed = seal_payload(self._cipher, canonical_json(envelope.payload), context)
            envelope = dataclasses.replace(envelope, payload=sealed)
        body = envelope.to_json_bytes()
        if len(body) > MAX_ENCODED_BYTES:
            return Rejection(
                Reason.TOO_LARGE,
                f"encoded envelope is {len(body)} bytes, limit {MAX_ENCODED_BYTES}",
                envelope.message_id,
            )
        plan = self._plan_for(deliveries)
        outbound = OutboundMessage(
            message_id=envelope.message_id,
            topic=envelope.topic,
            body=body,
            audience=plan.audience,
            emergency=plan.emergency,
            headers=delivery_headers(envelope),
            correlation_id=envelope.correlation_id,
            reply_to=envelope.reply_to,
        )
        item = _Admitted(index, envelope, outbound, encrypted, plan, sha256_hex(body))
        item.expected = (
            self._record(AuditEvent.ACCEPTED, item, transport, now),
            self._record(AuditEvent.ROUTED, item, transport, now, queues=plan.queues),
        )
        for record in item.expected:
            record.encoded()
        return item

    def _plan_for(self, deliveries: frozenset[Delivery]) -> _Plan:
        plan = self._plans.get(deliveries)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_LIMIT:
                self._plans.clear()
            plan = self._plans[deliveries] = _Plan.of(deliveries)
        return plan

    def _settle(
        self,
        items: list[_Admitted],
        outcomes: list[Outcome],
        results: list[MessageResult | None],
        records: list[AuditRecord],
        now: datetime,
        *,
        failures: dict[int, Failure | None],
    ) -> list[_Admitted]:
        """Record the stored ones as accepted, and routed (or sent to the fallback path, and
        why); return those still waiting for a transport."""
        waiting: list[_Admitted] = []
        for item, outcome in zip(items, outcomes, strict=True):
            if not outcome.stored:
                failures.setdefault(item.index, outcome.failure)
                waiting.append(item)
                continue
            results[item.index] = MessageResult(
                item.envelope.message_id, ACCEPTED, transport=outcome.transport
            )
            if item.index not in failures and outcome.transport == item.expected[0].transport:
                records.extend(item.expected)
                continue
            records.append(self._record(AuditEvent.ACCEPTED, item, outcome.transport, now))
            if item.index in failures:  # stored by a later transport: the fallback path
                why = failures[item.index] or Failure.UNAVAILABLE
                records.append(
                    self._record(AuditEvent.FALLBACK, item, outcome.transport, now, reason=why)
                )
            else:
                records.append(
                    self._record(
                        AuditEvent.ROUTED, item, outcome.transport, now, queues=item.plan.queues
                    )
                )
        if waiting:
            _LOG.warning("a transport could not store %d message(s)", len(waiting))
        return waiting

    def _reject_unstored(
        self,
        items: list[_Admitted],
        results: list[MessageResult | None],
        records: list[AuditRecord],
        now: datetime,
    ) -> None:
        for item in items:
            results[item.index] = MessageResult(
                item.envelope.message_id,
                REJECTED,
                reason=Reason.UNAVAILABLE,
                detail=Reason.UNAVAILABLE.meaning,
            )
            records.append(
                AuditRecord(
                    event=AuditEvent.REJECTED,
                    at=now,
                    message_id=item.envelope.message_id,
                    source=item.envelope.source,
                    topic=item.envelope.topic,
                    reason=str(Reason.UNAVAILABLE),
                )
            )

    def _record(
        self,
        event: AuditEvent,
        item: _Admitted,
        transport: str | None,
        now: datetime,
        *,
        reason: str | None = None,
        queues: tuple[str, ...] = (),
    ) -> AuditRecord:
        envelope = item.envelope
        return AuditRecord(
            event=event,
            at=now,
            message_id=envelope.message_id,
            source=envelope.source,
            topic=envelope.topic,
            body_sha256=item.digest,
            reason=reason,
            transport=transport,
            classification=envelope.classification,
            priority=envelope.priority,
            groups=item.plan.groups,
            encrypted=item.encrypted,
            queues=queues,
        )

    def _emit(
        self,
        records: list[AuditRecord],
        admitted: list[_Admitted],
        prepared: PreparedAudit | None,
    ) -> bool:
        """Emit the call's records; whether they are stored (True when there are none)."""
        # The stored bytes of what was accepted, for the archive replay reads.
        accepted = {r.body_sha256 for r in records if r.event is AuditEvent.ACCEPTED}
        bodies = _bodies(item for item in admitted if item.digest in accepted)
        if not records or self._audit.emit(records, bodies, prepared=prepared):
            return True
        # The messages themselves are stored (or rejected) already; a lost audit batch is an
        # operational alarm (metric ``AuditRecordsLost``), not a reason to tell producers
        # something false.
        _LOG.error("audit batch of %d record(s) could not be stored", len(records))
        if self._metrics is not None:
            self._metrics.count({metrics.AUDIT_RECORDS_LOST: len(records)})
        return False


def _complete(results: Sequence[MessageResult | None], *, audited: bool) -> BatchResult:
    """The call's results, one per message.

    Raises:
        RuntimeError: a message got none (a transport stopped reading the batch): answering for
            fewer messages than given would read as "all accepted" (202) with some stored
            nowhere. The call fails instead; the producer retries it, same message ids.
    """
    complete = tuple(r for r in results if r is not None)
    if len(complete) < len(results):
        raise RuntimeError(f"{len(results) - len(complete)} message(s) of the call got no result")
    return BatchResult(complete, audited)


def _duplicate(message_id: str) -> Rejection:
    return Rejection(
        Reason.DUPLICATE_MESSAGE_ID,
        f"message_id {message_id} was already taken earlier in this batch",
        message_id,
    )


def _counts(batch: BatchResult) -> dict[str, int]:
    by_broker = sum(r.transport == "rabbitmq" for r in batch.results)
    return {
        metrics.ACCEPTED_BY_BROKER: by_broker,
        metrics.ACCEPTED_BY_FALLBACK: batch.accepted - by_broker,
        metrics.REJECTED: batch.rejected,
        metrics.REJECTED_UNAVAILABLE: sum(r.reason is Reason.UNAVAILABLE for r in batch.results),
    }


def _bodies(items: Iterable[_Admitted]) -> dict[str, bytes]:
    return {item.digest: item.outbound.body for item in items}
