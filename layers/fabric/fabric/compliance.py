"""The compliance report: what the audit trail says about a period, for machines and people.

``Figures`` takes the records one at a time, in any order, holding per message only what its
figures still need (see the class); ``report_document`` turns them (and what S3 says about each
object's lock, and what the environment requires of it: ``required_lock``) into one JSON
document; ``build_report`` does both for an iterable of records. ``render_html`` makes a
self-contained page (inline SVG charts, no external resources, no script); ``render_csv`` the
same figures as rows.

Records are counted when their ``at`` lies in the period. Records after the period are read
too (the loader adds a margin), but only to follow up messages of the period: a copy's first
delivery, a fallback copy's drain; so are deliveries and drains stamped up to ``EARLY`` before
it (a consumer's clock a little behind).

A **copy** is one message for one of the groups its ``accepted`` record addresses (``groups``):
deliveries are counted per copy, once, and only for the groups the message was addressed to,
so one group's delivery never stands in for another's, and a redelivery is not a second one.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import heapq
import html
import io
import math
import re
import secrets
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fabric.audit_writer import CONSUMER_EVENTS, group_owns
from fabric.envelope import parse_timestamp
from fabric.stakeholders import Stakeholder
from fabric.topology import OVERFLOW_QUEUE

REPORT_VERSION = "fabric.compliance-report/2"
EMERGENCY = "emergency"
# How many message ids a list in the report names at most (the count is always complete).
LISTED_IDS = 20
# How long before the period's start a delivery or drain may be stamped and still follow up a
# message of the period (a consumer's clock behind the router's): the margin the report reads
# after its end (``fabric.compliance_run.LATE_ARRIVAL``); it reads that much before its start
# too, from the checkpoint before the first in the period.
EARLY = timedelta(hours=1)
NOT_RECORDED = "not recorded"


@dataclass(frozen=True)
class ObjectLock:
    """What S3 says about one audit object's lock."""

    key: str
    mode: str | None
    retain_until: str | None
    # When it was written (RFC 3339; an audit object's day from its key): for ``LockPolicy``.
    written: str | None = None


@dataclass(frozen=True)
class LockPolicy:
    """The Object Lock every audit object of an environment must carry: ``mode``, retained at
    least ``days`` after it was written (a day's slack for the writer's and S3's clocks)."""

    mode: str
    days: int

    def problem(self, lock: ObjectLock) -> str | None:
        """Why ``lock`` falls short of the policy, or None."""
        if lock.mode is None:
            return f"no Object Lock ({self.mode} required)"
        if lock.mode != self.mode:
            return f"Object Lock {lock.mode}, {self.mode} required"
        if not lock.retain_until:
            return f"no retain-until date ({self.days} days required)"
        until, written = instant(lock.retain_until), instant(lock.written or "")
        if not until or not written:
            return f"retain-until {lock.retain_until!r} or written {lock.written!r} unreadable"
        needed = datetime.fromisoformat(written) + timedelta(days=self.days - 1)
        if datetime.fromisoformat(until) < needed:
            return f"retained until {lock.retain_until}, less than the {self.days} days required"
        return None

    def as_dict(self) -> dict[str, Any]:
        """As the report carries it."""
        return {"mode": self.mode, "retention_days": self.days}


# The production audit bucket's default retention (cdk.json, context.environments.prod.audit:
# COMPLIANCE, seven years, a year counted as 365 days as ``stacks.config.AuditConfig`` does).
# Under GOVERNANCE a role with s3:BypassGovernanceRetention could delete or shorten it.
PRODUCTION = "prod"
PRODUCTION_LOCK = LockPolicy("COMPLIANCE", 7 * 365)


def required_lock(environment: str) -> LockPolicy | None:
    """The Object Lock the report holds ``environment``'s audit objects to: production's
    (``PRODUCTION_LOCK``); None elsewhere (dev and staging keep theirs short, under GOVERNANCE).
    """
    return PRODUCTION_LOCK if environment == PRODUCTION else None


# The form the fabric writes (``envelope.format_timestamp``): ASCII digits only, so ``\d`` is not
# used (it matches other scripts' digits too).
_FABRIC_AT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.([0-9]+))?Z")


def instant(at: str) -> str:
    """``at`` (RFC 3339) as a fixed-width UTC string that sorts in time order.

    The fabric writes ``...T10:00:00Z``, ``...T10:00:00.5Z`` or ``...T10:00:00.123456Z``
    (``envelope.format_timestamp`` drops trailing zeros), which do not sort as text: ``.`` sorts
    before ``Z``. Anything else is parsed as the audit writer checks a consumer's ``at``
    (``envelope.parse_timestamp``: lowercase ``t`` and ``z``, an offset, a leap second, which
    Python holds as ``23:59:59.999999``), else as Python reads ISO 8601. What is no time (a
    tampered record's ``2026-12-02T1x:00:00Z``, a 13th month) is ``""``.
    """
    fixed = _FABRIC_AT.fullmatch(at)
    if fixed is not None and at[17:19] != "60":
        text = f"{at[:19]}.{fixed[1] or '':0<6.6}"
        try:
            datetime.fromisoformat(text)  # digits alone may still name no day: 2026-02-30
        except ValueError:
            return ""
        return text
    try:
        moment = parse_timestamp(at)
    except ValueError:
        try:
            moment = datetime.fromisoformat(at)
        except ValueError:
            return ""  # sorts before every period: never counted
    if moment.utcoffset() is None:
        return ""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


class IdSet:
    """A set of message ids in about 16 bytes each, for the ids a report must remember to the
    end of its period (a second acceptance of a message is not a new message).

    An id is held as its 128-bit BLAKE2b digest, keyed per set (so no producer can choose ids
    that collide; two distinct ids collide with probability about n²/2¹²⁹, never in practice):
    the newest in a Python set, the rest in two sorted arrays that the newest are merged into
    when they reach a quarter of them.
    """

    _MERGE_AT = 1024  # at least this many new ids before a merge

    def __init__(self) -> None:
        self._key = secrets.token_bytes(16)
        self._new: set[int] = set()
        self._high = array("Q")
        self._low = array("Q")

    def __len__(self) -> int:
        return len(self._new) + len(self._high)

    def _digest(self, message_id: str) -> int:
        digest = hashlib.blake2b(message_id.encode(), digest_size=16, key=self._key).digest()
        return int.from_bytes(digest, "big")

    def __contains__(self, message_id: object) -> bool:
        if not isinstance(message_id, str):
            return False
        digest = self._digest(message_id)
        if digest in self._new:
            return True
        high, low = digest >> 64, digest & _LOW
        index = bisect.bisect_left(self._high, high)
        while index < len(self._high) and self._high[index] == high:
            if self._low[index] == low:
                return True
            index += 1
        return False

    def add(self, message_id: str) -> bool:
        """Hold ``message_id``; whether it is new (False: it was held already)."""
        if message_id in self:
            return False
        self._new.add(self._digest(message_id))
        if len(self._new) >= max(self._MERGE_AT, len(self._high) // 4):
            merged = sorted(
                [*((h << 64) | o for h, o in zip(self._high, self._low, strict=True)), *self._new]
            )
            self._high = array("Q", (d >> 64 for d in merged))
            self._low = array("Q", (d & _LOW for d in merged))
            self._new = set()
        return True


_LOW = (1 << 64) - 1


class Figures:
    """The running totals of one pass over the records, and the little each message needs
    until the figures are final.

    What is held per message, and until when (everything else is a counter):

    - every message accepted in the period, so a second acceptance of it is not counted again
      (the least an exact count of copies must hold): about 16 bytes each (``IdSet``);
    - a message's groups not yet delivered, until the last is (``_open``);
    - the groups delivered of a message whose acceptance is not read yet (a delivery recorded
      before it, or of a message accepted before or after the period), to the end;
    - for an emergency, or an acceptance that names no groups, each group's first delivery, to
      the end (the latency and the copies are computed from them);
    - a fallback message's groups and the drains read, to the end.

    Records and bodies are never held: ``add`` takes one record at a time.
    """

    def __init__(self, start: str, end: str) -> None:
        self.period = (start, end)
        self.start, self.end = instant(start), instant(end)
        # Deliveries and drains stamped up to EARLY before the start still follow up the
        # period's messages (a consumer's clock a little behind the router's).
        early = max(datetime.fromisoformat(self.start), datetime.min + EARLY) - EARLY
        self.early = early.isoformat(timespec="microseconds")
        self.events: Counter[str] = Counter()
        self.transports: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.restricted = self.encrypted = self.not_archived = 0
        # Letters the overflow redrive put back in their terminal queue: still dead letters (or
        # audit batches), not messages back at their origin.
        self.overflow_returns = 0
        # UTC day -> records of it that reached the trail after its own report's window closed,
        # so that report lacks them (the caller says which: ``add``'s ``late_before``).
        self.late: Counter[str] = Counter()
        # Every message accepted in the period (its first acceptance decides its groups).
        self._accepted = IdSet()
        # Copies addressed and delivered, of the messages whose acceptance named its groups.
        self._addressed = self._delivered = 0
        # message id -> the groups of its first acceptance not delivered yet: one frozenset per
        # combination of groups, shared by every message waiting for it (``_shared``), where a
        # set of its own cost each message 200 to 500 bytes
        self._open: dict[str, frozenset[str]] = {}
        self._combinations: dict[frozenset[str], frozenset[str]] = {}
        # message id -> group -> first delivered instant: for the messages whose acceptance in
        # the period is not read yet, the emergencies, and the acceptances naming no groups
        self._deliveries: dict[str, dict[str, str]] = {}
        # message ids accepted in the period naming no groups: their groups are those delivered
        self._unnamed: set[str] = set()
        # message id -> (accepted instant, path "broker" or "fallback"), the period's emergencies
        self.emergencies: dict[str, tuple[str, str]] = {}
        # message id -> the groups its first acceptance named (emergencies only)
        self._emergency_groups: dict[str, frozenset[str]] = {}
        # message id -> (fallback instant, groups still to drain), for the period's fallbacks
        self.fallbacks: dict[str, tuple[str, set[str]]] = {}
        # drained copies seen: (message id, group) -> latest drained instant
        self.drained: dict[tuple[str, str], str] = {}

    def add(
        self, record: Mapping[str, Any], *, late_before: str = "", at: str | None = None
    ) -> None:
        """Count one record (records may come in any order).

        ``late_before``: a UTC day (``YYYY-MM-DD``); a record stamped before the period on a
        day before it reached the trail after that day's report window closed, and is counted
        as late (``fabric.compliance_run`` knows the windows: ``_late_before``). A record whose
        groups or queues are not lists is not the fabric's (a tampered object's, which the
        verifier names) and is not counted: it would stop the report. ``at``: the record's
        ``instant``, when the caller has it already."""
        if at is None:
            at = instant(str(record.get("at", "")))
        if not _well_typed(record):
            return
        if at < self.start and "" < at[:10] < late_before:
            self.late[at[:10]] += 1
        if at < self.early:
            return
        event = str(record.get("event"))
        message_id = record.get("message_id")
        if isinstance(message_id, str):
            self._follow_up(event, message_id, at, record)
        if self.start <= at < self.end:  # else it only follows up the period's messages
            self._count(event, message_id, at, record)

    def _follow_up(self, event: str, message_id: str, at: str, record: Mapping[str, Any]) -> None:
        if event == "delivered":
            for group in _groups(record):
                self._deliver(message_id, group, at)
        elif event == "drained":
            # Under "" too: a fallback record that names no group is drained by any copy.
            for group in (*(record.get("groups") or ()), ""):
                key = (message_id, str(group))
                self.drained[key] = max(at, self.drained.get(key, ""))

    def _deliver(self, message_id: str, group: str, at: str) -> None:
        waiting = self._open.get(message_id)
        if waiting is not None and group in waiting:
            self._delivered += 1
            if len(waiting) == 1:
                del self._open[message_id]
            else:
                self._open[message_id] = self._shared(waiting - {group})
        if message_id in self._accepted and not (
            message_id in self.emergencies or message_id in self._unnamed
        ):
            return  # its copies are counted: nothing more to hold
        seen = self._deliveries.setdefault(message_id, {})
        if group not in seen or at < seen[group]:
            seen[group] = at

    def _count(self, event: str, message_id: Any, at: str, record: Mapping[str, Any]) -> None:
        self.events[event] += 1
        # Only the platform's records carry bodies; a consumer's (a stakeholder may publish
        # those) cannot claim one was lost.
        if record.get("archived") is False and event not in CONSUMER_EVENTS:
            self.not_archived += 1
        if event == "accepted":
            self.transports[str(record.get("transport"))] += 1
            if isinstance(message_id, str):
                self._accept(message_id, at, record)
            if record.get("classification") == "restricted":
                self.restricted += 1
                self.encrypted += bool(record.get("encrypted"))
        elif event == "rejected":
            self.reasons[str(record.get("reason"))] += 1
        elif event == "redriven" and record.get("transport") == OVERFLOW_QUEUE:
            self.overflow_returns += 1
        elif event == "fallback" and isinstance(message_id, str):
            groups = {str(g) for g in record.get("groups") or ()} or {""}
            self.fallbacks[message_id] = (at, groups)

    def _accept(self, message_id: str, at: str, record: Mapping[str, Any]) -> None:
        groups = frozenset(str(g) for g in record.get("groups") or ())
        first = self._accepted.add(message_id)
        emergency = record.get("priority") == EMERGENCY and message_id not in self.emergencies
        if emergency:
            path = "broker" if record.get("transport") == "rabbitmq" else "fallback"
            self.emergencies[message_id] = (at, path)
        if not first:
            if emergency:
                # A second acceptance of the message is its first as an emergency: the copies of
                # its own groups, delivered as recorded from here on (what came before is counted
                # and gone; a producer re-sends the same message with the same priority).
                self._emergency_groups[message_id] = groups
                self._deliveries.setdefault(message_id, {})
            return
        seen = self._deliveries.get(message_id, {})
        if not groups:
            self._unnamed.add(message_id)
        else:
            self._addressed += len(groups)
            done = sum(group in seen for group in groups)
            self._delivered += done
            if done < len(groups):
                self._open[message_id] = self._shared(groups.difference(seen))
        if message_id in self.emergencies:
            self._emergency_groups[message_id] = groups
        elif groups:
            self._deliveries.pop(message_id, None)  # counted: nothing more to hold

    def _shared(self, groups: frozenset[str]) -> frozenset[str]:
        """The one frozenset held for the combination ``groups``."""
        return self._combinations.setdefault(groups, groups)

    def _groups_of(self, message_id: str) -> frozenset[str]:
        """An emergency's groups; for an acceptance that names none (a record from before
        acceptances named them), the groups that delivered it."""
        return self._emergency_groups.get(message_id) or frozenset(
            self._deliveries.get(message_id, ())
        )

    def copies(self) -> dict[str, Any]:
        """The period's accepted messages per addressed group: delivered (a consumer recorded
        it, by the end of what was read) or not."""
        # An acceptance naming no groups addresses the groups that delivered it: all delivered.
        unnamed = sum(len(self._deliveries.get(message_id, ())) for message_id in self._unnamed)
        addressed, delivered = self._addressed + unnamed, self._delivered + unnamed
        return {
            "addressed": addressed,
            "delivered": delivered,
            "undelivered": addressed - delivered,
            "undelivered_messages": len(self._open),
            "undelivered_message_ids": heapq.nsmallest(LISTED_IDS, self._open),
        }

    def latency(self) -> dict[str, Any]:
        """Emergency latency per copy: accepted to the group's first delivery, overall, per
        group and per path; the copies not delivered."""
        overall: list[float] = []
        by_group: dict[str, list[float]] = {}
        by_path: dict[str, list[float]] = {"broker": [], "fallback": []}
        copies = before = 0
        undelivered: list[str] = []
        for message_id, (accepted, path) in self.emergencies.items():
            groups = self._groups_of(message_id)
            first_delivery = self._deliveries.get(message_id, {})
            missing = not groups
            for group in sorted(groups):
                copies += 1
                delivered = first_delivery.get(group)
                if delivered is None:
                    missing = True
                    continue
                ms = _ms(accepted, delivered)
                before += ms < 0  # stamped before its acceptance: a consumer's clock is off
                overall.append(ms)
                by_group.setdefault(group, []).append(ms)
                by_path[path].append(ms)
            if missing:
                undelivered.append(message_id)
        return {
            **_percentiles(overall),
            "source": "delivered records" if overall else NOT_RECORDED,
            "emergencies_accepted": len(self.emergencies),
            "copies": copies,
            "undelivered_copies": copies - len(overall),
            "undelivered_messages": len(undelivered),
            "undelivered_message_ids": sorted(undelivered)[:LISTED_IDS],
            "delivered_before_acceptance": before,
            "by_group": {g: _percentiles(v) for g, v in sorted(by_group.items()) if g},
            # The broker path is what the one-second promise is about; a message accepted on
            # the fallback path waits for the drain, by design.
            "by_path": {path: _percentiles(v) for path, v in by_path.items()},
        }

    def not_drained(self) -> list[str]:
        """The period's fallback messages with a group copy that no later drain moved."""
        waiting = []
        for message_id, (at, groups) in self.fallbacks.items():
            if any(self.drained.get((message_id, group), "") < at for group in groups):
                waiting.append(message_id)
        return sorted(waiting)


def _well_typed(record: Mapping[str, Any]) -> bool:
    """Whether the fields the figures iterate, ``groups`` and ``queues``, are lists (or absent)
    as the fabric writes them; their items are taken as text whatever they are."""
    groups, queues = record.get("groups"), record.get("queues")
    return (groups is None or isinstance(groups, (list, tuple))) and (
        queues is None or isinstance(queues, (list, tuple))
    )


def _groups(record: Mapping[str, Any]) -> list[str]:
    """The consumer's group: the record's ``groups``, else the group owning the queue it was
    consumed from, by the rule the audit writer holds a group's consumer records to
    (``fabric.audit_writer.group_owns``: ``fabric.<group>...`` on RabbitMQ, ``...-<group>`` on
    SQS, by name or ARN)."""
    groups = [str(g) for g in record.get("groups") or ()]
    for queue in () if groups else record.get("queues") or ():
        owner = next((g.value for g in Stakeholder if group_owns(g.value, str(queue))), None)
        if owner is not None:
            groups.append(owner)
    return groups or [""]


def _ms(start: str, end: str) -> float:
    delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return round(delta.total_seconds() * 1000, 3)


def _percentiles(values: list[float]) -> dict[str, Any]:
    """Nearest-rank p50/p95/p99 and the maximum (None when there are no values)."""
    ordered = sorted(values)

    def rank(p: int) -> float | None:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else None

    return {
        "count": len(ordered),
        "p50": rank(50),
        "p95": rank(95),
        "p99": rank(99),
        "max": ordered[-1] if ordered else None,
    }


def build_report(
    *,
    environment: str,
    period: tuple[str, str],
    records: Iterable[Mapping[str, Any]],
    locks: Sequence[ObjectLock],
    verified: bool,
    problem: str | None,
    generated_at: str,
    writers: Sequence[Mapping[str, Any]] = (),
    required: LockPolicy | None = None,
) -> dict[str, Any]:
    """The report's figures for ``period`` (RFC 3339, start inclusive, end exclusive).

    ``records`` may be a generator (one pass); ``writers`` are the verifier's figures per writer
    (``writer``, ``records``, ``objects``, ``checkpoints``, ``unsealed_objects``, ``problem``);
    ``required``: the Object Lock every object must have (``required_lock``), if any.
    """
    figures = Figures(*period)
    for record in records:
        figures.add(record)
    return report_document(
        figures,
        environment=environment,
        locks=locks,
        verified=verified,
        problem=problem,
        generated_at=generated_at,
        writers=writers,
        required=required,
    )


def report_document(
    figures: Figures,
    *,
    environment: str,
    locks: Sequence[ObjectLock],
    verified: bool,
    problem: str | None,
    generated_at: str,
    writers: Sequence[Mapping[str, Any]] = (),
    required: LockPolicy | None = None,
) -> dict[str, Any]:
    """The report of ``figures`` (every record of the period added), as ``build_report``.

    Objects not locked as ``required`` make the report not verified: the trail's own problem
    is named first, else the first such object.
    """
    events = figures.events
    unavailable = figures.reasons.get("unavailable", 0)
    offered = events["accepted"] + unavailable
    copies = figures.copies()
    modes = Counter(lock.mode or "none" for lock in locks)
    now = instant(generated_at)
    waiting = figures.not_drained()
    restricted, encrypted = figures.restricted, figures.encrypted
    retain = [lock.retain_until for lock in locks if lock.retain_until]
    wrong = [] if required is None else [(lock.key, required.problem(lock)) for lock in locks]
    noncompliant = [f"{key}: {why}" for key, why in wrong if why is not None]
    return {
        "version": REPORT_VERSION,
        "environment": environment,
        "period": {"start": figures.period[0], "end": figures.period[1]},
        "generated_at": generated_at,
        "outcomes": dict(sorted(events.items())),
        "accepted_by_transport": dict(sorted(figures.transports.items())),
        "rejected_by_reason": dict(sorted(figures.reasons.items())),
        # Valid messages the fabric could store, of those it was offered (bad input excluded).
        "acceptance_rate": None if offered == 0 else events["accepted"] / offered,
        # Copies a consumer recorded as delivered, of the copies the period's messages addressed.
        "delivery_success_rate": (
            None if copies["addressed"] == 0 else copies["delivered"] / copies["addressed"]
        ),
        "copies": copies,
        # Messages the router stored on SNS/SQS because RabbitMQ could not take them.
        "fallback_activations": events.get("fallback", 0),
        "fallback_not_drained": {"messages": len(waiting), "message_ids": waiting[:LISTED_IDS]},
        "deliveries": {
            "delivered": events.get("delivered", 0),
            "retried": events.get("retried", 0),
            "replayed": events.get("replayed", 0),
        },
        "dead_letters": {
            "dead_lettered": events.get("dead-lettered", 0),
            "redriven": events.get("redriven", 0) - figures.overflow_returns,
            "returned_from_overflow": figures.overflow_returns,
            "drained": events.get("drained", 0),
        },
        "encryption": {
            "restricted_accepted": restricted,
            "encrypted": encrypted,
            "coverage": None if restricted == 0 else encrypted / restricted,
        },
        "archive": {"records_not_archived": figures.not_archived},
        # Records of earlier days that reached the trail after their day's report window closed
        # (its first checkpoint at or after the day's end and margin): that report lacks them.
        "late_records": {
            "records": sum(figures.late.values()),
            "by_day": dict(sorted(figures.late.items())),
        },
        "emergency_latency_ms": figures.latency(),
        "object_lock": {
            "objects": len(locks),
            "modes": dict(sorted(modes.items())),
            # Compared as instants: S3's dates lose their trailing zeros (``...:00Z``, ``.5Z``).
            "earliest_retain_until": min(retain, key=instant, default=None),
            "unlocked": [lock.key for lock in locks if lock.mode is None],
            # Locked, but no longer: its retain-until has passed.
            "expired": [
                lock.key
                for lock in locks
                if lock.mode is not None and lock.retain_until and instant(lock.retain_until) < now
            ],
            # What this environment requires of every object, and the objects without it.
            "required": None if required is None else required.as_dict(),
            "noncompliant": len(noncompliant),
            "noncompliant_objects": noncompliant[:LISTED_IDS],
        },
        "verification": {
            "verified": verified and not noncompliant,
            "problem": problem or (noncompliant[0] if noncompliant else None),
            "writers": list(writers),
        },
    }


def render_csv(report: Mapping[str, Any]) -> str:
    """Every figure as a ``section,name,value`` row."""
    out = io.StringIO()
    rows = csv.writer(out)
    rows.writerow(["section", "name", "value"])
    for section in (
        "outcomes",
        "accepted_by_transport",
        "rejected_by_reason",
        "deliveries",
        "dead_letters",
        "encryption",
        "archive",
    ):
        for name, value in report[section].items():
            rows.writerow([section, name, value])
    late = report["late_records"]
    rows.writerow(["late_records", "records", late["records"]])
    for day, count in late["by_day"].items():
        rows.writerow(["late_records", day, count])
    rows.writerow(["delivery", "acceptance_rate", report["acceptance_rate"]])
    rows.writerow(["delivery", "success_rate", report["delivery_success_rate"]])
    for name in ("addressed", "delivered", "undelivered", "undelivered_messages"):
        rows.writerow(["copies", name, report["copies"][name]])
    rows.writerow(["delivery", "fallback_activations", report["fallback_activations"]])
    rows.writerow(["delivery", "fallback_not_drained", report["fallback_not_drained"]["messages"]])
    latency = report["emergency_latency_ms"]
    for name in ("count", "p50", "p95", "p99", "max"):
        rows.writerow(["emergency_latency_ms", name, latency[name]])
    for name in (
        "emergencies_accepted",
        "copies",
        "undelivered_copies",
        "undelivered_messages",
        "delivered_before_acceptance",
    ):
        rows.writerow(["emergency", name, latency[name]])
    for group, figures in latency["by_group"].items():
        for name in ("count", "p50", "p95", "p99", "max"):
            rows.writerow([f"emergency_latency_ms.{group}", name, figures[name]])
    for path, figures in latency["by_path"].items():
        for name in ("count", "p50", "p95", "p99", "max"):
            rows.writerow([f"emergency_latency_ms.{path}_path", name, figures[name]])
    for name, value in report["object_lock"]["modes"].items():
        rows.writerow(["object_lock", name, value])
    rows.writerow(
        ["object_lock", "earliest_retain_until", report["object_lock"]["earliest_retain_until"]]
    )
    rows.writerow(["object_lock", "expired", len(report["object_lock"]["expired"])])
    rows.writerow(["object_lock", "noncompliant", report["object_lock"]["noncompliant"]])
    verification = report["verification"]
    rows.writerow(["verification", "verified", verification["verified"]])
    rows.writerow(["verification", "problem", verification["problem"] or ""])
    return out.getvalue()


def _bars(title: str, values: Mapping[str, int]) -> str:
    """A horizontal bar chart as inline SVG (sized in the page's own units, no fonts loaded)."""
    if not values:
        return f"<figure><figcaption>{html.escape(title)}</figcaption><p>none</p></figure>"
    top = max(values.values()) or 1
    row, label_w, bar_w = 26, 170, 380
    parts = []
    for i, (name, value) in enumerate(values.items()):
        y = i * row
        width = max(1, round(bar_w * value / top)) if value else 0
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end">{html.escape(name)}</text>'
            f'<rect x="{label_w}" y="{y + 4}" width="{width}" height="18" rx="3"></rect>'
            f'<text x="{label_w + width + 6}" y="{y + 17}">{value:,}</text>'
        )
    height = row * len(values)
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg role="img" aria-label="{html.escape(title)}" viewBox="0 0 640 {height}" '
        f'width="640" height="{height}">{"".join(parts)}</svg></figure>'
    )


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f} %"


def _ms_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f} ms"


def _latency_text(latency: Mapping[str, Any]) -> str:
    if not latency["count"]:
        return NOT_RECORDED
    return (
        f"{_ms_text(latency['p50'])} / {_ms_text(latency['p95'])} / {_ms_text(latency['p99'])}"
        f" (max {_ms_text(latency['max'])}, {latency['count']:,} copies)"
    )


def _late_text(late: Mapping[str, Any]) -> str:
    if not late["records"]:
        return "none"
    days = ", ".join(f"{day}: {count:,}" for day, count in late["by_day"].items())
    return f"{late['records']:,} ({days}), counted in none of those days' reports"


def _table(rows: Sequence[Sequence[str]], head: Sequence[str] | None = None) -> str:
    header = (
        "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead>"
        if head
        else ""
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<th>{html.escape(cell)}</th>" if i == 0 else f"<td>{html.escape(cell)}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table>{header}<tbody>{body}</tbody></table>"


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page: no script, no external stylesheet, font or image."""
    verification = report["verification"]
    verdict = (
        '<p class="ok">The trail verifies: signatures, hash chains, Merkle roots, sequence.</p>'
        if verification["verified"]
        else f'<p class="bad">NOT VERIFIED: {html.escape(str(verification["problem"]))}</p>'
    )
    lock = report["object_lock"]
    latency = report["emergency_latency_ms"]
    waiting = report["fallback_not_drained"]
    unlocked = lock["unlocked"]
    copies = report["copies"]
    summary = [
        ("Acceptance rate (stored of offered)", _percent(report["acceptance_rate"])),
        (
            "Delivery success rate (copies delivered of addressed)",
            f"{_percent(report['delivery_success_rate'])}: {copies['delivered']:,} of"
            f" {copies['addressed']:,}; {copies['undelivered_messages']:,} messages with a copy"
            " not delivered",
        ),
        ("Emergency latency p50 / p95 / p99", _latency_text(latency)),
        ("… accepted on the broker path", _latency_text(latency["by_path"]["broker"])),
        (
            "… accepted on the fallback path (until drained)",
            _latency_text(latency["by_path"]["fallback"]),
        ),
        (
            "Emergencies accepted / copies / copies not delivered",
            f"{latency['emergencies_accepted']:,} / {latency['copies']:,} /"
            f" {latency['undelivered_copies']:,}",
        ),
        (
            "Emergencies with a copy not delivered",
            ", ".join(latency["undelivered_message_ids"]) or "none",
        ),
        (
            "Emergency deliveries stamped before acceptance (clock skew)",
            f"{latency['delivered_before_acceptance']:,}",
        ),
        ("Encryption coverage of restricted", _percent(report["encryption"]["coverage"])),
        ("Fallback activations (messages)", f"{report['fallback_activations']:,}"),
        ("Fallback messages not yet drained", f"{waiting['messages']:,}"),
        (
            "Records whose body could not be archived",
            f"{report['archive']['records_not_archived']:,}",
        ),
        (
            "Records of earlier days received after their day's report (missing from it)",
            _late_text(report["late_records"]),
        ),
        (
            "Audit objects / Object Lock modes",
            f"{lock['objects']:,} / "
            + (", ".join(f"{mode} {count:,}" for mode, count in lock["modes"].items()) or "none"),
        ),
        ("Earliest retain-until", str(lock["earliest_retain_until"] or "n/a")),
        ("Unlocked objects", ", ".join(unlocked[:LISTED_IDS]) or "none"),
        ("Objects whose retention has expired", ", ".join(lock["expired"][:LISTED_IDS]) or "none"),
        (
            "Objects not locked as this environment requires"
            + (
                f" ({lock['required']['mode']}, {lock['required']['retention_days']:,} days)"
                if lock["required"]
                else " (nothing required here)"
            ),
            f"{lock['noncompliant']:,}: " + "; ".join(lock["noncompliant_objects"])
            if lock["noncompliant"]
            else "none",
        ),
    ]
    groups = [
        (
            group,
            f"{f['count']:,}",
            _ms_text(f["p50"]),
            _ms_text(f["p95"]),
            _ms_text(f["p99"]),
            _ms_text(f["max"]),
        )
        for group, f in latency["by_group"].items()
    ]
    by_group = (
        "<h2>Emergency latency per stakeholder group</h2>"
        "<p>From the router's acceptance to the group's consumer finishing the message.</p>"
        + _table(groups, ("group", "copies", "p50", "p95", "p99", "max"))
        if groups
        else ""
    )
    writers = [
        (
            str(w["writer"]),
            f"{w['records']:,}",
            f"{w['objects']:,}",
            f"{w['checkpoints']:,}",
            f"{w['unsealed_objects']:,}",
            "verified" if w["problem"] is None else f"NOT VERIFIED: {w['problem']}",
        )
        for w in verification.get("writers", [])
    ]
    trail = (
        "<h2>Audit trail read for this report</h2>"
        + _table(
            writers,
            ("writer", "records", "objects", "checkpoints", "not yet sealed", "verifier"),
        )
        if writers
        else ""
    )
    waiting_ids = (
        f"<p>Fallback messages not yet drained: {html.escape(', '.join(waiting['message_ids']))}"
        + (" ..." if waiting["messages"] > len(waiting["message_ids"]) else "")
        + "</p>"
        if waiting["messages"]
        else ""
    )
    period = report["period"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Messaging Fabric compliance report {html.escape(report["environment"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1b1b1b; max-width: 60rem; }}
h1 {{ font-size: 1.5rem; }} h2 {{ font-size: 1.15rem; margin-top: 2rem; }}
table {{ border-collapse: collapse; }}
th {{ text-align: left; padding-right: 2rem; font-weight: 600; }}
td, th {{ padding: .25rem 1rem .25rem 0; border-bottom: 1px solid #ddd; vertical-align: top; }}
td, p {{ overflow-wrap: anywhere; }}
thead th {{ border-bottom: 2px solid #999; }}
figure {{ margin: 1.5rem 0; }} figcaption {{ font-weight: 600; margin-bottom: .5rem; }}
svg text {{ font-size: 13px; fill: #1b1b1b; }} svg rect {{ fill: #2f6db5; }}
.ok {{ color: #116b2f; font-weight: 600; }} .bad {{ color: #a4161a; font-weight: 700; }}
</style></head><body>
<h1>Messaging Fabric: compliance report, {html.escape(report["environment"])}</h1>
<p>Period {html.escape(period["start"])} to {html.escape(period["end"])};
generated {html.escape(report["generated_at"])}.</p>
{verdict}
{_table(summary)}
{waiting_ids}
{by_group}
<h2>Charts</h2>
{_bars("Outcomes (audit records per event)", report["outcomes"])}
{_bars("Accepted messages per transport", report["accepted_by_transport"])}
{_bars("Rejections per reason", report["rejected_by_reason"])}
{_bars("Deliveries, retries and replays", report["deliveries"])}
{_bars("Dead letters", report["dead_letters"])}
{trail}
</body></html>
"""
