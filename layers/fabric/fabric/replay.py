"""Replay: re-publish archived messages of a time range into the fabric, marked as replays.

A run first reads and **verifies** the audit trail of the period, writer by writer, over the
window the compliance report reads (``fabric.compliance_run.plan_window``: the signed
checkpoints around the period, every object they name, and the objects written after the last
checkpoint, which only the hash chain protects), checkpoint by checkpoint with
``fabric.audit_chain.verify_trail`` (signatures, Merkle roots, the hash chain of every record).
A trail that does not verify stops the run before anything is listed or published (``trail not
verified``, with the problem named): what is not proved to be what the writer wrote is not
re-published as child-welfare traffic. So does a **delete marker** on a key of the window
(``fabric.compliance_run.deleted_in_window``): a DeleteObject succeeds on the Object Lock bucket
and hides the key from every listing and read the run goes by, so a hidden last object would
take its acceptances out of the replay unnoticed, and a hidden last checkpoint would hold the
acceptances it sealed back as ``unsealed``. A trail that is authentic but incomplete (an
accepted message without an outcome) is named in the report (``trail_incomplete``) and does not
stop the run: replay is how such a message is recovered. Only the writers the function is
configured with (``AUDIT_WRITERS``) are read. An acceptance in an object written after its
writer's last checkpoint is protected by the unkeyed hash chain only (anyone able to put an
object there could extend it), so it is reported ``unsealed`` and not published unless the
request says ``include_unsealed``; a sealed acceptance of the same message is preferred to an
unsealed one.

From the verified objects it selects the ``accepted`` records of ``[start, end)`` that match
the filter (topic patterns with RabbitMQ semantics, message ids, source) — one per
message id, its first acceptance — and takes them in ``(at, message_id)`` order. For each it
finds the stored body by its SHA-256 in the archive (``archive/``, the object beside the
record's audit object first, then, if a copy can be elsewhere, every archive object of the
period's days: ``_elsewhere``), checks the hash,
parses the envelope, and publishes **the stored bytes as they are** (restricted payloads stay
the ciphertext the router sealed: nothing is decrypted or re-encrypted) to RabbitMQ with
publisher confirms, with the same message id, routed by today's routing table exactly as the
router routes, and with the header ``fabric-replay: <replay id>``. One ``replayed`` audit
record per message is emitted once the broker confirmed it.

Nothing found is skipped silently: an acceptance not yet sealed is reported ``unsealed``, a body
that is not in the archive (also when its record says ``archived: false``) ``missing-body``, a
body whose hash differs ``corrupt``, a body
that is not a fabric envelope ``unreadable``, and a message today's routing table would refuse
(its source may no longer publish the topic, or the route now requires a stricter
classification) ``refused``; none of them is published.

A run is bounded (``max_messages``, ``max_seconds``) and paced (``rate_per_s``); it returns a
cursor, the ``(at, message_id)`` up to which every message is finished (normally the last one it
finished), from which the next run goes on without repeating one. Its time limit also bounds the
reading of the archive: no archive object is read after it, and a run whose time is up while a
message's body is still to be read stops before that message (``time limit``), after publishing
the ones before it. It reads the period a second
time only when that fits in its time (``Replayer._select``). The time limit bounds the reading
and verifying of the trail as well, as the compliance report's does (``PeriodTooLong``): a run
does not begin the next part of the period that would not end within its time, taking as long as
estimated from the last parts of its kind, per object for an interval (``_Steps``), but stops
(``period too long``), replays nothing and leaves its cursor where it started; runs of that
length could never select from that period (and the function's timeout would end them with no
report and no cursor), so it is replayed in shorter periods. A problem already found in the
trail stops it as ``trail not verified`` instead. Its memory follows
``max_messages``, not the period: of the messages behind the first ones it takes it holds only
their ids (``_Selection``), and of the archived bodies it searches only its own messages' hashes
(``_Bodies``). Only the broker is used: a replay is recovery, not live traffic, so while
RabbitMQ cannot take messages the run stops and is resumed from its cursor later, instead of
filling the fallback path that live traffic needs during an outage.

Consumers are idempotent on ``message_id`` (``fabric.consumer.Idempotency`` keeps a record for
14 days): a consumer that already processed a message drops its replay unless that record has
expired (or the consumer team removed it); ``fabric-replay`` tells a consumer that a delivery
is a replay.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

from fabric.audit import AuditEvent, AuditRecord, sha256_hex
from fabric.audit_chain import Keyring, Problem, decode_object, remembering, verify_trail
from fabric.audit_writer import ARCHIVE_PREFIX, AUDIT_PREFIX, decode_archive
from fabric.compliance import IdSet
from fabric.compliance_run import (
    LATE_ARRIVAL,
    READ_WORKERS,
    Interval,
    Period,
    StoredObject,
    Window,
    abandoned_digests,
    abandoned_problem,
    deleted_in_window,
    intervals,
    plan_window,
    read_objects,
    seal_problem,
)
from fabric.envelope import (
    Classification,
    Envelope,
    format_timestamp,
    from_wire,
    normalize_message_id,
    parse_timestamp,
)
from fabric.errors import MessageRejected, TransportUnavailable
from fabric.pacing import Pace
from fabric.ports import AuditSink, Failure, OutboundMessage, Transport
from fabric.request_fields import positive, strings
from fabric.routing import RoutingTable, pattern_problem, topic_matches
from fabric.stakeholders import Stakeholder
from fabric.topology import REPLAY_HEADER, delivery_headers

_LOG = logging.getLogger(__name__)
_BATCH = 100
# A period longer than this reads too much of the trail in one invocation: replay it in parts.
MAX_PERIOD = timedelta(days=31)
# Records reach the trail seconds after their time as a rule; longer only if the writer failed.
# A run reads what was written up to late_days (and the compliance report's hour) after the end.
DEFAULT_LATE_DAYS = 1
MAX_LATE_DAYS = 14  # the audit queue's retention: a batch cannot be written later than that
# The transport an acceptance on the broker path records (``fabric.compliance`` tells paths so).
_BROKER_TRANSPORT = "rabbitmq"
REPLAY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Decoded archive objects kept in memory at once (each up to one writer call's bodies).
_CACHED_ARCHIVES = 8
# A run's time (the function's REPLAY_MAX_SECONDS): its 15-minute timeout less the compliance
# report's ANSWER_MARGIN_S, which a step begun within the time but longer than its estimate,
# and the answer may take (``_Steps``).
MAX_SECONDS = 780.0
# The steps of a kind a step's estimate comes from (``_Steps``): one slower than usual (a read
# retried) counts only until that many others followed it.
_RECENT_STEPS = 3

REPLAYED = "replayed"
WOULD_REPLAY = "would-replay"
MISSING_BODY = "missing-body"
CORRUPT = "corrupt"
UNREADABLE = "unreadable"
REFUSED = "refused"
UNSEALED = "unsealed"
_UNSEALED_DETAIL = (
    "written after its writer's last checkpoint (hash chain only): replay it after the next"
    " checkpoint, or with include_unsealed"
)
FAILED = "failed"


class ArchiveReader(Protocol):
    """The audit bucket, read only: the trail (audit objects, checkpoints) and the archive."""

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, in key order.

        Raises:
            TransportUnavailable: the bucket cannot be read.
        """
        ...

    def read(self, key: str) -> bytes | None:
        """The newest version of ``key``; None when there is no such object.

        Raises:
            TransportUnavailable: the bucket cannot be read.
        """
        ...

    def deleted(self, prefix: str, *, after: str = "") -> list[str]:
        """The keys under ``prefix`` (only those after the key ``after``, if given) with a
        delete marker among their versions, in key order.

        Raises:
            TransportUnavailable: the bucket's versions cannot be listed.
        """
        ...


@dataclass(frozen=True)
class ReplayFilter:
    """Which accepted messages to replay; an empty field admits everything.

    ``topics``: RabbitMQ-style patterns (``*`` one word, ``#`` any number); ``message_ids``:
    exact ids (normalized as the envelope normalizes them); ``source``: the stakeholder group
    that published it.

    Raises:
        ValueError: a pattern is not a valid topic pattern.
    """

    topics: tuple[str, ...] = ()
    message_ids: frozenset[str] = frozenset()
    source: str | None = None

    def __post_init__(self) -> None:
        for pattern in self.topics:
            problem = pattern_problem(pattern)
            if problem is not None:
                raise ValueError(f"topic filter {pattern!r}: {problem}")

    def admits(self, *, topic: str | None, message_id: str, source: str | None) -> bool:
        """Whether an accepted message with these fields matches every given criterion."""
        return (
            (not self.message_ids or message_id in self.message_ids)
            and (self.source is None or source == self.source)
            and (
                not self.topics
                or (topic is not None and any(topic_matches(p, topic) for p in self.topics))
            )
        )


@dataclass(frozen=True, order=True)
class ReplayCursor:
    """Where a replay stands: the ``(at, message_id)`` of the last message it finished."""

    at: datetime
    message_id: str

    def to_dict(self) -> dict[str, str]:
        """``{"at": RFC 3339, "message_id"}``, as ``parse_request`` reads it back (``after``)."""
        return {"at": format_timestamp(self.at), "message_id": self.message_id}


@dataclass(frozen=True)
class ReplayRequest:
    """One replay run: the period ``[start, end)``, the filter, and the run's bounds.

    ``replay_id`` names the replay (one id for all runs of a chunked replay); ``after``
    resumes behind a cursor; ``late_days`` widens the search to audit objects written that many
    days after ``end``; ``include_unsealed`` publishes acceptances written after the last
    checkpoint too (only the hash chain protects them).

    Raises:
        ValueError: a bound is not positive, the period is empty, longer than 31 days or not
            timezone-aware, or the replay id is malformed.
    """

    start: datetime
    end: datetime
    replay_id: str
    selection: ReplayFilter = field(default_factory=ReplayFilter)
    dry_run: bool = False
    max_messages: int = 1000
    rate_per_s: float | None = None
    max_seconds: float = MAX_SECONDS
    after: ReplayCursor | None = None
    late_days: int = DEFAULT_LATE_DAYS
    include_unsealed: bool = False

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("start and end must carry a timezone")
        if self.start >= self.end:
            raise ValueError("start must be before end (end is exclusive)")
        if self.end - self.start > MAX_PERIOD:
            raise ValueError(f"a replay covers at most {MAX_PERIOD.days} days: split the period")
        if not REPLAY_ID_RE.fullmatch(self.replay_id):
            raise ValueError(f"replay_id must match {REPLAY_ID_RE.pattern}")
        if self.max_messages < 1 or self.max_seconds <= 0:
            raise ValueError("max_messages and max_seconds must be positive")
        if self.rate_per_s is not None and self.rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        if not 0 <= self.late_days <= MAX_LATE_DAYS:
            raise ValueError(f"late_days must be between 0 and {MAX_LATE_DAYS}")


@dataclass(frozen=True)
class Listed:
    """One message as the report shows it: what became of it, and why when it was not replayed.

    ``groups`` are the groups today's routing table delivers it to (replayed or would be).
    """

    message_id: str
    at: datetime
    topic: str | None
    outcome: str
    groups: tuple[str, ...] = ()
    detail: str | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        out: dict[str, object] = {
            "message_id": self.message_id,
            "at": format_timestamp(self.at),
            "topic": self.topic,
            "outcome": self.outcome,
        }
        if self.groups:
            out["groups"] = list(self.groups)
        if self.detail is not None:
            out["detail"] = self.detail
        return out


@dataclass
class ReplayReport:
    """What one run did.

    ``selected``: messages of the period that match the filter; ``pending``: those of them
    behind the cursor the run started from; ``remaining``: those still to do after the run.
    ``stopped``: done, message limit, time limit, or what failed (trail not verified, period too
    long: the run's time was up before it had read and verified the period, nothing was
    replayed, replay shorter periods; broker unavailable, broker refused, archive unavailable,
    audit unavailable). ``cursor`` is where the next run goes on. ``trail_problems``: per
    writer, why its trail is not authentic (the run stopped); ``trail_incomplete``: per writer,
    an authentic trail's gap (replayed anyway); ``unsealed_objects``: objects written after a
    writer's last checkpoint, which only the hash chain protects (``unsealed``: the acceptances
    in them held back).
    """

    replay_id: str
    dry_run: bool
    start: datetime
    end: datetime
    selected: int = 0
    pending: int = 0
    remaining: int = 0
    replayed: int = 0
    would_replay: int = 0
    failed: int = 0
    missing_body: int = 0
    corrupt: int = 0
    unreadable: int = 0
    refused: int = 0  # today's routing table would refuse it: its source, or its classification
    unsealed: int = 0  # accepted in an object no checkpoint seals yet: held back
    stopped: str = "done"
    cursor: ReplayCursor | None = None
    messages: list[Listed] = field(default_factory=list)
    problems: list[Listed] = field(default_factory=list)
    unreadable_objects: list[str] = field(default_factory=list)
    trail_problems: list[str] = field(default_factory=list)
    trail_incomplete: list[str] = field(default_factory=list)
    unsealed_objects: int = 0

    @property
    def finished(self) -> int:
        """Messages this run is done with: replayed (or listed, dry run) or reported."""
        return (
            self.replayed
            + self.would_replay
            + self.missing_body
            + self.corrupt
            + self.unreadable
            + self.refused
            + self.unsealed
        )

    def to_dict(
        self, *, messages_limit: int = 100, problems_limit: int = 1000
    ) -> dict[str, object]:
        """JSON-ready, with at most ``messages_limit`` replayed (or would-be) messages and
        ``problems_limit`` problems listed; the counts are always complete."""
        return {
            "replay_id": self.replay_id,
            "dry_run": self.dry_run,
            "start": format_timestamp(self.start),
            "end": format_timestamp(self.end),
            "selected": self.selected,
            "pending": self.pending,
            "remaining": self.remaining,
            "replayed": self.replayed,
            "would_replay": self.would_replay,
            "failed": self.failed,
            "missing_body": self.missing_body,
            "corrupt": self.corrupt,
            "unreadable": self.unreadable,
            "refused": self.refused,
            "unsealed": self.unsealed,
            "stopped": self.stopped,
            "cursor": None if self.cursor is None else self.cursor.to_dict(),
            "messages": [item.to_dict() for item in self.messages[:messages_limit]],
            "problems": [item.to_dict() for item in self.problems[:problems_limit]],
            "unreadable_objects": list(self.unreadable_objects),
            "trail_problems": list(self.trail_problems),
            "trail_incomplete": list(self.trail_incomplete),
            "unsealed_objects": self.unsealed_objects,
        }


Progress = Callable[[ReplayReport], None]


@dataclass(frozen=True, slots=True)
class _Candidate:
    """An accepted record chosen for replay, as much of it as the run needs."""

    at: datetime
    message_id: str
    topic: str | None
    body_sha256: str | None
    archived: bool | None
    transport: str | None
    audit_key: str
    seq: int
    sealed: bool
    # The message's first acceptance of the period, sealed or not: its place in the replay. Not
    # ``at`` (the acceptance replayed, a sealed one first): an earlier acceptance sealed between
    # two chunks would move the message behind the cursor, and no chunk would replay it.
    first_at: datetime

    @property
    def position(self) -> ReplayCursor:
        return ReplayCursor(self.first_at, self.message_id)


@dataclass(frozen=True, slots=True)
class _Prepared:
    candidate: _Candidate
    envelope: Envelope
    outbound: OutboundMessage


class Replayer:
    """Replays archived messages from the audit bucket into RabbitMQ (``broker``), from the
    verified trails of ``writers`` (checkpoint signatures checked with ``keys``)."""

    def __init__(
        self,
        *,
        archive: ArchiveReader,
        writers: Sequence[str],
        keys: Keyring,
        broker: Transport,
        audit: AuditSink,
        table: RoutingTable,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._archive = archive
        self._writers = tuple(writers)
        # Each checkpoint's seal is checked before its objects are read, then with them: once.
        self._keys = remembering(keys)
        self._broker = broker
        self._audit = audit
        self._table = table
        self._clock = clock
        self._sleep = sleep
        self._now = now

    def run(self, request: ReplayRequest, *, progress: Progress | None = None) -> ReplayReport:
        """Replay (or, dry run, only list) up to ``request.max_messages`` messages behind
        ``request.after``, at most ``request.rate_per_s`` a second, within
        ``request.max_seconds``; ``progress(report)`` after every batch and at the end.

        A dry run reads and checks everything a replay would (bodies, hashes, envelopes,
        destinations), publishes nothing and emits no audit records.

        Never raises for broker, bucket or audit trouble: the report says why it stopped, and
        its cursor is where a re-run goes on.
        """
        report = ReplayReport(
            replay_id=request.replay_id,
            dry_run=request.dry_run,
            start=request.start,
            end=request.end,
            cursor=request.after,
        )
        try:
            self._run(request, report, progress)
        except TransportUnavailable as exc:
            _LOG.warning("the audit bucket cannot be read: %s", exc)
            report.stopped = "archive unavailable"
        if progress is not None:
            progress(report)
        # A dry run leaves no audit record: this line is its trace (ids and counts only).
        _LOG.info(
            "replay %s of %s..%s%s: %d selected, %d replayed, %d would replay, %d missing body, "
            "%d corrupt, %d unreadable, %d failed; stopped: %s; cursor %s",
            report.replay_id,
            format_timestamp(report.start),
            format_timestamp(report.end),
            " (dry run)" if report.dry_run else "",
            report.selected,
            report.replayed,
            report.would_replay,
            report.missing_body,
            report.corrupt,
            report.unreadable,
            report.failed,
            report.stopped,
            None if report.cursor is None else report.cursor.to_dict(),
        )
        return report

    def _run(self, request: ReplayRequest, report: ReplayReport, progress: Progress | None) -> None:
        rate = None if request.dry_run else request.rate_per_s
        started = self._clock()
        pace = Pace(
            rate_per_s=rate, max_seconds=request.max_seconds, clock=self._clock, sleep=self._sleep
        )
        steps = _Steps(self._clock, deadline=started + request.max_seconds)
        selection = self._select(request, report, started, steps)
        if selection is None:
            return  # report.stopped says why: trail not verified, or period too long
        report.selected = selection.selected
        report.pending = report.remaining = selection.pending
        candidates = selection.taken()
        if selection.short and not candidates:
            # No time to read the period again, and nothing kept to publish: the next run goes
            # on from a finished message's place, past every one this run found done.
            report.cursor = selection.resume or report.cursor
            report.stopped = "time limit"
            return
        bodies = _Bodies(
            self._archive,
            self._writers,
            _search_days(request),
            report,
            candidates,
            expired=pace.expired,
        )
        batch_size = pace.batch_size(_BATCH)
        index = 0
        while index < len(candidates):
            if report.finished >= request.max_messages:
                report.stopped = "message limit"
                return
            pace.wait(report.replayed)  # by what was published so far, never past the limit
            if pace.expired():
                report.stopped = "time limit"
                return
            size = min(batch_size, request.max_messages - report.finished)
            batch = candidates[index : index + size]
            done, go_on = self._replay(batch, request, bodies, report)
            index += done
            report.remaining = report.pending - index
            if done:
                report.cursor = batch[done - 1].position
            if not go_on:
                return  # report.stopped says why
            if progress is not None:
                progress(report)
        # The selection holds the run's messages, not every pending one: what is left behind
        # the last of them is the next run's.
        report.stopped = "done" if report.remaining == 0 else "message limit"

    # -- selection ------------------------------------------------------------------------------

    def _select(
        self,
        request: ReplayRequest,
        report: ReplayReport,
        started: float,
        steps: _Steps,
    ) -> _Selection | None:
        """The messages of the period this run takes (``_Selection``); None when a writer's
        trail is not authentic (``trail not verified``: ``report.trail_problems`` says where)
        or the run's time is up before the period is read (``period too long``).

        Every run reads and verifies the whole period (also behind a cursor): which acceptance
        of a message is its first can only be told from all of them. When the selection comes
        out short (messages it kept turned out to be accepted before the cursor too, after it
        had set others aside for them), the period is read once more, knowing which messages
        are done, so that the run still takes ``max_messages`` of them; but only when a second
        read, as long as the first (the run ``started`` then), fits in the time left. Otherwise
        the short selection stands: what it kept are the right first messages, and with
        nothing kept its ``resume`` is where the next run goes on.

        Reading stops before the next writer's window, delete-marker listing or interval that
        would not end within the run's time (``_Steps``), as the compliance report stops on
        ``PeriodTooLong``: a period that cannot be read and verified within one run can never
        be replayed by runs of that length, and the function's timeout would end it with no
        report at all. The run then replays nothing and keeps its cursor (``period too long``:
        replay shorter periods), unless a problem was already found in the trail (``trail not
        verified``, with every problem found so far: more time would not change that). A second
        read that runs out of time leaves the first read's selection standing, as if it had not
        been started.

        Raises:
            TransportUnavailable: the bucket cannot be read.
        """
        selection = _Selection(request)
        try:
            verified = self._read(request, report, selection, markers=True, steps=steps)
        except _OutOfTime as exc:
            _out_of_time(request, report, str(exc))
            return None
        if not verified:
            report.stopped = "trail not verified"
            return None
        spent = self._clock() - started
        if selection.short and spent > request.max_seconds - spent:
            # Reading again would leave no time to publish, or run past the function's
            # timeout and return no report (and no cursor) at all.
            _LOG.info(
                "replay %s has no time to read the period again (%.0f s spent reading)",
                request.replay_id,
                spent,
            )
        elif selection.short:
            _LOG.info("replay %s reads the period again to fill its selection", request.replay_id)
            first_read = (list(report.trail_incomplete), report.unsealed_objects)
            report.trail_incomplete.clear()
            report.unsealed_objects = 0
            again = _Selection(request, done=selection.done)
            try:
                verified = self._read(request, report, again, markers=False, steps=steps)
            except _OutOfTime as exc:
                _LOG.info(
                    "replay %s keeps its first selection: its time was up reading the period"
                    " again (%s)",
                    request.replay_id,
                    exc,
                )
                report.trail_incomplete[:], report.unsealed_objects = first_read
                verified, again = not report.trail_problems, selection
            if not verified:
                report.stopped = "trail not verified"
                return None
            selection = again
        return selection

    def _read(
        self,
        request: ReplayRequest,
        report: ReplayReport,
        selection: _Selection,
        *,
        markers: bool,
        steps: _Steps,
    ) -> bool:
        """Read and verify every writer's window of the period, feeding the acceptances of its
        verified objects to ``selection``; False when a writer's trail is not authentic. With
        ``markers`` (the run's first read; a second one finds what the first found), a writer
        with a delete marker in its window (``deleted_in_window``) is not read: the deleted key
        is its problem.

        It goes checkpoint by checkpoint, so only one interval's objects are held in memory at
        a time. Every writer's objects after its last checkpoint (the unsealed ones) are read
        first, then the sealed ones writer by writer in chain order: ``_Selection`` relies on
        that order, and the problems and gaps are reported in chain order all the same.

        Each writer's window, delete-marker listing and interval is a step of the run's time
        (``steps``): one that would not end within it is not begun. The problems found before
        the time ran out (a window's, or in a writer's objects after its last checkpoint) are
        put in the report all the same: more time would not make them go away.

        Raises:
            TransportUnavailable: the bucket cannot be read.
            _OutOfTime: the run's time is up; the message names where reading stopped.
        """
        period = Period(request.start, request.end)
        late = LATE_ARRIVAL + timedelta(days=request.late_days)
        trail = _Trail(self._archive)
        windows: list[Window] = []
        tails: dict[int, Problem | None] = {}  # per window: its objects after the last checkpoint
        reported = 0  # the windows whose problem, if any, is in the report
        try:
            for writer in self._writers:
                with steps.step("window", f"stopped before the trail of {writer}"):
                    windows.append(plan_window(trail, writer, period, late=late))
            if markers:
                for window in windows:
                    where = f"stopped before the delete markers of {window.writer}"
                    with steps.step("markers", where):
                        # The cause of whatever else the window shows missing: named first.
                        window.problem = (
                            deleted_in_window(self._archive, window, period, late) or window.problem
                        )
            pieces = [[] if window.problem else list(intervals(window)) for window in windows]
            for index, (window, parts) in enumerate(zip(windows, pieces, strict=True)):
                report.unsealed_objects += len(window.unsealed_keys)
                for interval in parts:
                    if not interval.checkpoints:  # the last one, if any
                        tails[index] = self._verify(trail, window, interval, selection, steps)
            for index, (window, parts) in enumerate(zip(windows, pieces, strict=True)):
                problem = window.problem or self._chain(
                    trail,
                    window,
                    parts,
                    selection,
                    tail=tails.get(index),
                    steps=steps,
                    report=report,
                )
                if problem is not None:
                    _not_authentic(report, window.writer, problem)
                reported = index + 1
        except _OutOfTime:
            for index, window in enumerate(windows[reported:], start=reported):
                tail = tails.get(index)
                found = window.problem or (tail if tail is not None and tail.authentic else None)
                if found is not None:
                    _not_authentic(report, window.writer, found)
            raise
        return not report.trail_problems

    def _chain(
        self,
        trail: _Trail,
        window: Window,
        parts: list[Interval],
        selection: _Selection,
        *,
        tail: Problem | None,
        steps: _Steps,
        report: ReplayReport,
    ) -> Problem | None:
        """Verify the intervals of ``window`` in chain order (``tail``: what its objects after
        the last checkpoint, verified first, showed), up to the first that is not authentic:
        that one's problem, if any. Gaps of an authentic trail go to ``report``.

        Raises:
            TransportUnavailable: the bucket cannot be read.
            _OutOfTime: an interval would not be read within the run's time (``steps``).
        """
        # Checkpoint by checkpoint, as the compliance report reads a window: an attempt is
        # abandoned only if no checkpoint of the window names its key as the chain's, and its
        # hash is checked against every hash the window names for it.
        for interval in parts:
            problem = (
                self._verify(trail, window, interval, selection, steps)
                if interval.checkpoints
                else tail
            )
            if problem is not None and problem.authentic:
                return problem
            if problem is not None:  # authentic, but a record of it is missing
                report.trail_incomplete.append(f"{window.writer}: {problem.where}: {problem.why}")
        return None

    def _verify(
        self,
        trail: _Trail,
        window: Window,
        interval: Interval,
        selection: _Selection,
        steps: _Steps,
    ) -> Problem | None:
        """Read and verify one interval of ``window``, and give the acceptances of its objects
        to ``selection`` unless it is not authentic; what is wrong with it, if anything.

        Raises:
            TransportUnavailable: the bucket cannot be read.
            _OutOfTime: the interval would not be read within the run's time (``steps``).
        """
        # The seals first, as the compliance report checks them: a forged checkpoint names
        # what it likes, keys this role may not read (which would stop the run) and as many
        # as it likes (a read each).
        unsealed = seal_problem(interval, self._keys, window.writer)
        if unsealed is not None:
            return unsealed
        key, checkpoint = interval.checkpoints[0] if interval.checkpoints else ("", {})
        where = (
            f"the objects of {key}, sealed at {checkpoint['at']},"
            if key
            else "the objects after its last checkpoint"
        )
        size = len(interval.named) + len(interval.abandoned)
        with steps.step(
            "interval", f"stopped at {where} in the trail of {window.writer}", objects=size
        ):
            stored = read_objects(trail, [*interval.named, *interval.abandoned])
            objects = {key: stored[key].data for key in interval.named if key in stored}
            problem = verify_trail(
                objects=objects,
                checkpoints=interval.checkpoints,
                keys=self._keys,
                writer=window.writer,
                anchor=interval.anchor,
            ).problem
            if problem is None or not problem.authentic:
                digests = abandoned_digests(window) if interval.abandoned else {}
                problem = abandoned_problem(interval.abandoned, stored, digests) or problem
            if problem is not None and problem.authentic:
                return problem
            for key in sorted(objects):  # the chain's: abandoned attempts are never read
                selection.consider(key, objects[key], sealed=key not in window.unsealed_keys)
            return problem

    # -- one batch ------------------------------------------------------------------------------

    def _replay(
        self,
        batch: list[_Candidate],
        request: ReplayRequest,
        bodies: _Bodies,
        report: ReplayReport,
    ) -> tuple[int, bool]:
        """Replay ``batch``: how many of it (from the front) are finished, and whether the run
        goes on (if not, ``report.stopped`` says why).

        The archive is read only within the run's time (``_Bodies``): once it is up, the batch is
        cut before the message whose body was still to be read, what was prepared before it is
        published, and the run stops on its time limit with the cursor there."""
        prepared: list[_Prepared] = []
        # Where in the batch each prepared message is, so that a failure cuts the batch there.
        positions: list[int] = []
        for position, candidate in enumerate(batch):
            if not (candidate.sealed or request.include_unsealed):
                report.unsealed += 1
                report.problems.append(_problem(candidate, UNSEALED, _UNSEALED_DETAIL))
                continue
            try:
                item = self._prepare(candidate, request, bodies, report)
            except TransportUnavailable as exc:
                _LOG.warning("the archive cannot be read: %s", exc)
                report.stopped = "archive unavailable"
            except _OutOfTime:
                _LOG.info("replay %s: time is up while reading the archive", request.replay_id)
                report.stopped = "time limit"
            else:
                if item is not None:
                    prepared.append(item)
                    positions.append(position)
                continue
            finished, _ = self._publish(prepared, positions, request, report, cut=position)
            return finished, False
        return self._publish(prepared, positions, request, report, cut=len(batch))

    def _publish(
        self,
        prepared: list[_Prepared],
        positions: list[int],
        request: ReplayRequest,
        report: ReplayReport,
        *,
        cut: int,
    ) -> tuple[int, bool]:
        """Publish ``prepared`` (or list them, dry run): the batch is finished up to ``cut``, or
        up to the first message the broker did not store; and whether the run goes on."""
        if request.dry_run:
            for item in prepared:
                report.would_replay += 1
                report.messages.append(_listed(item, WOULD_REPLAY))
            return cut, True
        if not prepared:
            return cut, True
        outcomes = self._broker.publish([item.outbound for item in prepared])
        stored = [item for item, outcome in zip(prepared, outcomes, strict=True) if outcome.stored]
        for item in stored:
            report.replayed += 1
            report.messages.append(_listed(item, REPLAYED))
        finished, go_on = cut, True
        first_failure = next((i for i, outcome in enumerate(outcomes) if not outcome.stored), None)
        if first_failure is not None:
            failure = outcomes[first_failure].failure
            report.failed += 1
            report.problems.append(_listed(prepared[first_failure], FAILED, detail=str(failure)))
            report.stopped = "broker refused" if failure is Failure.NACKED else "broker unavailable"
            # Everything from the first failure on is done again by the next run; a message
            # after it that the broker did store then arrives twice, with the same message id.
            finished, go_on = positions[first_failure], False
        if stored and not self._emit(stored, request.replay_id):
            # What the broker stored is replayed; going on would replay more without a trail.
            report.stopped = "audit unavailable"
            go_on = False
        return finished, go_on

    def _prepare(
        self,
        candidate: _Candidate,
        request: ReplayRequest,
        bodies: _Bodies,
        report: ReplayReport,
    ) -> _Prepared | None:
        """The message to publish for ``candidate``, or None when it is reported instead.

        Raises:
            TransportUnavailable: the archive cannot be read.
            _OutOfTime: the run's time is up before its body was found.
        """
        digest = candidate.body_sha256
        body = (
            None
            if digest is None
            else bodies.find(digest, candidate.audit_key, search=_elsewhere(candidate))
        )
        if body is None:
            detail = (
                "the record names no body"
                if digest is None
                else "not archived (its record says archived: false)"
                if candidate.archived is False
                else "no archive object of the period holds it"
            )
            report.missing_body += 1
            report.problems.append(_problem(candidate, MISSING_BODY, detail))
            return None
        if sha256_hex(body) != digest:
            report.corrupt += 1
            report.problems.append(
                _problem(candidate, CORRUPT, "the archived body does not match its SHA-256")
            )
            return None
        try:
            envelope = from_wire(body)
        except MessageRejected as exc:
            report.unreadable += 1
            report.problems.append(
                _problem(candidate, UNREADABLE, f"not a fabric envelope: {exc.rejection.reason}")
            )
            return None
        if envelope.message_id != candidate.message_id:
            report.corrupt += 1
            report.problems.append(
                _problem(candidate, CORRUPT, "the archived body is another message's envelope")
            )
            return None
        rejection = self._table.admit(envelope)
        if rejection is not None:  # as the router would today: a revoked source, a stricter floor
            report.refused += 1
            report.problems.append(
                _problem(candidate, REFUSED, f"{rejection.reason}: {rejection.message}")
            )
            return None
        deliveries = self._table.deliveries(envelope)
        headers = delivery_headers(envelope)
        headers[REPLAY_HEADER] = request.replay_id
        outbound = OutboundMessage(
            message_id=envelope.message_id,
            topic=envelope.topic,
            body=body,  # the stored bytes as they are: restricted payloads stay sealed
            audience=frozenset(d.group for d in deliveries),
            emergency=any(d.emergency for d in deliveries),
            headers=headers,
            correlation_id=envelope.correlation_id,
            reply_to=envelope.reply_to,
        )
        return _Prepared(candidate, envelope, outbound)

    def _emit(self, items: Sequence[_Prepared], replay_id: str) -> bool:
        at = self._now()
        stored = self._audit.emit(
            [
                AuditRecord(
                    event=AuditEvent.REPLAYED,
                    at=at,
                    message_id=item.envelope.message_id,
                    source="replay",
                    topic=item.envelope.topic,
                    body_sha256=item.candidate.body_sha256,
                    transport=_BROKER_TRANSPORT,
                    classification=str(item.envelope.classification),
                    priority=str(item.envelope.priority),
                    groups=tuple(sorted(item.outbound.audience)),
                    encrypted=item.envelope.classification is Classification.RESTRICTED,
                    replay_id=replay_id,
                )
                for item in items
            ]
        )
        if not stored:
            _LOG.error("audit records of %d replayed messages were not stored", len(items))
        return stored


class _OutOfTime(Exception):
    """The run's time limit passed before the object it was about to read (an archive object),
    or the next part of the trail would not be read within it (while selecting: ``_Steps``)."""


def _out_of_time(request: ReplayRequest, report: ReplayReport, where: str) -> None:
    """End a run whose time was up before it had read the period: ``period too long``, with
    nothing of a partial read in the report (its cursor stays where the run started), or
    ``trail not verified`` when a problem was found in the trail before (``Replayer._read``
    reports every one it found)."""
    if report.trail_problems:
        report.stopped = "trail not verified"
        return
    report.stopped = "period too long"
    report.trail_incomplete.clear()
    report.unsealed_objects = 0
    _LOG.warning(
        "replay %s: the period %s to %s is too long to read and verify within the run's"
        " time (%s); nothing was replayed: replay it in shorter periods",
        request.replay_id,
        format_timestamp(request.start),
        format_timestamp(request.end),
        where,
    )


class _Steps:
    """The run's reading of the trail, step by step (a writer's window, its delete-marker
    listing, a checkpoint interval), within its time: a step is begun only if, taking as long
    as its estimate, it ends before the ``deadline`` (on ``clock``).

    A step cannot stop halfway: an interval of up to 1,000 objects is read, verified and
    searched at once (25-40 s a million records). Begun just before the deadline, a long one
    would run past it by its whole length, and past the function's timeout when longer than
    the margin between them (``MAX_SECONDS``): the run would end with no report.

    A step is estimated from the last ``_RECENT_STEPS`` steps of its kind (a writer's window
    can take far longer or shorter than an interval, and would foretell intervals wrongly).
    An interval's size is known before it begins: its objects (from a few to 1,000), which
    ``read_objects`` reads ``READ_WORKERS`` at a time, so ``ceil(objects / READ_WORKERS)``
    rounds of reads (an empty interval, one: its call). It is estimated at its rounds times
    the seconds a round took in those intervals (their seconds over their rounds), so a large
    interval after small ones is foreseen, and one slow read (retried: the reader gives up a
    call after about 30 s) weighs as one round among theirs, not as the pace of every object
    of the next. A window or a delete-marker listing has no size known beforehand: it is
    estimated at the longest of those. A step slower than usual weighs on the estimates only
    until ``_RECENT_STEPS`` others of its kind followed it. So only a step longer than its
    estimate can end past the deadline, by what it takes more: the first of each kind
    (estimated at nothing), one slower than those before it, or a large interval after small
    ones by the verification and search of its objects, done one by one (a whole interval of
    1,000 objects takes about a minute at the benchmark's pace: within the margin)."""

    def __init__(self, clock: Callable[[], float], *, deadline: float) -> None:
        self._clock = clock
        self._deadline = deadline
        # Per kind of step: the last ones, as (seconds, rounds of reads).
        self._recent: dict[str, deque[tuple[float, int]]] = {}

    @contextmanager
    def step(self, kind: str, where: str, *, objects: int | None = None) -> Iterator[None]:
        """One step of ``kind``, timed; ``objects``: its size, for a kind that has one.

        Raises:
            _OutOfTime: it would not end before the deadline; the message is ``where``.
        """
        # An empty interval still costs its call: one round.
        rounds = 1 if objects is None else max(math.ceil(objects / READ_WORKERS), 1)
        recent = self._recent.setdefault(kind, deque(maxlen=_RECENT_STEPS))
        if not recent:
            estimate = 0.0
        elif objects is None:
            estimate = max(seconds for seconds, _ in recent)
        else:
            estimate = rounds * sum(s for s, _ in recent) / sum(r for _, r in recent)
        begun = self._clock()
        if begun + estimate >= self._deadline:
            raise _OutOfTime(where)
        yield
        recent.append((self._clock() - begun, rounds))


def _not_authentic(report: ReplayReport, writer: str, problem: Problem) -> None:
    """Report why the trail of ``writer`` is not authentic (the run stops: trail not verified)."""
    _LOG.warning("the trail of %s does not verify: %s", writer, problem)
    report.trail_problems.append(f"{writer}: {problem.where}: {problem.why}")


class _Bodies:
    """Archived bodies by SHA-256: first in the archive object beside the record's audit object
    (a body is archived in the same writer call as the record naming it), then, when a copy can
    be elsewhere (``_elsewhere``), in every archive object of the period's days, each read once
    a run. Only the bodies of ``candidates`` (the run's messages) are ever looked up, so only
    theirs are indexed: memory follows the run, not the archive objects read.

    Every archive object is read only while the run has time (``expired``): the search of a
    whole period's archive can take longer than the function may run."""

    def __init__(
        self,
        archive: ArchiveReader,
        writers: Sequence[str],
        days: list[date],
        report: ReplayReport,
        candidates: Sequence[_Candidate],
        *,
        expired: Callable[[], bool],
    ) -> None:
        self._archive = archive
        self._expired = expired
        self._writers = writers
        self._days = days
        self._report = report
        self._wanted = {c.body_sha256 for c in candidates if c.body_sha256 is not None}
        self._cache: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self._index: dict[str, str] = {}  # SHA-256 hex of a wanted body -> archive key
        self._unread: Iterator[str] | None = None
        # Read beside a record, so skipped when the search of the period's days reaches them
        # (the search itself goes through each key once).
        self._siblings: set[str] = set()

    def find(self, digest: str, audit_key: str, *, search: bool = True) -> bytes | None:
        """The archived bytes stored under ``digest`` (unchecked), or None; beyond the object
        beside ``audit_key`` and those already read, only with ``search``.

        Raises:
            TransportUnavailable: the archive cannot be read.
            _OutOfTime: the run's time is up before the body was found.
        """
        sibling = ARCHIVE_PREFIX + audit_key.removeprefix(AUDIT_PREFIX)
        self._siblings.add(sibling)
        for key in (sibling, self._index.get(digest)):
            if key is not None:
                body = self._load(key).get(digest)
                if body is not None:
                    return body
        if not search:
            return None
        if self._unread is None:
            self._unread = iter(_day_keys(self._archive, self._writers, self._days))
        for key in self._unread:
            if key in self._siblings:
                continue
            body = self._load(key).get(digest)
            if body is not None:
                return body
        return None

    def _load(self, key: str) -> dict[str, bytes]:
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        if self._expired():
            raise _OutOfTime(key)
        data = self._archive.read(key)
        bodies: dict[str, bytes] = {}
        if data is not None:
            try:
                bodies = decode_archive(data)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                _LOG.warning("archive object %s is not readable", key)
                self._report.unreadable_objects.append(key)
        for digest in self._wanted.intersection(bodies):
            self._index.setdefault(digest, key)
        self._cache[key] = bodies
        if len(self._cache) > _CACHED_ARCHIVES:
            self._cache.popitem(last=False)
        return bodies


def _elsewhere(candidate: _Candidate) -> bool:
    """Whether the body of ``candidate`` can be in an archive object other than the one beside
    its record, so that the period's archive is searched for it.

    Archived (or not said otherwise), it is beside the record; should that object be lost or
    unreadable, another acceptance of the same bytes (a producer's retry under the same id) or
    the drain's copy (a message accepted on the fallback path is archived again when drained)
    may hold it. Not archived (``archived: false``: too big for its audit message beside its
    record), the drain may still have archived the bytes beside its own, differently sized
    record; but nothing archives a message the broker took (``transport`` rabbitmq) again, so
    the whole period's archive is not read for one that can be in none of it."""
    return candidate.archived is not False or candidate.transport != _BROKER_TRANSPORT


def _search_days(request: ReplayRequest) -> list[date]:
    """The days whose objects can hold records of the period: written at or after a record's
    time, at most ``late_days`` after the period ends."""
    first = request.start.astimezone(UTC).date()
    last = (request.end - timedelta(microseconds=1)).astimezone(UTC).date()
    last += timedelta(days=request.late_days)
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def _day_keys(archive: ArchiveReader, writers: Sequence[str], days: list[date]) -> Iterator[str]:
    """The archive objects of ``writers`` for ``days``, lazily, writer by writer.

    Raises:
        TransportUnavailable: the bucket cannot be read.
    """
    for writer in writers:
        for day in days:
            yield from archive.keys(f"{ARCHIVE_PREFIX}{writer}/{day:%Y/%m/%d}/")


class _Trail:
    """The bucket as the trail's verifier reads it (``fabric.compliance_run.TrailStore``):
    replay needs no Object Lock headers, so none are read."""

    def __init__(self, archive: ArchiveReader) -> None:
        self._archive = archive

    def keys(self, prefix: str) -> list[str]:
        return self._archive.keys(prefix)

    def read(self, key: str) -> StoredObject | None:
        data = self._archive.read(key)
        return None if data is None else StoredObject(data, None, None)


class _Selection:
    """The messages one run takes, chosen as the verified trail is read, in memory that grows
    with the run's ``max_messages``, not with the period.

    For every matching message of the period it holds its id in an ``IdSet`` (about 25 bytes:
    ``selected``), and those accepted at or before the cursor once more (``done``: ``pending``
    is the rest); the whole acceptance only for the pending messages with the first positions,
    at most twice ``max_messages`` (``taken``): the run takes at most ``max_messages`` of them,
    the others are room for kept messages found done later. A message with a later position
    is set aside, and every position from the first one set aside (``_bound``) on is then left
    to a later run: a message set aside loses the acceptances read so far, so it can come back
    only by an earlier acceptance (its place in the replay), read later.

    Kept are therefore exactly the pending messages before ``_bound``, each at its first
    acceptance, with the acceptance ``_rank`` prefers among all of them, provided the
    unsealed objects are read before the sealed ones (``Replayer._read``): an acceptance that
    comes back after a sealed one was set aside is itself sealed and earlier, so preferred.
    ``short``: fewer kept than the run could take while some pending message was set aside.
    """

    def __init__(self, request: ReplayRequest, *, done: IdSet | None = None) -> None:
        self._request = request
        self._room = 2 * request.max_messages
        self._matching = IdSet()
        self.done = IdSet() if done is None else done
        self._kept: dict[str, _Candidate] = {}
        self._order: list[ReplayCursor] = []  # the kept messages' positions, sorted
        self._bound: ReplayCursor | None = None
        self._below: ReplayCursor | None = None  # the last position kept when _bound was set

    @property
    def selected(self) -> int:
        """The matching messages of the period."""
        return len(self._matching)

    @property
    def pending(self) -> int:
        """The matching messages after the cursor."""
        return len(self._matching) - len(self.done)

    @property
    def short(self) -> bool:
        """Whether the run could take more than it kept: read again, knowing ``done``."""
        return self._bound is not None and len(self._kept) < min(
            self._request.max_messages, self.pending
        )

    @property
    def resume(self) -> ReplayCursor | None:
        """When something was set aside and nothing is kept: a place after the cursor that
        every pending message lies after, from which the next run goes on.

        Kept are the pending messages before ``_bound``: none, so every pending message is at
        or after it. The last position kept when ``_bound`` was set lies between the cursor and
        it, and its message, dropped since, was found done. A run that resumes there finds the
        acceptances up to it done at once; if it too keeps nothing, its own ``resume`` lies at
        least twice ``max_messages`` kept positions further on."""
        return None if self._kept else self._below

    def taken(self) -> list[_Candidate]:
        """The kept messages in replay order: the first pending ones."""
        return [self._kept[position.message_id] for position in self._order]

    def consider(self, key: str, data: bytes, *, sealed: bool) -> None:
        """Take in each matching acceptance of object ``key`` (verified: it decodes)."""
        for record in decode_object(data):
            candidate = _candidate(record, key, sealed, self._request)
            if candidate is not None:
                self._add(candidate)

    def _add(self, candidate: _Candidate) -> None:
        message_id, position, after = candidate.message_id, candidate.position, self._request.after
        self._matching.add(message_id)
        if after is not None and position <= after:
            self.done.add(message_id)
            if message_id in self._kept:
                self._remove(self._kept.pop(message_id).position)
            return
        known = self._kept.get(message_id)
        if known is not None:
            # The acceptance replayed: sealed before unsealed, then the first; its place: the
            # message's first acceptance, sealed or not.
            chosen = candidate if _rank(candidate) < _rank(known) else known
            first_at = min(candidate.first_at, known.first_at)
            if first_at != known.first_at:
                self._remove(known.position)
                bisect.insort(self._order, position)
            if chosen is not known or first_at != known.first_at:
                self._kept[message_id] = dataclasses.replace(chosen, first_at=first_at)
            return
        if self._bound is not None and position >= self._bound:
            return
        if after is not None and message_id in self.done:
            return
        self._kept[message_id] = candidate
        bisect.insort(self._order, position)
        if len(self._order) > self._room:
            self._bound = self._order.pop()
            self._below = self._order[-1]
            del self._kept[self._bound.message_id]

    def _remove(self, position: ReplayCursor) -> None:
        del self._order[bisect.bisect_left(self._order, position)]


def _rank(candidate: _Candidate) -> tuple[bool, datetime, str, int]:
    """Which acceptance of a message is replayed: a sealed one before an unsealed one (which a
    forger could have chained on), then the first."""
    return (not candidate.sealed, candidate.at, candidate.audit_key, candidate.seq)


def _candidate(
    record: Mapping[str, Any], key: str, sealed: bool, request: ReplayRequest
) -> _Candidate | None:
    """``record`` as a candidate when it is an acceptance of the period matching the filter."""
    if record.get("event") != str(AuditEvent.ACCEPTED):
        return None
    message_id, at_text = record.get("message_id"), record.get("at")
    if not isinstance(message_id, str) or not isinstance(at_text, str):
        return None
    try:
        at = parse_timestamp(at_text)
    except ValueError:
        _LOG.warning("%s holds an accepted record with a bad time: %r", key, at_text)
        return None
    if not request.start <= at < request.end:
        return None
    topic, source = record.get("topic"), record.get("source")
    if not request.selection.admits(
        topic=topic if isinstance(topic, str) else None,
        message_id=message_id,
        source=source if isinstance(source, str) else None,
    ):
        return None
    digest, archived, seq = record.get("body_sha256"), record.get("archived"), record.get("seq")
    transport = record.get("transport")
    return _Candidate(
        at=at,
        message_id=message_id,
        topic=topic if isinstance(topic, str) else None,
        body_sha256=digest if isinstance(digest, str) else None,
        archived=archived if isinstance(archived, bool) else None,
        transport=transport if isinstance(transport, str) else None,
        audit_key=key,
        seq=seq if isinstance(seq, int) else 0,
        sealed=sealed,
        first_at=at,
    )


def _listed(item: _Prepared, outcome: str, *, detail: str | None = None) -> Listed:
    return Listed(
        message_id=item.candidate.message_id,
        at=item.candidate.first_at,
        topic=item.envelope.topic,
        outcome=outcome,
        groups=tuple(sorted(str(group) for group in item.outbound.audience)),
        detail=detail,
    )


def _problem(candidate: _Candidate, outcome: str, detail: str) -> Listed:
    return Listed(
        message_id=candidate.message_id,
        at=candidate.first_at,
        topic=candidate.topic,
        outcome=outcome,
        detail=detail,
    )


# -- the function's request --------------------------------------------------------------------

_REQUEST_FIELDS = frozenset(
    {
        "start",
        "end",
        "topics",
        "message_ids",
        "source",
        "dry_run",
        "max_messages",
        "rate_per_s",
        "max_seconds",
        "replay_id",
        "after",
        "late_days",
        "include_unsealed",
    }
)
_GROUP_NAMES = frozenset(group.value for group in Stakeholder)


def parse_request(
    event: object, *, max_seconds: float = MAX_SECONDS, now: datetime | None = None
) -> ReplayRequest:
    """The replay function's event (the runbook builds it): ``{"start" (before ``now``),
    "end" (RFC 3339, end exclusive), "topics"?, "message_ids"?, "source"?, "dry_run"?,
    "max_messages"? (1000), "rate_per_s"?, "max_seconds"?, "replay_id"? (a new one if
    absent), "after"? ({"at", "message_id"}: a cursor), "late_days"? (1), "include_unsealed"?
    (false)}``.

    Raises:
        ValueError: the event is malformed; the message says what is wrong.
    """
    if not isinstance(event, dict):
        raise ValueError("the event must be a JSON object")
    unknown = sorted(set(event) - _REQUEST_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(unknown)}")
    start, end = _moment(event, "start"), _moment(event, "end")
    # Nothing is archived yet for a period that starts later, and one near the calendar's end
    # would overflow the days searched after it.
    if start >= (now or datetime.now(UTC)):
        raise ValueError(f"the period starts in the future ({format_timestamp(start)})")
    dry_run, include_unsealed = event.get("dry_run", False), event.get("include_unsealed", False)
    if not isinstance(dry_run, bool) or not isinstance(include_unsealed, bool):
        raise ValueError("dry_run and include_unsealed must be true or false")
    max_messages = event.get("max_messages", 1000)
    if type(max_messages) is not int or max_messages < 1:
        raise ValueError("max_messages must be a positive whole number")
    late_days = event.get("late_days", DEFAULT_LATE_DAYS)
    if type(late_days) is not int or not 0 <= late_days <= MAX_LATE_DAYS:
        raise ValueError(f"late_days must be a whole number from 0 to {MAX_LATE_DAYS}")
    source = event.get("source")
    if source is not None and (not isinstance(source, str) or source not in _GROUP_NAMES):
        raise ValueError(f"source must be one of {', '.join(sorted(_GROUP_NAMES))}")
    replay_id = event.get("replay_id", str(uuid.uuid4()))
    if not isinstance(replay_id, str) or not REPLAY_ID_RE.fullmatch(replay_id):
        raise ValueError(f"replay_id must match {REPLAY_ID_RE.pattern}")
    selection = ReplayFilter(
        topics=tuple(strings(event, "topics")),
        message_ids=frozenset(_message_id(v) for v in strings(event, "message_ids")),
        source=source,
    )
    return ReplayRequest(
        start=start,
        end=end,
        replay_id=replay_id,
        selection=selection,
        dry_run=dry_run,
        max_messages=max_messages,
        rate_per_s=positive(event, "rate_per_s"),
        max_seconds=min(max_seconds, positive(event, "max_seconds") or max_seconds),
        after=_cursor(event.get("after")),
        late_days=late_days,
        include_unsealed=include_unsealed,
    )


def _moment(event: dict[str, object], name: str) -> datetime:
    value = event.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be an RFC 3339 timestamp with a timezone")
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _cursor(value: object) -> ReplayCursor | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"at", "message_id"}:
        raise ValueError('after must be a cursor {"at", "message_id"} from an earlier run')
    return ReplayCursor(_moment(value, "at"), _message_id(value["message_id"]))


def _message_id(value: object) -> str:
    normalized = normalize_message_id(value) if isinstance(value, str) else None
    if normalized is None:
        raise ValueError(f"{value!r} is not a message id (a UUID or a ULID)")
    return normalized
