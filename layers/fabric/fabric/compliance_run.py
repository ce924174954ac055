"""The compliance report run: a period of the audit trail read back, verified, reported, sent.

**What is read** for a period [start, end), per writer (``load_window``):

- the checkpoints around it: the first one written at or after ``start``, through the first one
  written at or after ``end + LATE_ARRIVAL`` (found by a binary search over
  ``checkpoints/<writer>/`` by each checkpoint's ``at``: a few reads), and the checkpoint just
  before them, the **anchor**. A record reaches the writer seconds after its event as a rule;
  the margin catches the period's last records, and the deliveries and drains that follow its
  last messages;
- every audit object those checkpoints name, and, when no checkpoint follows the margin yet, the
  objects written after the writer's last checkpoint (counted as not yet sealed);
- the listings of the days from the anchor's to the last checkpoint's
  (``audit/<writer>/<yyyy>/<mm>/<dd>/``), to find objects that no checkpoint names;
- nothing older. The anchor's signature proves where the window starts, and ``verify_trail``
  continues the numbering, the signature chain and the record chain from it, so a daily report
  reads a day and about two hours of the trail, not seven years of it. What precedes the anchor
  is covered by the reports of its own days, and ``runbook.py verify`` checks a whole trail.

**What fails verification** inside the window: everything ``verify_trail`` detects (a modified,
missing, reordered or inserted record, object or checkpoint, a bad signature, a broken chain, an
accepted message without an outcome), an object of the window's days that no checkpoint names
while a later checkpoint exists, a key that is not an audit object's, and a checkpoint that
cannot be read. Objects written after the writer's last checkpoint (the current hour) are
protected by the hash chain only.

**Object Lock** mode and retain-until are read back from S3 for every object the report reads
(audit objects and checkpoints), from the headers of the same GET.

The report goes to the reports bucket as JSON, HTML and CSV (``report_keys``), then a short
summary, with no message content, to the compliance topic.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Protocol

from fabric import metrics as metric_names
from fabric.audit_chain import Problem, Signer, decode_object, verify_trail
from fabric.compliance import ObjectLock, build_report, render_csv, render_html
from fabric.envelope import format_timestamp
from fabric.errors import FabricError
from fabric.ports import Metrics

SUMMARY_VERSION = "fabric.compliance-summary/2"
DAY = timedelta(days=1)
# How long after its event a record may reach the writer and still count in its period's report.
LATE_ARRIVAL = timedelta(hours=1)
# One invocation reads, verifies and reports the period within Lambda's 15 minutes.
MAX_PERIOD = timedelta(days=31)
READ_WORKERS = 16
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class InvalidReportRequest(FabricError):
    """The request names no valid period; nothing was read or written."""


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
    if period.start >= now:
        raise InvalidReportRequest(f"the period starts in the future ({period.bounds[0]})")
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
        stored = self._read[key][1]
        return ObjectLock(key, stored.lock_mode, stored.retain_until)

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
            if at.utcoffset() is None or not all(isinstance(i["key"], str) for i in named):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise _Unreadable(
                key, "not a checkpoint (a UTC at, named objects, a last_seq)"
            ) from None
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
        window.locks.append(ObjectLock(key, stored.lock_mode, stored.retain_until))
    return window


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
    checkpoint is listed whole."""
    if window.anchor is None and not window.checkpoints:
        return store.keys(f"audit/{writer}/")
    since = _at(window.anchor[1]).date() if window.anchor else period.start.date()
    until = _at(window.checkpoints[-1][1]).date() if sealed else (period.end + late).date()
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


def check_window(window: Window, signer: Signer) -> WriterCheck:
    """Verify ``window`` from its anchor (``verify_trail``); the first problem, if any."""
    if window.problem is not None and not window.checkpoints and not window.objects:
        # Reading stopped at an unreadable checkpoint: there is nothing to verify.
        return WriterCheck(window.writer, 0, 0, 0, len(window.unsealed_keys), window.problem)
    result = verify_trail(
        objects=window.objects,
        checkpoints=window.checkpoints,
        signer=signer,
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


def _records(windows: Sequence[Window]) -> Iterator[dict[str, Any]]:
    for window in windows:
        for key in sorted(window.objects.keys() - window.abandoned):  # counted where chained
            try:
                yield from decode_object(window.objects[key])
            except ValueError:
                continue  # the verifier named it; the figures skip what cannot be read


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
        trail: TrailStore,
        signer: Signer,
        reports: ReportStore,
        topic: SummaryTopic,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] | None = None,
        workers: int = READ_WORKERS,
    ) -> None:
        self._environment = environment
        self._writers = tuple(writers)
        self._trail = trail
        self._signer = signer
        self._reports = reports
        self._topic = topic
        self._metrics = metrics
        self._clock = clock or (lambda: datetime.now(UTC))
        self._workers = workers

    def report(self, period: Period) -> dict[str, Any]:
        """The report document of ``period`` (read and verified, nothing written).

        Raises:
            TransportUnavailable: the audit bucket cannot be read.
        """
        windows = [
            load_window(self._trail, writer, period, workers=self._workers)
            for writer in self._writers
        ]
        checks = [check_window(window, self._signer) for window in windows]
        problems = [check.problem for check in checks if check.problem is not None]
        return build_report(
            environment=self._environment,
            period=period.bounds,
            records=_records(windows),
            locks=[lock for window in windows for lock in window.locks],
            verified=not problems,
            problem=_problem_text(problems[0]) if problems else None,
            generated_at=format_timestamp(self._clock()),
            writers=[check.as_dict() for check in checks],
        )

    def run(self, period: Period) -> dict[str, Any]:
        """Report ``period``: the three files into the reports bucket, then the summary to the
        compliance topic; the summary.

        Raises:
            TransportUnavailable: the trail could not be read, or the report not written or
                published (nothing is published before all three files are stored).
        """
        report = self.report(period)
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
        "dead_lettered": report["dead_letters"]["dead_lettered"],
        "objects": lock["objects"],
        "unlocked_objects": len(lock["unlocked"]),
        "expired_objects": len(lock["expired"]),
        "earliest_retain_until": lock["earliest_retain_until"],
        "report": {"bucket": bucket, "json": keys.json, "html": keys.html, "csv": keys.csv},
    }
