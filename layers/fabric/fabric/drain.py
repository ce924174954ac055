"""The drain: move messages from the fallback queues back into RabbitMQ once it is healthy.

Each fallback queue belongs to one stakeholder group (and path), and holds that group's copy of
a message. The drain republishes each copy to that group's own work queue only (through the
redeliver exchange, never through routing, which would hand the other groups a second copy),
with the same body, message id and headers, and deletes it from SQS only after RabbitMQ
confirmed it and its ``drained`` record is stored on an audit path. A message whose confirm (or
record) does not come stays in SQS and reappears after its visibility timeout; two drains
running at once never see the same message at the same time, and a duplicate after a crash
carries the same message id, which consumers deduplicate on.

Each receive counts towards a fallback queue's redrive policy (10 receives, then its DLQ), so
the drain takes nothing it cannot hand on: before it receives anything it opens the broker
connection and publishes probes that no queue takes (a memory or disk alarm blocks a connection
only once it publishes, so a fresh one looks healthy). A work queue that does not take a batch
while the broker does (full: ``reject-publish`` nacks; stalled: a quorum queue without its
majority never confirms, and its confirms time out while the probes still pass) stops the drain
of that queue only, not of the other groups' queues; the run stops only when the broker itself
takes nothing (its connection fails, or the probes fail too).

The emergency queues are drained in turn, one batch from each per pass, so that one group's
backlog (or slow work queue) never holds back another group's emergencies; the bulk queues
follow, in turn as well. An emergency that reaches an emergency queue after the run found it
empty does not wait for the other groups' backlogs, nor for the next run: while the run is
still busy (with other emergency queues, or with bulk, up to its time limit), at most every
``RECHECK_SECONDS`` it looks into each emergency queue found empty again with a receive that
does not wait, and moves what it finds first, the same way; a run that moved bulk since its
last look takes one more look before it returns, once one is due.

The drain does not trust the SNS subscriptions to have filtered: SNS has no IAM condition on a
subscription's filter policy, so whoever may subscribe or set subscription attributes could
send one group's queue every group's messages. Each copy names the groups it was published for
(its ``audience`` attribute, which the router's SNS transport always sets), and a copy whose
audience does not name the queue's group, or cannot be read, is not moved: it stays in SQS (its
redrive policy takes it to the queue's DLQ; a subscription's DLQ keeps it), is logged without
its content, counted in the report (``misdelivered``) and the ``DrainMisdelivered`` metric, and
audited ``dead-lettered`` (``drain-misdelivered``, ``drain-audience-unreadable``) at its last
receive (in a subscription's DLQ, which has no last receive: at its first). Such copies never
end a queue's turn: the drain goes on past them to what waits behind, and copies back after
their visibility timeout are passed again, bounded by the visibility timeout, the redrive
policy and the run's time limit. A copy without an audience attribute did not come through that
transport (SNS and the redrive keep every attribute) and is moved, as before: no subscription
change can take the attribute off a message, and such copies (a subscription DLQ's, a message
sent to a queue by hand) are what the drain has always taken as the group's.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fabric import metrics as metric_names
from fabric.audit import AuditEvent, AuditRecord, sha256_hex
from fabric.audit_writer import is_topic
from fabric.envelope import normalize_message_id
from fabric.errors import TransportUnavailable
from fabric.ports import (
    AuditSink,
    Failure,
    FallbackSource,
    Metrics,
    OutboundMessage,
    Received,
    Transport,
)
from fabric.stakeholders import Stakeholder
from fabric.topology import queue_name

_LOG = logging.getLogger(__name__)
# The routing key of the drain's probe: no queue is bound under it on the redeliver exchange, so
# a broker that takes publishes returns the probe (mandatory) and stores nothing.
PROBE_ROUTING_KEY = "fabric.drain.probe"
# How often a busy run (with bulk, or with other groups' emergency backlogs) looks into the
# emergency queues found empty again: an emergency waits about this long (plus one batch of each
# queue still in turn), where it waited for the others' backlogs or for the next run. A look is
# one receive that does not wait per emergency queue (ten in the stack, each answered at once):
# at most ten SQS requests a second, about 2,400 in a run that spends its 240 s on bulk. An
# empty receive counts towards no message's receives, so the looks bring no message nearer its
# DLQ.
RECHECK_SECONDS = 1.0
# Receives SQS allows a fallback queue's message before its redrive policy moves it to the
# queue's DLQ (``maxReceiveCount``; the stack sets the policy from this): a copy the drain could
# not hand on at its last receive goes there next, and is audited ``dead-lettered``.
FALLBACK_MAX_RECEIVES = 10
# A batch that meets these stops the run: the connection is gone or blocked.
_BROKER_DOWN = frozenset({Failure.UNAVAILABLE})
# A probe that meets these says the broker takes no publishes. A batch that meets only a confirm
# timeout may be its work queue's alone (a quorum queue without its majority): the probes then
# tell whether the run stops or only leaves that queue.
_NO_PUBLISHES = frozenset({Failure.UNAVAILABLE, Failure.TIMEOUT})
# The ``dead-lettered`` reasons of a copy the drain does not move for its audience: published
# for other groups than the queue's, or with an ``audience`` attribute it cannot read.
MISDELIVERED_REASON = "drain-misdelivered"
AUDIENCE_UNREADABLE_REASON = "drain-audience-unreadable"


@dataclass(frozen=True)
class FallbackQueue:
    """A fallback queue (its URL) and the group work queue its messages belong in."""

    url: str
    group: Stakeholder
    emergency: bool
    # The receives SQS allows before it moves a message to this queue's DLQ; None: the queue
    # has no redrive policy (a subscription's DLQ keeps its messages).
    max_receives: int | None = None

    @property
    def work_queue(self) -> str:
        """The RabbitMQ queue this queue's messages are drained into."""
        return queue_name(self.group, emergency=self.emergency)


@dataclass
class DrainReport:
    """What one drain run did, per work queue, and why it stopped."""

    moved: dict[str, int] = field(default_factory=dict)
    # Copies this run received and did not move (they stay in SQS); not what SQS holds: what
    # no receive of the run reached (past a limit or a stop, or behind a refused work queue's
    # first batch) is not counted.
    left: int = 0
    stopped: str = "empty"
    refused: list[str] = field(default_factory=list)  # work queues that refused messages
    # Copies received from a group's queue that were not published for that group (their
    # audience does not name it, or cannot be read): not moved, left in SQS (so in ``left``
    # too), each counted once a run however often it comes back.
    misdelivered: int = 0

    @property
    def total(self) -> int:
        """Messages moved into RabbitMQ and deleted from SQS."""
        return sum(self.moved.values())


def _reply_properties(body: bytes) -> tuple[str | None, str | None]:
    """``correlation_id`` and ``reply_to`` of a stored envelope, which the router publishes as
    AMQP properties too; SNS carries only the body, so the drain reads them there. A reply-to
    RabbitMQ reserves (stored before the router refused it) is left off by the transport's
    encoder (``fabric.envelope.amqp_reply_to``): the message moves without it."""
    try:
        envelope = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to read: moved as is
        return None, None
    if not isinstance(envelope, dict):
        return None, None
    correlation_id, reply_to = envelope.get("correlation_id"), envelope.get("reply_to")
    return (
        correlation_id if isinstance(correlation_id, str) and correlation_id else None,
        reply_to if isinstance(reply_to, str) and reply_to else None,
    )


def _misdelivery(queue: FallbackQueue, item: Received) -> str | None:
    """Why ``item`` must not move into ``queue``'s work queue (a reason code), or None.

    A copy whose audience does not name the queue's group, or whose audience cannot be read,
    was not published for the group. A copy without an audience attribute is moved: the router's
    transport sets one on every message and SNS delivers it (raw or in its notification, also to
    a subscription's DLQ), so no subscription change yields a copy without it."""
    if item.audience_unreadable:
        return AUDIENCE_UNREADABLE_REASON
    if item.audience is not None and queue.group.value not in item.audience:
        return MISDELIVERED_REASON
    return None


def _copy_key(item: Received) -> tuple[str, str]:
    """A copy as the drain knows it again when SQS hands it out once more (a new receipt
    handle): its message id and body."""
    return item.message_id, sha256_hex(item.body)


def _dead_lettered(
    queue: FallbackQueue,
    item: Received,
    reason: str,
    at: datetime,
    *,
    body_sha256: str | None = None,
) -> AuditRecord:
    """The ``dead-lettered`` record of a copy of ``queue`` the drain leaves where it is: the
    message id and topic only in the fabric's syntax, ``queues`` the queue it was found in."""
    return AuditRecord(
        event=AuditEvent.DEAD_LETTERED,
        at=at,
        message_id=normalize_message_id(item.message_id),
        source="drain",
        topic=item.topic if is_topic(item.topic) else None,
        body_sha256=body_sha256,
        reason=reason,
        attempt=item.receives,
        groups=(queue.group.value,),
        queues=(queue.url.rsplit("/", 1)[-1],),
    )


def _log_id(item: Received) -> str:
    """How a log line names a copy: its message id in the fabric's syntax, else the SHA-256 of
    its body (a message without the router's attributes gives its id from its body, whatever
    its sender wrote there; a log is no place for that text)."""
    return normalize_message_id(item.message_id) or f"sha256:{sha256_hex(item.body)}"


class Drainer:
    """Drains ``queues`` into ``broker``; emergencies first, then the rest."""

    def __init__(
        self,
        *,
        queues: Sequence[FallbackQueue],
        source: FallbackSource,
        broker: Transport,
        audit: AuditSink,
        metrics: Metrics | None = None,
        max_messages: int = 10_000,
        max_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        connect: Callable[[], bool] | None = None,
    ) -> None:
        self._connect = connect
        self._max_messages = max_messages
        self._max_seconds = max_seconds
        self._queues = sorted(queues, key=lambda q: not q.emergency)
        self._metrics = metrics
        self._source = source
        self._broker = broker
        self._audit = audit
        self._clock = clock
        self._stalled: set[str] = set()  # the work queues whose confirms timed out this run
        # The misdelivered copies met this run, by fallback queue (``_copy_key``): each is
        # logged and counted once a run, however often it comes back.
        self._misdelivered: dict[str, set[tuple[str, str]]] = {}

    def drain(
        self, *, max_messages: int | None = None, max_seconds: float | None = None
    ) -> DrainReport:
        """Move up to ``max_messages`` within ``max_seconds`` (default: the limits this drainer
        was built with); stop when the broker takes nothing (``broker unavailable``), when the
        ``drained`` records cannot be stored (``audit unavailable``), or when SQS will not delete
        what was moved (``fallback queue unavailable``). A work queue that alone does not take
        its batch is listed in ``refused`` and the others still drain.

        Never raises for broker or SQS trouble: the report says why it stopped.
        """
        report = self._drain(max_messages or self._max_messages, max_seconds or self._max_seconds)
        if self._metrics is not None:
            self._metrics.count(
                {
                    metric_names.DRAINED: report.total,
                    metric_names.DRAIN_MISDELIVERED: report.misdelivered,
                }
            )
        return report

    def _drain(self, max_messages: int, max_seconds: float) -> DrainReport:
        report = DrainReport()
        self._stalled = set()
        self._misdelivered = {}
        deadline = self._clock() + max_seconds
        if self._connect is not None and not (self._connect() and self._takes_publishes()):
            report.stopped = "broker unavailable"  # before a receive counts against anything
            return report
        emergencies = [queue for queue in self._queues if queue.emergency]
        self._take_in_turn(emergencies, report, max_messages, deadline, wait=True)
        recheck_at = self._clock() + RECHECK_SECONDS  # the emergency queues were just found empty
        busy = False  # moved bulk since the emergency queues were last looked at
        # The bulk queues in turn too, one batch each: one group's backlog (or a pile of copies
        # not for it, which come back after their visibility timeout) holds another group's
        # bulk back by one batch, not until the run's limits.
        bulk = deque(queue for queue in self._queues if not queue.emergency)
        while bulk:
            queue = bulk.popleft()
            if self._take(queue, report, max_messages, deadline, wait=True):
                bulk.append(queue)
                busy = True
            # Else found empty (after a long poll), its work queue refused, or the run stopped.
            if bulk and self._clock() >= recheck_at:
                # Busy with bulk: what reached an emergency queue since goes first, also between
                # the last, empty receives of queues that ran out in the same turn (up to a second
                # each). A look that does not wait may miss a message; the next, a second on,
                # asks again.
                self._take_in_turn(emergencies, report, max_messages, deadline, wait=False)
                recheck_at, busy = self._clock() + RECHECK_SECONDS, False
        if busy and self._clock() >= recheck_at and self._clock() < deadline:
            # One last look once one is due: what reached an emergency queue while the run
            # finished its bulk goes now, not up to a minute later with the next run.
            self._take_in_turn(emergencies, report, max_messages, deadline, wait=False)
        if report.stopped == "empty" and report.total >= max_messages:
            report.stopped = "message limit"
        return report

    def _take_in_turn(
        self,
        queues: list[FallbackQueue],
        report: DrainReport,
        max_messages: int,
        deadline: float,
        *,
        wait: bool,
    ) -> None:
        """Move one batch from each of ``queues`` in turn, until each is empty (or refused) or
        the run stops: a queue with a backlog, or whose work queue is slow, holds the others
        back by one batch, not for the rest of the run.

        A queue found empty stays in the turn while others still have batches: at most every
        ``RECHECK_SECONDS`` it is looked at again with a receive that does not wait (the rule
        between bulk batches), and what it holds by then is moved and it is in turn again. An
        emergency that reaches its queue after the queue was found empty waits about a second,
        not for another group's whole backlog, nor for the next run."""
        turn = deque(queues)
        empty: list[FallbackQueue] = []
        recheck_at = self._clock() + RECHECK_SECONDS
        while turn:
            queue = turn.popleft()
            if self._take(queue, report, max_messages, deadline, wait=wait):
                turn.append(queue)
            else:
                empty.append(queue)
            if turn and empty and self._clock() >= recheck_at:
                looked_at, empty = empty, []
                for again in looked_at:
                    if self._take(again, report, max_messages, deadline, wait=False):
                        turn.append(again)
                    else:
                        empty.append(again)
                recheck_at = self._clock() + RECHECK_SECONDS

    def _take(
        self,
        queue: FallbackQueue,
        report: DrainReport,
        max_messages: int,
        deadline: float,
        *,
        wait: bool,
    ) -> bool:
        """Move one batch from ``queue``; whether it may hold more (``report.stopped`` says why
        the run must stop, ``report.refused`` names a work queue that did not take its batch).

        A batch the broker did not take stops the run only when the broker takes nothing: its
        connection failed, or, after confirms that timed out, the probes fail too, or another
        work queue's confirms timed out earlier in the run. Otherwise it was this work queue
        alone (full, or a quorum queue that lost its majority and confirms nothing), and the
        other queues still drain.

        The probes go to no queue, so they pass while the node's queue storage itself stalls (a
        WAL or disk stall): then every work queue times out in turn, and leaving each for the
        run would spend a receive on every fallback queue's batch, each run, and park them all
        after ten runs. A second work queue that times out says the stall is the broker's."""
        batch = self._receive(queue, report, max_messages, deadline, wait=wait)
        if not batch:
            return False
        batch = self._screen(queue, batch, report)
        if not batch:
            # Only copies not for this group, hidden now for their visibility timeout: the next
            # receive gets what waits behind them. Copies met before are back after theirs and
            # are passed again: the queue is done when a receive finds nothing, or at the run's
            # time limit (SQS's redrive policy takes each to the queue's DLQ after its receives;
            # a subscription's DLQ hands it out at most once a visibility timeout).
            return True
        failures = self._move(queue, batch, report)
        if report.stopped != "empty":  # the audit paths, or SQS's deletes, failed
            return False
        if Failure.TIMEOUT in failures:
            self._stalled.add(queue.work_queue)
        if (
            failures & _BROKER_DOWN
            or len(self._stalled) > 1
            or (failures & _NO_PUBLISHES and not self._broker_works())
        ):
            report.stopped = "broker unavailable"
        elif failures:
            _LOG.warning(
                "%s did not take messages (%s); draining the other queues",
                queue.work_queue,
                ", ".join(sorted(failure.value for failure in failures)),
            )
            report.refused.append(queue.work_queue)
        return not failures

    def _receive(
        self,
        queue: FallbackQueue,
        report: DrainReport,
        max_messages: int,
        deadline: float,
        *,
        wait: bool,
    ) -> list[Received]:
        """The next batch of ``queue``. Nothing at the message limit, once the run stopped, or
        once the queue's work queue refused: a subscription's DLQ drains into the same work
        queue as its fallback queue, and taking more for it would only count receives against
        them. Past the time limit, or when SQS cannot be reached, the run stops."""
        if (
            report.stopped != "empty"
            or report.total >= max_messages
            or queue.work_queue in report.refused
        ):
            return []
        if self._clock() >= deadline:
            report.stopped = "time limit"
            return []
        try:
            return self._source.receive(queue.url, min(10, max_messages - report.total), wait=wait)
        except TransportUnavailable as exc:
            _LOG.warning("fallback queue unavailable: %s", exc)
            report.stopped = "fallback queue unavailable"
            return []

    def _broker_works(self) -> bool:
        """Whether the broker takes publishes after some did not confirm in time: a connection
        (the transport dropped the one that timed out) and the probes."""
        return (self._connect is None or self._connect()) and self._takes_publishes()

    def _takes_publishes(self) -> bool:
        """Whether the broker takes publishes now, asked with two probes no queue is bound to
        receive: a broker that takes them returns them (mandatory) and stores nothing. Under a
        memory or disk alarm RabbitMQ blocks a connection only when it publishes, and still
        handles the publish that blocked it: the second probe is the one refused."""
        probes = [
            OutboundMessage(
                message_id=f"drain-probe-{uuid.uuid4()}",
                topic=PROBE_ROUTING_KEY,
                body=b"",
                audience=frozenset(),
                redeliver_to=PROBE_ROUTING_KEY,
            )
            for _ in range(2)
        ]
        refused = {outcome.failure for outcome in self._broker.publish(probes)} & _NO_PUBLISHES
        if refused:
            _LOG.warning(
                "the broker takes no publishes (%s): nothing more received",
                ", ".join(sorted(failure.value for failure in refused if failure is not None)),
            )
            return False
        return True

    def _move(
        self, queue: FallbackQueue, batch: list[Received], report: DrainReport
    ) -> set[Failure]:
        """Publish, audit what the broker confirmed, then delete it from SQS; the failures met.

        A copy is deleted only once its ``drained`` record is stored: if neither audit path takes
        the batch, the copies stay in SQS (they come back and are moved again, same message id,
        with their record then) and the run stops (``audit unavailable``). A copy SQS does not
        delete stops the run too (``fallback queue unavailable``): it comes back and is moved
        again, so a run that went on would move every queue twice while SQS refuses deletes.
        """
        outbound = [
            OutboundMessage(
                message_id=item.message_id,
                topic=item.topic,
                body=item.body,
                audience=frozenset({queue.group}),
                emergency=queue.emergency,
                headers=dict(item.headers),
                redeliver_to=queue.work_queue,
                correlation_id=correlation_id,
                reply_to=reply_to,
            )
            for item in batch
            for correlation_id, reply_to in [_reply_properties(item.body)]
        ]
        outcomes = self._broker.publish(outbound)
        confirmed = [item for item, outcome in zip(batch, outcomes, strict=True) if outcome.stored]
        undelivered = [
            (item, outcome.failure)
            for item, outcome in zip(batch, outcomes, strict=True)
            if outcome.failure is not None
        ]
        failures = {failure for _item, failure in undelivered}
        for item, failure in undelivered:
            _LOG.warning(
                "%s not moved to %s (%s): left in %s",
                _log_id(item),
                queue.work_queue,
                failure.value,
                queue.url,
            )
        self._audit_dead_lettered(queue, undelivered)
        if confirmed and not self._audit_drained(queue, confirmed):
            _LOG.error(
                "audit batch of %d drained message(s) could not be stored: left in SQS",
                len(confirmed),
            )
            report.left += len(batch)
            report.stopped = "audit unavailable"
            return failures
        deleted = self._source.delete(queue.url, [item.handle for item in confirmed])
        moved = [item for item in confirmed if item.handle in deleted]
        report.moved[queue.work_queue] = report.moved.get(queue.work_queue, 0) + len(moved)
        report.left += len(batch) - len(moved)
        if len(moved) < len(confirmed):
            _LOG.warning(
                "%d moved message(s) not deleted from %s: they come back and move again",
                len(confirmed) - len(moved),
                queue.url,
            )
            report.stopped = "fallback queue unavailable"
        return failures

    def _screen(
        self, queue: FallbackQueue, batch: list[Received], report: DrainReport
    ) -> list[Received]:
        """The copies of ``batch`` published for ``queue``'s group.

        A copy not published for the group (``_misdelivery``) is not moved, nor deleted: it
        stays in SQS, and its queue's redrive policy takes it to the DLQ after its receives
        (where operators see it); a subscription's DLQ keeps it. The first time a run meets it,
        it is logged at ERROR (its message id in the fabric's syntax, the queue, the reason; not
        its content, nor a hash of it) and counted in ``misdelivered`` and ``left``; it is
        audited ``dead-lettered`` once (``_audit_misdelivered``)."""
        movable: list[Received] = []
        foreign: list[tuple[Received, str]] = []
        for item in batch:
            reason = _misdelivery(queue, item)
            if reason is None:
                movable.append(item)
            else:
                foreign.append((item, reason))
        unchecked = sum(item.audience is None for item in movable)
        if unchecked:
            _LOG.warning(
                "%d message(s) in %s carry no audience attribute: moved to %s unchecked",
                unchecked,
                queue.url,
                queue.work_queue,
            )
        if not foreign:
            return movable
        seen = self._misdelivered.setdefault(queue.url, set())
        new = [(item, reason) for item, reason in foreign if _copy_key(item) not in seen]
        for item, reason in new:
            seen.add(_copy_key(item))
            _LOG.error(
                "%s in %s was not published for %s (%s): not moved, left in SQS",
                normalize_message_id(item.message_id) or "a message without a fabric id",
                queue.url,
                queue.group.value,
                reason,
            )
        report.misdelivered += len(new)
        report.left += len(new)
        self._audit_misdelivered(queue, foreign)
        return movable

    def _audit_misdelivered(
        self, queue: FallbackQueue, foreign: list[tuple[Received, str]]
    ) -> None:
        """Audit ``dead-lettered`` each copy not published for ``queue``'s group, once: at the
        last receive its redrive policy allows, as ``_audit_dead_lettered`` does a copy the
        broker did not take (SQS moves it to the queue's DLQ next); in a queue without a redrive
        policy (a subscription's DLQ, which keeps it up to 14 days and has no last receive), at
        its first receive. A copy whose receives the source does not say (0) is not audited
        there. ``reason`` ``drain-misdelivered`` or ``drain-audience-unreadable``; ``groups``
        and ``queues`` where it was found; ``attempt`` its receives; no body hash (it never
        reached the group, and a hash of a child's data in a trail locked for seven years would
        let a reader confirm a guess at it). Best effort, likewise."""
        now = datetime.now(UTC)
        records = [
            _dead_lettered(queue, item, reason, now)
            for item, reason in foreign
            if (
                item.receives == 1
                if queue.max_receives is None
                else item.receives >= queue.max_receives
            )
        ]
        if records and not self._audit.emit(records):
            _LOG.error(
                "audit batch of %d misdelivered message(s) could not be stored", len(records)
            )

    def _audit_dead_lettered(
        self, queue: FallbackQueue, undelivered: list[tuple[Received, Failure]]
    ) -> None:
        """Audit ``dead-lettered`` each copy the broker did not take at the last receive its
        queue's redrive policy allows: SQS moves it to the queue's DLQ when its visibility
        timeout ends, and the trail says so and why (``drain-<failure>``). A copy with receives
        left, or in a queue without a redrive policy, is not dead-lettered: no record. Best
        effort: a record that cannot be stored is logged, and the copy goes to the DLQ all the
        same."""
        if queue.max_receives is None:
            return
        now = datetime.now(UTC)
        records = [
            _dead_lettered(
                queue, item, f"drain-{failure.value}", now, body_sha256=sha256_hex(item.body)
            )
            for item, failure in undelivered
            if item.receives >= queue.max_receives
        ]
        if not records:
            return
        _LOG.warning(
            "%d message(s) not moved at their last receive: SQS moves them to the DLQ of %s",
            len(records),
            queue.url,
        )
        if not self._audit.emit(records):
            _LOG.error(
                "audit batch of %d dead-lettered message(s) could not be stored", len(records)
            )

    def _audit_drained(self, queue: FallbackQueue, confirmed: list[Received]) -> bool:
        """Audit every copy the broker confirmed (it is in its work queue, deleted from SQS or
        not: a copy not deleted comes back and is drained again, same message id), with the
        bodies: a message accepted on the fallback path is archived here too.

        A message's id and topic are recorded only in the fabric's syntax (a canonical UUID or
        ULID, an envelope topic), else absent, as the redrive records them: a message without
        the router's attributes gives them from its body, whatever its sender wrote there, and
        the trail is locked for seven years."""
        now = datetime.now(UTC)
        digests = [sha256_hex(item.body) for item in confirmed]
        return self._audit.emit(
            [
                AuditRecord(
                    event=AuditEvent.DRAINED,
                    at=now,
                    message_id=normalize_message_id(item.message_id),
                    source="drain",
                    topic=item.topic if is_topic(item.topic) else None,
                    body_sha256=digest,
                    transport="rabbitmq",
                    groups=(queue.group.value,),
                    queues=(queue.work_queue,),
                )
                for item, digest in zip(confirmed, digests, strict=True)
            ],
            dict(zip(digests, (item.body for item in confirmed), strict=True)),
        )
