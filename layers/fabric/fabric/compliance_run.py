"""The compliance report run: a period of the audit trail read back, verified, reported, sent.

**What is read** for a period [start, end), per writer (``plan_window``, then ``scan_window``
interval by interval):

- the checkpoints around it: the first one written at or after ``start``, through the first one
  written at or after ``end + LATE_ARRIVAL`` (found by a binary search over
  ``checkpoints/<writer>/`` by each checkpoint's ``at``: a few reads), and the checkpoint just
  before them, the **anchor**. A record reaches the writer seconds after its event as a rule;
  the margin catches the period's last records, and the deliveries and drains that follow its
  last messages;
- every audit object those checkpoints name, and, when no checkpoint follows the margin yet, the
  objects written after the writer's last checkpoint (counted as not yet sealed);
- the listings of the days from the anchor's to the last checkpoint's
  (``audit/<writer>/<yyyy>/<mm>/<dd>/``), to find objects that no checkpoint names (of a writer
  whose last checkpoint is before the period, the period's days only, unless it wrote on them);
- nothing older. The anchor's signature proves where the window starts, and ``verify_trail``
  continues the numbering, the signature chain and the record chain from it, so a daily report
  reads a day and about two hours of the trail, not seven years of it. What precedes the anchor
  is covered by the reports of its own days, and ``runbook.py verify`` checks a whole trail.

**What fails verification** inside the window: everything ``verify_trail`` detects (a modified,
missing, reordered or inserted record, object or checkpoint, a bad signature, a broken chain, an
accepted message of the period without an outcome: one accepted in the margin is the next
period's, see ``_Outcomes``), a checkpoint naming a key outside ``audit/<writer>/``, an object
of the window's days that no checkpoint names while a later checkpoint exists, a key that is
not an audit object's, a checkpoint that cannot be read, and, once its seal is due
(``SEAL_DUE`` after the end and margin), a period that no checkpoint at or after its end and
margin seals, unless its writer stopped (``_not_sealed``), and a **delete marker** among the
versions of an audit object of the period's days (through its margin's) or of a checkpoint
after the anchor through the window's closing one (``deleted_in_window``).
Objects written after the writer's last checkpoint (the current hour) are protected by the hash
chain only; a delete marker is what would hide one of them, so the report looks for markers
itself.

**How it is read**: the window's checkpoints first (``plan_window``), then interval by interval
(``scan_window``): a checkpoint's seal is checked (``seal_problem``), then its objects are read,
verified against it from the checkpoint before it, counted into the figures and dropped, so
memory holds one interval, whatever the period; the verdict is the one ``verify_trail`` gives
over the whole window (``load_window`` and ``check_window``, which read it all at once, are the
reference it is tested against), but for an acceptance in the margin without an outcome, which
is not this period's problem, and a checkpoint naming a key outside the writer's objects.

**Late records.** A record that reaches the writer after its day's window closed (a writer
backlog of more than LATE_ARRIVAL) is counted by no report of its day. A later report that reads
it names it (``late_records``, per day: ``_late_before``), so the operator knows that day's
report lacks it; ``runbook.py verify`` checks it with the whole trail.

**Object Lock** mode and retain-until are read back from S3 for every object the report reads
(audit objects and checkpoints), from the headers of the same GET. In production every one must
be under COMPLIANCE for seven years (``fabric.compliance.required_lock``), or the report is not
verified.

The report goes to the reports bucket as JSON, HTML and CSV (``report_keys``), then a short
summary, with no message content, to the compliance topic.

**Time.** The function runs at most 15 minutes, and a long period at a high volume takes longer
to read. Given the time its invocation has left, a run looks at it before each writer and each
interval; once only ``ANSWER_MARGIN_S`` is left it stops reading, writes nothing, and tells the
compliance topic (and its caller, as an ``error``) that the period is too long and must be
reported in shorter periods, instead of being ended by Lambda with nothing said.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Protocol, cast

from fabric import metrics as metric_names
from fabric.audit_chain import (
    NO_CANONICAL_FORM,
    OUTCOME_EVENTS,
    Keyring,
    Problem,
    Verification,
    decode_object,
    has_canonical_form,
    remembering,
    seal_check,
    sequence_order,
    unlisted_key,
    verify_trail,
)
from fabric.compliance import (
    Figures,
    IdSet,
    ObjectLock,
    instant,
    render_csv,
    render_html,
    report_document,
    required_lock,
)
from fabric.envelope import format_timestamp
from fabric.errors import FabricError
from fabric.ports import Metrics

_LOG = logging.getLogger(__name__)

SUMMARY_VERSION = "fabric.compliance-summary/2"
DAY = timedelta(days=1)
# How long after its event a record may reach the writer and still count in its period's report.
LATE_ARRIVAL = timedelta(hours=1)
# How long after the period's end and LATE_ARRIVAL a checkpoint must seal it: the writer's hourly
# checkpoint (rate(1 hour) fires once in every hour) and a quarter hour for it to run. A report
# run later on a writer without one is not verified (``_not_sealed``).
SEAL_DUE = timedelta(hours=1, minutes=15)
# The longest period a request may name. A day of a million records takes 22-67 s to read, so
# at that volume a long period does not fit the function's 15 minutes: the run then stops when
# only ANSWER_MARGIN_S is left (``PeriodTooLong``) and says to report the period in parts.
MAX_PERIOD = timedelta(days=31)
# What a run keeps of its function's time after its last look at the clock (before each
# interval of each writer): that interval read, verified and counted (up to 1,000 objects, about
# a minute at the benchmark's pace), the writer's delete-marker listings, and the report written
# and published.
ANSWER_MARGIN_S = 120.0
READ_WORKERS = 16
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class InvalidReportRequest(FabricError):
    """The request names no valid period; nothing was read or written."""


class PeriodTooLong(FabricError):
    """The period could not be read within the function's time; nothing was written."""


@dataclass(frozen=True)
class Period:
    """A report's period, UTC, start inclusive, end exclusive."""

    start: datetime
    end: datetime

    @classmethod
    def day(cls, day: date) -> Period:
        """The UTC day ``day``."""
        start = datetime.combine(day, time(), tzinfo=UTC)
        return cls(start, start + DAY)

    @property
    def bounds(self) -> tuple[str, str]:
        """Start and end in RFC 3339 (the form the records carry)."""
        return format_timestamp(self.start), format_timestamp(self.end)

    @property
    def label(self) -> str:
        """``2026-12-03`` for a whole UTC day, else ``<start>--<end>`` (compact RFC 3339)."""
        if self == Period.day(self.start.date()):
            return f"{self.start:%Y-%m-%d}"
        return f"{_compact(self.start)}--{_compact(self.end)}"


def _compact(moment: datetime) -> str:
    fraction = f".{moment.microsecond:06d}" if moment.microsecond else ""
    return f"{moment:%Y%m%dT%H%M%S}{fraction}Z"


def requested_period(event: Any, *, now: datetime | None = None) -> Period:
    """The period an invocation asks for.

    - an EventBridge scheduled event: the UTC day before the event's ``time`` (so a retried
      invocation still reports the day it was scheduled for);
    - ``{"date": "YYYY-MM-DD"}``: that UTC day;
    - ``{"start": ..., "end": ...}``: RFC 3339 with a time zone, start before end, at most
      ``MAX_PERIOD`` long.

    The period must start before ``now``.

    Raises:
        InvalidReportRequest: anything else; the message says what is wrong.
    """
    now = now or datetime.now(UTC)
    if not isinstance(event, Mapping):
        raise InvalidReportRequest("the request must be a JSON object")
    try:
        period = _period(event)
    except OverflowError:  # a day before 0001-01-02 or after 9999-12-30, or an offset past it
        raise InvalidReportRequest("the period is out of range of the calendar") from None
    if period.start >= now:
        raise InvalidReportRequest(f"the period starts in the future ({period.bounds[0]})")
    return period


def _period(event: Mapping[str, Any]) -> Period:
    if event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event":
        return Period.day(_moment(event.get("time"), "time").date() - DAY)
    if set(event) == {"date"}:
        text = event["date"]
        if not isinstance(text, str) or not _DATE.fullmatch(text):
            raise InvalidReportRequest(f"date must be YYYY-MM-DD, got {text!r}")
        try:
            period = Period.day(date.fromisoformat(text))
        except ValueError:
            raise InvalidReportRequest(f"date {text!r} is not a calendar date") from None
    elif set(event) == {"start", "end"}:
        period = Period(_moment(event["start"], "start"), _moment(event["end"], "end"))
        if period.start >= period.end:
            raise InvalidReportRequest("start must be before end")
        if period.end - period.start > MAX_PERIOD:
            raise InvalidReportRequest(f"a report covers at most {MAX_PERIOD.days} days")
    else:
        raise InvalidReportRequest(
            'give {"date": "YYYY-MM-DD"} or {"start": ..., "end": ...} (RFC 3339), '
            f"got the fields {sorted(map(str, event))}"
        )
    return period


def _moment(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise InvalidReportRequest(f"{name} must be an RFC 3339 timestamp, got {value!r}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidReportRequest(f"{name} is not an RFC 3339 timestamp: {value!r}") from None
    if moment.utcoffset() is None:
        raise InvalidReportRequest(f"{name} needs a time zone (Z or +hh:mm): {value!r}")
    return moment.astimezone(UTC)


# -- ports ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredObject:
    """One object of the audit bucket as read: its bytes and what S3 says about its lock."""

    data: bytes
    lock_mode: str | None
    retain_until: str | None


class TrailStore(Protocol):
    """The audit bucket, read only."""

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, in key order.

        Raises:
            TransportUnavailable: the bucket cannot be listed.
        """
        ...

    def read(self, key: str) -> StoredObject | None:
        """The newest version of ``key`` with its Object Lock, or None when there is none.

        Raises:
            TransportUnavailable: the object cannot be read.
        """
        ...


class DeleteMarkers(Protocol):
    """The keys of the audit bucket that were deleted.

    A plain DeleteObject on a versioned bucket succeeds even under Object Lock: it adds a delete
    marker, and listings and reads no longer show the key, although its locked versions stay.
    """

    def deleted(self, prefix: str, *, after: str = "") -> list[str]:
        """The keys under ``prefix`` (only those after the key ``after``, if given) with a
        delete marker among their versions, in key order.

        Raises:
            TransportUnavailable: the bucket's versions cannot be listed.
        """
        ...


class ReportedTrail(TrailStore, DeleteMarkers, Protocol):
    """The audit bucket as the compliance report reads it: also the keys that were deleted."""


class ReportStore(Protocol):
    """Where reports are written (the reports bucket, SSE-KMS)."""

    bucket: str

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store one report file.

        Raises:
            TransportUnavailable: it could not be stored encrypted.
        """
        ...


class SummaryTopic(Protocol):
    """Where the summary goes (the SNS compliance topic)."""

    def publish(self, subject: str, message: str, attributes: Mapping[str, str]) -> None:
        """Publish one summary.

        Raises:
            TransportUnavailable: it could not be published.
        """
        ...


# -- the window of one writer --------------------------------------------------------------


@dataclass
class Window:
    """What the report read of one writer's trail (see the module docstring)."""

    writer: str
    anchor: tuple[str, dict[str, Any]] | None = None
    checkpoints: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # The last of them when it closes the window (the first at or after the end and margin);
    # None while no checkpoint does: the window then runs to the writer's last one and past it.
    closing: str | None = None
    objects: dict[str, bytes] = field(default_factory=dict)
    locks: list[ObjectLock] = field(default_factory=list)
    # Objects written after the writer's last checkpoint: only the hash chain protects them.
    unsealed_keys: set[str] = field(default_factory=set)
    problem: Problem | None = None  # found while reading, before the verifier ran
    # Attempts the writer gave up on (read for their hash): their records are the chain's too.
    abandoned: set[str] = field(default_factory=set)
    wanted: list[str] = field(default_factory=list)  # the objects verifying the window reads


class _Unreadable(Exception):
    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.problem = Problem(key, why)


class _Checkpoints:
    """A writer's checkpoints by index, each read at most once."""

    def __init__(self, store: TrailStore, keys: list[str], workers: int) -> None:
        self._store, self.keys, self._workers = store, keys, workers
        self._read: dict[str, tuple[dict[str, Any], StoredObject]] = {}

    def body(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        if key not in self._read:
            self._load(key, self._store.read(key))
        return self._read[key][0]

    def prefetch(self, indices: Sequence[int]) -> None:
        missing = [self.keys[i] for i in indices if self.keys[i] not in self._read]
        with ThreadPoolExecutor(self._workers) as pool:
            for key, stored in zip(missing, pool.map(self._store.read, missing), strict=True):
                self._load(key, stored)

    def lock(self, index: int) -> ObjectLock:
        key = self.keys[index]
        body, stored = self._read[key]
        return ObjectLock(key, stored.lock_mode, stored.retain_until, str(body["at"]))

    def _load(self, key: str, stored: StoredObject | None) -> None:
        if stored is None:
            raise _Unreadable(key, "listed but gone")
        try:
            body = json.loads(stored.data)
            if not isinstance(body, dict):
                raise TypeError
            at = datetime.fromisoformat(str(body["at"]))
            named = body["objects"]
            int(body["last_seq"])
            # Read before the signature is checked: an abandoned list of another shape is
            # named as this checkpoint's problem, not a crash of the whole report.
            listed = [*named, *body.get("abandoned", ())]
            if at.utcoffset() is None or not all(
                isinstance(i["key"], str) and isinstance(i["sha256"], str) for i in listed
            ):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise _Unreadable(
                key, "not a checkpoint (a UTC at, named objects, a last_seq)"
            ) from None
        # Its objects are read before its signature is checked: a key that no UTF-8 holds
        # would fail the S3 client, the whole report with it.
        if not has_canonical_form(body):
            raise _Unreadable(key, f"not a checkpoint ({NO_CANONICAL_FORM})")
        self._read[key] = (body, stored)

    def at(self, index: int) -> datetime:
        return _at(self.body(index))

    def first_at_or_after(self, moment: datetime) -> int | None:
        """The first checkpoint written at or after ``moment`` (they are written in order)."""
        low, high = 0, len(self.keys)
        while low < high:
            middle = (low + high) // 2
            if self.at(middle) >= moment:
                high = middle
            else:
                low = middle + 1
        return low if low < len(self.keys) else None


def load_window(
    store: TrailStore,
    writer: str,
    period: Period,
    *,
    late: timedelta = LATE_ARRIVAL,
    workers: int = READ_WORKERS,
) -> Window:
    """Read what verifying and reporting ``period`` of ``writer``'s trail needs: the window's
    checkpoints (``plan_window``), then every object it needs.

    Raises:
        TransportUnavailable: the bucket cannot be listed or read.
    """
    window = plan_window(store, writer, period, late=late, workers=workers)
    for key, stored in read_objects(store, window.wanted, workers).items():
        window.objects[key] = stored.data
        window.locks.append(_object_lock(key, stored))
    return window


def _object_lock(key: str, stored: StoredObject) -> ObjectLock:
    """An audit object's lock, written on the day its key names (the writer's clock)."""
    day = _day(key)
    written = None if day is None else f"{day:%Y-%m-%d}T00:00:00Z"
    return ObjectLock(key, stored.lock_mode, stored.retain_until, written)


def read_objects(
    store: TrailStore, keys: Sequence[str], workers: int = READ_WORKERS
) -> dict[str, StoredObject]:
    """``keys`` read ``workers`` at a time; a missing one is left out (the verifier names it).

    Raises:
        TransportUnavailable: an object cannot be read.
    """
    with ThreadPoolExecutor(workers) as pool:
        return {
            key: stored
            for key, stored in zip(keys, pool.map(store.read, keys), strict=True)
            if stored is not None
        }


def plan_window(
    store: TrailStore,
    writer: str,
    period: Period,
    *,
    late: timedelta = LATE_ARRIVAL,
    workers: int = READ_WORKERS,
) -> Window:
    """The window of ``period`` of ``writer``'s trail without its objects: the checkpoints,
    their locks, the listing's problems, and the keys of the objects to read (``wanted``).

    Raises:
        TransportUnavailable: the bucket cannot be listed or read.
    """
    window = Window(writer)
    checkpoints = _Checkpoints(store, store.keys(f"checkpoints/{writer}/"), workers)
    count = len(checkpoints.keys)
    try:
        first = checkpoints.first_at_or_after(period.start)
        after = checkpoints.first_at_or_after(period.end + late)
        low = count if first is None else first
        high = count if after is None else after + 1  # the window's checkpoints: [low, high)
        indices = ([low - 1] if low > 0 else []) + list(range(low, high))
        checkpoints.prefetch(indices)
    except _Unreadable as exc:
        window.problem = exc.problem
        return window
    if low > 0:
        window.anchor = (checkpoints.keys[low - 1], checkpoints.body(low - 1))
    window.checkpoints = [(checkpoints.keys[i], checkpoints.body(i)) for i in range(low, high)]
    window.closing = None if after is None else checkpoints.keys[after]
    window.locks = [checkpoints.lock(i) for i in indices]
    named = {item["key"] for _, body in window.checkpoints for item in body["objects"]}
    # A write's attempt the writer gave up on (its state update failed): named, never chained.
    abandoned = {
        item["key"] for _, body in window.checkpoints for item in body.get("abandoned", ())
    }
    floor = int(window.anchor[1]["last_seq"]) if window.anchor else 0
    anchor_day = _at(window.anchor[1]).date() if window.anchor else None
    last = window.checkpoints[-1][1] if window.checkpoints else (window.anchor or (None, {}))[1]
    sealed_to = int(last.get("last_seq", 0))
    # Everything written before the window's last checkpoint's day is sealed by it or earlier.
    sealed_day = _at(last).date() if after is not None else None
    unsealed: list[str] = []
    for key in _listed(store, writer, period, late, window, sealed=after is not None):
        seq, day = _first_seq(key), _day(key)
        if seq is None or day is None:
            window.problem = window.problem or Problem(key, "not an audit object key")
        elif (
            key not in named
            and key not in abandoned
            and (
                (
                    seq > floor
                    and (seq <= sealed_to or (sealed_day is not None and day < sealed_day))
                )
                # At or below the anchor's last sequence, yet written after the anchor's day: the
                # anchor sealed everything that old, so no such object can be genuine.
                or (seq <= floor and anchor_day is not None and day > anchor_day)
            )
        ):
            window.problem = window.problem or Problem(
                key, "an object no checkpoint names, among sealed ones"
            )
        elif seq > sealed_to and after is None:
            unsealed.append(key)  # written after the writer's last checkpoint
    window.unsealed_keys = set(unsealed)
    window.abandoned = abandoned - named
    window.wanted = sorted({*named, *unsealed, *window.abandoned})  # abandoned: hash checked
    return window


def _listed(
    store: TrailStore, writer: str, period: Period, late: timedelta, window: Window, *, sealed: bool
) -> list[str]:
    """The audit object keys of the days the window's objects were written on: from the
    anchor's day (else the period's first) to the last checkpoint's day (sealed) or the end of
    the margin (unsealed: the objects after the last checkpoint). A young trail without any
    checkpoint is listed whole. When the writer's last checkpoint is before the period (it
    stopped, or stopped sealing), the days before the period are listed only if it wrote on the
    period's days: what it wrote before belongs to those days' reports, and a writer retired
    long ago costs the period's few listings, not one per day since."""
    if window.anchor is None and not window.checkpoints:
        return store.keys(f"audit/{writer}/")
    # UTC days, as the keys are: a replay's period may come in any offset (06:00+07:00 is the
    # day before in the bucket).
    first = period.start.astimezone(UTC).date()
    since = _at(window.anchor[1]).date() if window.anchor else first
    until = (
        _at(window.checkpoints[-1][1]).date()
        if sealed
        else (period.end + late).astimezone(UTC).date()
    )
    if window.checkpoints or since >= first:
        return _day_keys(store, writer, since, until)
    recent = _day_keys(store, writer, first, until)
    # Objects of the period after a checkpoint before it: the days between chain them to it.
    return _day_keys(store, writer, since, first - DAY) + recent if recent else []


def _day_keys(store: TrailStore, writer: str, since: date, until: date) -> list[str]:
    """The audit object keys of ``writer`` on the days ``since`` to ``until``."""
    days = [since + timedelta(days=n) for n in range(max(0, (until - since).days) + 1)]
    return [key for day in days for key in store.keys(f"audit/{writer}/{day:%Y/%m/%d}/")]


def _at(checkpoint: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(str(checkpoint["at"])).astimezone(UTC)


_OBJECT_NAME = re.compile(r"(\d+)-(\d+)\.jsonl")


def _day(key: str) -> date | None:
    """The day in an audit object's key (``audit/<writer>/<yyyy>/<mm>/<dd>/...``)."""
    try:
        year, month, day = (int(part) for part in key.split("/")[-4:-1])
        return date(year, month, day)
    except ValueError:
        return None


def _first_seq(key: str) -> int | None:
    """The first sequence number in an audit object's key (``fabric.audit_writer.object_key``)."""
    match = _OBJECT_NAME.fullmatch(key.rsplit("/", 1)[-1])
    return None if match is None else int(match[1])


@dataclass(frozen=True)
class WriterCheck:
    """The verifier's figures for one writer's window."""

    writer: str
    records: int
    objects: int
    checkpoints: int
    unsealed_objects: int
    problem: Problem | None

    def as_dict(self) -> dict[str, Any]:
        """As the report carries it."""
        return {
            "writer": self.writer,
            "records": self.records,
            "objects": self.objects,
            "checkpoints": self.checkpoints,
            "unsealed_objects": self.unsealed_objects,
            "problem": None if self.problem is None else _problem_text(self.problem),
        }


def _problem_text(problem: Problem) -> str:
    return f"{problem.where}: {problem.why}"


def check_window(window: Window, keys: Keyring) -> WriterCheck:
    """Verify ``window`` from its anchor (``verify_trail``); the first problem, if any."""
    if window.problem is not None and not window.checkpoints and not window.objects:
        # Reading stopped at an unreadable checkpoint: there is nothing to verify.
        return WriterCheck(window.writer, 0, 0, 0, len(window.unsealed_keys), window.problem)
    result = verify_trail(
        objects=window.objects,
        checkpoints=window.checkpoints,
        keys=keys,
        writer=window.writer,
        anchor=window.anchor,
    )
    return WriterCheck(
        window.writer,
        result.records,
        result.objects,
        result.checkpoints,
        len(window.unsealed_keys),
        result.problem or window.problem,
    )


# -- the window interval by interval -------------------------------------------------------

_Checkpoint = tuple[str, dict[str, Any]]
_NO_OUTCOME = "an accepted message has no outcome (routed or fallback)"
_ABANDONED_DIFFERS = "an abandoned attempt whose SHA-256 differs"
_UNNAMED = "an object no checkpoint names, among sealed ones"


@dataclass(frozen=True)
class Interval:
    """One piece of a window: a checkpoint with the one before it (its anchor) and the objects
    it names, in its order; or the objects after the last checkpoint (no checkpoint, in sequence
    order). ``abandoned``: the attempts it is the first to name, read for their hash only."""

    anchor: _Checkpoint | None
    checkpoints: list[_Checkpoint]
    named: list[str]
    abandoned: list[str]


def intervals(window: Window) -> Iterator[Interval]:
    """The window in the pieces it is verified in, in chain order (replay reads it so too)."""
    anchor, listed = window.anchor, set()
    for checkpoint in window.checkpoints:
        named = [str(item["key"]) for item in checkpoint[1]["objects"]]
        abandoned = [
            key
            for key in dict.fromkeys(str(i["key"]) for i in checkpoint[1].get("abandoned", ()))
            if key in window.abandoned and key not in listed
        ]
        listed.update(abandoned)
        yield Interval(anchor, [checkpoint], named, abandoned)
        anchor = checkpoint
    if window.unsealed_keys or not window.checkpoints:
        yield Interval(anchor, [], sorted(window.unsealed_keys, key=sequence_order), [])


class _Outcomes:
    """The accepted messages without an outcome so far (``routed`` or ``fallback``) in a
    writer's window: the verifier's last check, across intervals. Held: the ids with an outcome
    (an acceptance after it needs none), and the acceptances still waiting for one.

    Only an acceptance of the period (``instant``) must find its outcome in the window. One in
    the margin after it is the next period's: the audit sink splits one router call's records
    into several audit messages (over 256 KiB), so a message's ``accepted`` and ``routed`` can
    be written either side of the window's closing checkpoint, and that would fail an intact
    period for good; the next period's window holds both halves. One stamped before the period
    is the previous period's (its ``routed`` may even be written before this window's anchor),
    unless it is late (``_late_before``: it reached the trail after its own day's window
    closed): then no other report would see that it has none, and this one checks it. A writer
    more than an hour behind can still split a call's records stamped before the end either
    side of the closing checkpoint: that day is then not verified (docs/audit-trail.md)."""

    def __init__(self, start: str, end: str) -> None:
        self._start, self._end = start, end
        self._answered = IdSet()
        # message id -> (place in the walk, "<key> record <seq>") of its first acceptance
        self._waiting: dict[str, tuple[tuple[int, int, int], str]] = {}

    def add(
        self,
        record: Mapping[str, Any],
        at: str,
        place: tuple[int, int, int],
        key: str,
        *,
        late_before: str = "",
    ) -> None:
        """``at``: the record's ``instant``; ``late_before``: as for ``Figures.add``."""
        event, message_id = record.get("event"), record.get("message_id")
        if not isinstance(message_id, str) or not isinstance(event, str):
            return
        if event in OUTCOME_EVENTS:
            self._answered.add(message_id)
            self._waiting.pop(message_id, None)
        elif (
            event == "accepted"
            and message_id not in self._answered
            and _owed(at, self._start, self._end, late_before)
        ):
            known = self._waiting.get(message_id)
            if known is None or place < known[0]:
                self._waiting[message_id] = (place, f"{key} record {record.get('seq')}")

    def problem(self) -> Problem | None:
        if not self._waiting:
            return None
        _, where = min(self._waiting.values())
        return Problem(where, _NO_OUTCOME, authentic=False)


def scan_window(
    store: TrailStore,
    window: Window,
    keys: Keyring,
    figures: Figures,
    *,
    workers: int = READ_WORKERS,
    in_time: Callable[[], bool] = lambda: True,
) -> tuple[WriterCheck, list[ObjectLock]]:
    """Verify and count ``window`` (``plan_window``) checkpoint by checkpoint: each interval's
    objects are read, verified against their checkpoint from the one before it
    (``verify_trail``), their records added to ``figures``, and dropped, so memory holds one
    interval and what ``figures`` keeps. A checkpoint whose seal fails, or that names a key
    outside the writer's objects, has nothing it names read (``seal_problem``). The verdict,
    counts and problem are those ``check_window`` finds over the whole window
    (``load_window``), whose checks come in this order: the checkpoints (signatures, numbers,
    links, the objects' hashes and Merkle roots), the abandoned attempts, an unnamed object
    among the sealed ones, the records, and last an acceptance without an outcome (of the
    period only, here: ``_Outcomes``). The locks: the checkpoints', then the objects' by key.
    Before each interval it asks ``in_time`` whether there is time to read one more.

    Raises:
        TransportUnavailable: the bucket cannot be read.
        PeriodTooLong: ``in_time`` said no; the message names where reading stopped.
    """
    scan = _Scan(window, figures)
    keys = remembering(keys)  # each checkpoint's seal is checked before and with its objects
    for index, interval in enumerate(intervals(window)):
        if not in_time():
            key, checkpoint = interval.checkpoints[0] if interval.checkpoints else ("", {})
            where = (
                f"the objects of {key}, sealed at {checkpoint['at']},"
                if key
                else "the objects after its last checkpoint"
            )
            raise PeriodTooLong(f"stopped at {where} in the trail of {window.writer}")
        unsealed = seal_problem(interval, keys, window.writer)
        names = [] if unsealed else [*interval.named, *interval.abandoned]
        stored = read_objects(store, names, workers)
        if window.problem is not None and not window.checkpoints and not stored:
            # Reading stopped at an unreadable checkpoint, or nothing was there to read.
            check = WriterCheck(window.writer, 0, 0, 0, len(window.unsealed_keys), window.problem)
            return check, list(window.locks)
        chained = scan.read(interval, stored)
        del stored
        result = (
            Verification(problem=unsealed)
            if unsealed
            else verify_trail(
                objects=chained,
                checkpoints=interval.checkpoints,
                keys=keys,
                writer=window.writer,
                anchor=interval.anchor,
            )
        )
        scan.verified(interval, chained, result)
        scan.count(index, interval, chained)
    return scan.check(), [*window.locks, *(scan.locks[key] for key in sorted(scan.locks))]


def seal_problem(interval: Interval, keys: Keyring, writer: str) -> Problem | None:
    """What is wrong with the seals of ``interval``'s anchor and checkpoint (a key it is not
    signed by, a retired one after a newer one, a signature that does not match, another
    writer's), or the first key its checkpoint names outside ``audit/<writer>/``; None when
    nothing is.

    Checked before anything the checkpoint names is read, as ``audit_chain.verify_intervals``
    does: a forged checkpoint names what it likes, keys the report may not read (which would
    stop the whole report rather than make it not verified) and as many as it likes (each one
    a read). A checkpoint's number and link to the one before it are taken as they are here,
    as ``verify_trail`` takes its anchor's: one signed by the writer names only the writer's
    objects, so the verifier checks those with them (after a deleted checkpoint, the next one
    is named, and its objects still counted)."""
    rank = 0
    for key, body in (*([interval.anchor] if interval.anchor else []), *interval.checkpoints):
        problem, rank = seal_check(
            key,
            body,
            cast(int, body.get("checkpoint")),
            body.get("previous_signature"),
            keys=keys,
            newest_rank=rank,
            writer=writer,
        )
        if problem is not None:
            return problem
    prefix = f"audit/{writer}/"
    for key, body in interval.checkpoints:
        names = [str(item["key"]) for item in (*body["objects"], *body.get("abandoned", ()))]
        # Every name counts as listed here: the verifier finds one that is missing.
        problem = unlisted_key(key, names, set(names), prefix)
        if problem is not None:
            return problem
    return None


def abandoned_digests(window: Window) -> dict[str, set[str]]:
    """Every SHA-256 the window's checkpoints name for each abandoned attempt's key (one key
    can be abandoned by two checkpoints, with other bytes)."""
    digests: dict[str, set[str]] = {key: set() for key in window.abandoned}
    for _, body in window.checkpoints:
        for item in body.get("abandoned", ()):
            if str(item["key"]) in digests:
                digests[str(item["key"])].add(str(item["sha256"]))
    return digests


def abandoned_problem(
    keys: Sequence[str], stored: Mapping[str, StoredObject], digests: Mapping[str, set[str]]
) -> Problem | None:
    """The first abandoned attempt of ``keys`` stored with bytes the writer never meant to store
    there (one that was never stored is not a problem)."""
    for key in keys:
        if key in stored and hashlib.sha256(stored[key].data).hexdigest() not in digests[key]:
            return Problem(key, _ABANDONED_DIFFERS)
    return None


class _Scan:
    """What ``scan_window`` gathers interval by interval."""

    def __init__(self, window: Window, figures: Figures) -> None:
        self.window, self.figures = window, figures
        self.digests = abandoned_digests(window)
        self.locks: dict[str, ObjectLock] = {}
        self.seals: Problem | None = None  # the first bad checkpoint (or anchor)
        self.sealed_before = 0  # the checkpoints before it
        self.abandoned: Problem | None = None
        self.walk: Problem | None = None  # the first bad record or object
        self.records = self.objects = self.passed = 0
        self.covered: list[str] = []
        self.present: set[str] = set()
        self.counted: set[str] = set()
        self.outcomes = _Outcomes(figures.start, figures.end)

    def read(self, interval: Interval, stored: Mapping[str, StoredObject]) -> dict[str, bytes]:
        """Note the locks and check the abandoned attempts of what was read; the chained
        objects."""
        for key, item in stored.items():
            self.locks.setdefault(key, _object_lock(key, item))
        self.abandoned = self.abandoned or abandoned_problem(
            interval.abandoned, stored, self.digests
        )
        chained = {key: stored[key].data for key in interval.named if key in stored}
        self.covered.extend(interval.named if interval.checkpoints else ())
        self.present.update(chained)
        return chained

    def verified(
        self, interval: Interval, chained: Mapping[str, bytes], result: Verification
    ) -> None:
        """Place the interval's problem among the window's checks (an acceptance without an
        outcome is looked for across intervals, by ``_Outcomes``)."""
        problem = result.problem if result.problem and result.problem.authentic else None
        anchor = interval.anchor[0] if interval.anchor else None
        if problem is None:
            pass
        elif (interval.checkpoints and result.checkpoints == 0) or problem.where == anchor:
            if self.seals is None:
                self.seals, self.sealed_before = problem, self.passed
            problem = None
        elif interval.checkpoints and _unnamed(chained, interval.named) is not None:
            problem = None  # an object out of its checkpoint's order: found over the window
        if self.walk is None:
            self.records += result.records
            self.objects += result.objects
            self.walk = problem
        self.passed += len(interval.checkpoints)

    def count(self, index: int, interval: Interval, chained: dict[str, bytes]) -> None:
        """Add the interval's records to the figures (by key, as the objects sort) and to the
        acceptances awaiting an outcome (in the verifier's order), dropping each object."""
        order = {key: n for n, key in reversed(list(enumerate(interval.named)))}
        late_before = _late_before(interval, self.figures.end)
        for key in sorted(chained):
            data = chained.pop(key)
            if key in self.counted:
                continue
            self.counted.add(key)
            for number, record in enumerate(_countable(data)):
                at = instant(str(record.get("at", "")))
                place = (index, order[key], number)
                self.outcomes.add(record, at, place, key, late_before=late_before)
                self.figures.add(record, late_before=late_before, at=at)

    def check(self) -> WriterCheck:
        """The window's verdict and counts, as ``check_window`` gives them."""
        records, objects, passed = self.records, self.objects, self.passed
        problem: Problem | None
        if self.seals is not None:
            problem, records, objects, passed = self.seals, 0, 0, self.sealed_before
        elif self.abandoned is not None:
            problem, records, objects = self.abandoned, 0, 0
        elif (extra := _unnamed(self.present, self.covered)) is not None:
            problem, records, objects = extra, 0, 0
        else:
            problem = self.walk or self.outcomes.problem()
        return WriterCheck(
            self.window.writer,
            records,
            objects,
            passed,
            len(self.window.unsealed_keys),
            problem or self.window.problem,
        )


def _owed(at: str, start: str, end: str, late_before: str) -> bool:
    """Whether an acceptance stamped ``at`` (``instant``) must find its outcome in the window:
    it is of the period, or late (stamped on a day before ``late_before``: ``_Outcomes``)."""
    return at < end and (at >= start or "" < at[:10] < late_before)


def _late_before(interval: Interval, end: str) -> str:
    """The UTC day before which a record of ``interval`` is late: stamped on a day whose report
    window had closed before the record's object was written, so no report of that day counts
    it (``Figures.late``); ``""`` when none can be.

    A day's window closes at its first checkpoint at or after the day's end and LATE_ARRIVAL.
    An object written after a checkpoint at or after that moment (the interval's anchor) is
    beyond it; one written before such a checkpoint is sealed by it or an earlier one, inside
    it. So the days ending at least LATE_ARRIVAL before the anchor are late. Only the intervals
    sealed before the period's ``end`` (and the objects after the last checkpoint) are looked
    at: those sealed at or after it are the next period's, which reads them too, so each late
    record is counted by one daily report, the one of the day its object was sealed on.

    The trail's first interval has no anchor: a day before the day its first object was
    written is late too (that day's report ran when the writer had stored nothing: a writer
    that began with a backlog), the day just before it not (its report, run after the margin,
    read that object)."""
    if interval.checkpoints and instant(str(interval.checkpoints[0][1]["at"])) >= end:
        return ""
    if interval.anchor is None:
        first = _day(interval.named[0]) if interval.named else None
        return "" if first is None else (first - timedelta(days=1)).isoformat()
    return (_at(interval.anchor[1]) - LATE_ARRIVAL).date().isoformat()


# A JSON escape of a UTF-16 surrogate, in a valid pair or alone (``fabric.audit_writer``).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _countable(data: bytes) -> list[dict[str, Any]]:
    """The records of an audit object the figures count: none of one that cannot be read, and
    none the writer could not have written (a lone surrogate: its text cannot be reported). The
    verifier names either."""
    try:
        records = decode_object(data)
    except (ValueError, RecursionError):
        return []
    if _SURROGATE_ESCAPE.search(data):  # rare: keep the records that encode
        return [record for record in records if has_canonical_form(record)]
    return records


def _unnamed(objects: Iterable[str], covered: Sequence[str]) -> Problem | None:
    """The first object among the sealed ones that no checkpoint names (as the verifier finds
    it: the objects in sequence order, against the checkpoints' lists in their order)."""
    ordered = sorted(objects, key=sequence_order)
    if ordered[: len(covered)] == list(covered):
        return None
    first = next((k for k, c in zip(ordered, covered, strict=False) if k != c), None)
    return Problem(first or covered[-1], _UNNAMED)


# -- the run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportKeys:
    """Where one period's report files go in the reports bucket."""

    json: str
    html: str
    csv: str


def report_keys(environment: str, period: Period) -> ReportKeys:
    """``compliance/<env>/<yyyy>/<mm>/<dd>/<label>.{json,html,csv}``, dated by the period's
    start (UTC); ``label`` is ``Period.label``. A report of the same period again writes a new
    version of the same keys (the bucket is versioned)."""
    base = f"compliance/{environment}/{period.start:%Y/%m/%d}/{period.label}"
    return ReportKeys(json=f"{base}.json", html=f"{base}.html", csv=f"{base}.csv")


def report_function_name(env_name: str) -> str:
    """``fabric-<env>-compliance-report``: the function the schedule and the runbook invoke."""
    return f"fabric-{env_name}-compliance-report"


class ComplianceReporter:
    """Reads, verifies and reports a period; writes the report and publishes its summary."""

    def __init__(
        self,
        *,
        environment: str,
        writers: Sequence[str],
        trail: ReportedTrail,
        keys: Keyring,
        reports: ReportStore,
        topic: SummaryTopic,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] | None = None,
        workers: int = READ_WORKERS,
    ) -> None:
        self._environment = environment
        self._writers = tuple(writers)
        self._trail = trail
        self._keys = keys
        self._reports = reports
        self._topic = topic
        self._metrics = metrics
        self._clock = clock or (lambda: datetime.now(UTC))
        self._workers = workers

    def report(
        self, period: Period, *, time_left: Callable[[], float] | None = None
    ) -> dict[str, Any]:
        """The report document of ``period`` (read and verified, nothing written). With
        ``time_left`` (the seconds the function has left), reading stops once no more than
        ``ANSWER_MARGIN_S`` are left, before the next writer or interval.

        Raises:
            TransportUnavailable: the audit bucket cannot be read.
            PeriodTooLong: the time ran out; the message says where reading stopped.
        """

        def in_time() -> bool:
            return time_left is None or time_left() > ANSWER_MARGIN_S

        figures = Figures(*period.bounds)
        read: list[tuple[Window, WriterCheck]] = []
        locks: list[ObjectLock] = []
        now = self._clock()
        for writer in self._writers:
            if not in_time():
                raise PeriodTooLong(f"stopped before the trail of {writer}")
            window = plan_window(self._trail, writer, period, workers=self._workers)
            check, window_locks = scan_window(
                self._trail, window, self._keys, figures, workers=self._workers, in_time=in_time
            )
            deleted = deleted_in_window(self._trail, window, period)
            if deleted is not None:  # the cause of whatever else the window shows missing
                check = dataclasses.replace(check, problem=deleted)
            read.append((window, check))
            locks.extend(window_locks)
        checks = [check for _, check in read]
        if now >= period.end + LATE_ARRIVAL + SEAL_DUE:
            # Due: each writer must seal the period, unless it stopped (``_not_sealed``).
            sealed = any(_seals(window, period) for window, _ in read)
            checks = [
                check
                if check.problem
                else dataclasses.replace(
                    check, problem=_not_sealed(window, period, trail_sealed=sealed)
                )
                for window, check in read
            ]
        problems = [check.problem for check in checks if check.problem is not None]
        return report_document(
            figures,
            environment=self._environment,
            locks=locks,
            verified=not problems,
            problem=_problem_text(problems[0]) if problems else None,
            generated_at=format_timestamp(now),
            writers=[check.as_dict() for check in checks],
            required=required_lock(self._environment),
        )

    def run(
        self, period: Period, *, time_left: Callable[[], float] | None = None
    ) -> dict[str, Any]:
        """Report ``period``: the three files into the reports bucket, then the summary to the
        compliance topic; the summary.

        With ``time_left`` (the seconds the function has left), a period that cannot be read
        in that time is not reported: no file is written, the compliance topic is told that
        it is too long and must be reported in shorter periods, and the answer is
        ``{"error": ...}`` saying so, as for a request refused.

        Raises:
            TransportUnavailable: the trail could not be read, or the report not written or
                published (nothing is published before all three files are stored).
        """
        try:
            report = self.report(period, time_left=time_left)
        except PeriodTooLong as exc:
            return self._too_long(period, str(exc))
        keys = report_keys(self._environment, period)
        self._reports.put(
            keys.json, json.dumps(report, indent=2).encode() + b"\n", "application/json"
        )
        self._reports.put(keys.html, render_html(report).encode(), "text/html; charset=utf-8")
        self._reports.put(keys.csv, render_csv(report).encode(), "text/csv; charset=utf-8")
        summary = summarize(report, bucket=self._reports.bucket, keys=keys)
        verified = bool(summary["verified"])
        self._topic.publish(
            f"Messaging Fabric {self._environment} compliance {period.label}: "
            + ("verified" if verified else "NOT VERIFIED"),
            json.dumps(summary, indent=2),
            {"verified": str(verified).lower(), "environment": self._environment},
        )
        if self._metrics is not None:
            self._metrics.count(
                {
                    metric_names.COMPLIANCE_REPORTS: 1,
                    metric_names.TRAIL_NOT_VERIFIED: int(not verified),
                }
            )
        return summary

    def _too_long(self, period: Period, where: str) -> dict[str, str]:
        """Tell the compliance topic that ``period`` was not reported: too long for one run."""
        start, end = period.bounds
        problem = (
            f"the period {start} to {end} is too long to read within the function's time"
            f" ({where}); nothing was written: report it in shorter periods"
            " (runbook.py report --start/--end)"
        )
        _LOG.error("compliance report of %s not written: %s", period.label, problem)
        notice = {
            "environment": self._environment,
            "period": {"start": start, "end": end},
            "verified": False,
            "reported": False,
            "problem": problem,
        }
        self._topic.publish(
            f"Messaging Fabric {self._environment} compliance {period.label}: NOT REPORTED",
            json.dumps(notice, indent=2),
            {"verified": "false", "environment": self._environment},
        )
        return {"error": problem}


_DELETED = "deleted after it was written (a delete marker among its versions)"


def deleted_in_window(
    store: DeleteMarkers, window: Window, period: Period, late: timedelta = LATE_ARRIVAL
) -> Problem | None:
    """The first key of ``window``'s writer that someone deleted: a delete marker among the
    versions of an audit object of the period's UTC days through ``late`` after its end (the
    report's margin; the replay's own), or of a
    checkpoint after the anchor through the window's closing one (``Window.closing``; every
    later one while none closes it); None when there is none.

    Nothing of the fabric deletes (the writer may only put, and the bucket policy denies
    deletes to everyone), yet a delete marker would hide an object from every listing and read
    the report goes by. A sealed object hidden so is missing from its checkpoint anyway; one
    after the writer's last checkpoint is not: today's last objects, or the unsealed tail of a
    writer that stopped (``_not_sealed`` excuses such a writer when nothing of it is listed
    after its last checkpoint), would vanish with their records and the period read verified.
    A checkpoint deleted after the closing one is a later period's (whose report names it when
    run after the deletion; ``runbook.py verify`` names it whenever it runs): counted here,
    it would make this period unverifiable for good, since the bucket policy denies removing
    the marker. A hidden checkpoint that would have closed the window sorts
    before the one that closes it now, so it is still counted.
    It costs a version listing per day and one of the checkpoints after the anchor: no more
    pages than the report's own listings of those."""
    first = period.start.astimezone(UTC).date()
    last = (period.end + late).astimezone(UTC).date()
    writer = window.writer
    for day in (first + timedelta(days=n) for n in range((last - first).days + 1)):
        objects = store.deleted(f"audit/{writer}/{day:%Y/%m/%d}/")
        if objects:
            return Problem(objects[0], _DELETED)
    after = window.anchor[0] if window.anchor else ""
    checkpoints = [
        key
        for key in store.deleted(f"checkpoints/{writer}/", after=after)
        if window.closing is None or key <= window.closing
    ]
    return Problem(checkpoints[0], _DELETED) if checkpoints else None


def _seals(window: Window, period: Period) -> bool:
    """Whether a checkpoint of ``window`` at or after the period's end and margin seals it."""
    last = window.checkpoints[-1] if window.checkpoints else window.anchor
    return last is not None and _at(last[1]) >= period.end + LATE_ARRIVAL


def _not_sealed(window: Window, period: Period, *, trail_sealed: bool) -> Problem | None:
    """Why ``window`` leaves ``period`` unsealed when its closing checkpoint is due: no
    checkpoint at or after the period's end and margin (the writer stopped sealing, or the
    trail's end is gone); None when one is there, or when the writer stopped writing: another
    writer seals the period (``trail_sealed``: the trail's sealing goes on) and this one wrote
    nothing from the period's first day on that its last checkpoint does not seal (a writer
    renamed or retired sealed all it wrote; one that stopped sealing, or an object put after
    its end, leaves an object after its last checkpoint)."""
    if _seals(window, period):
        return None
    first = period.start.astimezone(UTC).date()
    wrote = any(day is None or day >= first for day in map(_day, window.unsealed_keys))
    if trail_sealed and not wrote:
        return None
    due = period.end + LATE_ARRIVAL
    last = window.checkpoints[-1] if window.checkpoints else window.anchor
    if last is None:
        where, since = f"checkpoints/{window.writer}/", "no checkpoint"
    else:
        where, since = last[0], f"the last checkpoint ({last[1]['at']}); none"
    return Problem(where, f"{since} at or after {format_timestamp(due)} seals the period")


def summarize(report: Mapping[str, Any], *, bucket: str, keys: ReportKeys) -> dict[str, Any]:
    """The few figures the compliance topic and the runbook show: counts and rates, the
    verdict, the report's keys; never message content (ids and hashes are not in it either)."""
    outcomes = report["outcomes"]
    latency = report["emergency_latency_ms"]
    lock = report["object_lock"]
    verification = report["verification"]
    return {
        "version": SUMMARY_VERSION,
        "environment": report["environment"],
        "period": report["period"],
        "verified": verification["verified"],
        "problem": verification["problem"],
        "records": sum(outcomes.values()),
        "accepted": outcomes.get("accepted", 0),
        "rejected": outcomes.get("rejected", 0),
        "delivered": report["deliveries"]["delivered"],
        "acceptance_rate": report["acceptance_rate"],
        "delivery_success_rate": report["delivery_success_rate"],
        "copies_undelivered": report["copies"]["undelivered"],
        "emergencies_accepted": latency["emergencies_accepted"],
        "emergency_copies_undelivered": latency["undelivered_copies"],
        "emergency_latency_p99_ms": latency["p99"],
        "encryption_coverage": report["encryption"]["coverage"],
        "fallback_not_drained": report["fallback_not_drained"]["messages"],
        # Records of earlier days that their own day's report lacks (they reached the trail
        # after its window closed); the report's ``late_records.by_day`` names the days.
        "late_records": report["late_records"]["records"],
        "dead_lettered": report["dead_letters"]["dead_lettered"],
        "objects": lock["objects"],
        "unlocked_objects": len(lock["unlocked"]),
        "expired_objects": len(lock["expired"]),
        "noncompliant_objects": lock["noncompliant"],
        "earliest_retain_until": lock["earliest_retain_until"],
        "report": {"bucket": bucket, "json": keys.json, "html": keys.html, "csv": keys.csv},
    }
