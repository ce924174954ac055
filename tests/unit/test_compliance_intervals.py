"""The compliance report read interval by interval: the same report as reading the whole window
at once, in memory that does not grow with the period; and the Object Lock production needs."""

from __future__ import annotations

import json
import math
import random
import tracemalloc
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fabric.audit_chain import Keyring, canonical, decode_object
from fabric.audit_writer import CONSUMER_EVENTS
from fabric.compliance import (
    EARLY,
    EMERGENCY,
    LISTED_IDS,
    NOT_RECORDED,
    Figures,
    _groups,
    _ms,
    _percentiles,
    instant,
    report_document,
    required_lock,
)
from fabric.compliance_run import (
    ComplianceReporter,
    Period,
    StoredObject,
    check_window,
    load_window,
)
from fabric.envelope import format_timestamp
from fabric.topology import OVERFLOW_QUEUE
from tests.unit.test_compliance_run import NOW, WRITER, Trail, accepted_and_routed, reporter

DAY = date(2026, 12, 2)
MIDNIGHT = datetime(2026, 12, 2, tzinfo=UTC)


class _BeforeFigures:
    """The figures as they were computed before the report went interval by interval (every
    message's state held to the end), kept here as the reference the new code must equal."""

    def __init__(self, start: str, end: str) -> None:
        self.period = (start, end)
        self.start, self.end = instant(start), instant(end)
        self.events: Counter[str] = Counter()
        self.transports: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.restricted = self.encrypted = self.not_archived = 0
        self.overflow_returns = 0  # added since: the same rule as Figures, not part of the change
        self.late: Counter[str] = Counter()  # added since: no record of these trails is late
        self.addressed: dict[str, frozenset[str]] = {}
        self.emergencies: dict[str, str] = {}
        self.paths: dict[str, str] = {}
        self.first_delivery: dict[tuple[str, str], str] = {}
        self.delivered_groups: dict[str, set[str]] = {}
        self.fallbacks: dict[str, tuple[str, set[str]]] = {}
        self.drained: dict[tuple[str, str], str] = {}

    def add(self, record: Mapping[str, Any]) -> None:
        at = instant(str(record.get("at", "")))
        # Added since, the same rule as Figures: deliveries and drains stamped up to EARLY
        # before the start follow up the period's messages too (a consumer's clock behind).
        early = datetime.fromisoformat(self.start).replace(tzinfo=UTC) - EARLY
        if at < instant(format_timestamp(early)):
            return
        event = str(record.get("event"))
        message_id = record.get("message_id")
        if isinstance(message_id, str):
            self._follow_up(event, message_id, at, record)
        if self.start <= at < self.end:
            self._count(event, message_id, at, record)

    def _follow_up(self, event: str, message_id: str, at: str, record: Mapping[str, Any]) -> None:
        if event == "delivered":
            for group in _groups(record):
                seen = self.first_delivery.get((message_id, group))
                if seen is None or at < seen:
                    self.first_delivery[message_id, group] = at
                self.delivered_groups.setdefault(message_id, set()).add(group)
        elif event == "drained":
            for group in (*(record.get("groups") or ()), ""):
                key = (message_id, str(group))
                self.drained[key] = max(at, self.drained.get(key, ""))

    def _count(self, event: str, message_id: Any, at: str, record: Mapping[str, Any]) -> None:
        self.events[event] += 1
        if record.get("archived") is False and event not in CONSUMER_EVENTS:
            self.not_archived += 1
        if event == "redriven" and record.get("transport") == OVERFLOW_QUEUE:
            self.overflow_returns += 1
        if event == "accepted":
            self.transports[str(record.get("transport"))] += 1
            if isinstance(message_id, str):
                addressed = frozenset(str(g) for g in record.get("groups") or ())
                self.addressed.setdefault(message_id, addressed)
            if record.get("classification") == "restricted":
                self.restricted += 1
                self.encrypted += bool(record.get("encrypted"))
            if record.get("priority") == EMERGENCY and isinstance(message_id, str):
                self.emergencies.setdefault(message_id, at)
                path = "broker" if record.get("transport") == "rabbitmq" else "fallback"
                self.paths.setdefault(message_id, path)
        elif event == "rejected":
            self.reasons[str(record.get("reason"))] += 1
        elif event == "fallback" and isinstance(message_id, str):
            groups = {str(g) for g in record.get("groups") or ()} or {""}
            self.fallbacks[message_id] = (at, groups)

    def _groups_of(self, message_id: str) -> frozenset[str]:
        return self.addressed.get(message_id) or frozenset(
            self.delivered_groups.get(message_id, ())
        )

    def copies(self) -> dict[str, Any]:
        addressed = delivered = 0
        undelivered: list[str] = []
        for message_id in self.addressed:
            groups = self._groups_of(message_id)
            done = sum((message_id, group) in self.first_delivery for group in groups)
            addressed, delivered = addressed + len(groups), delivered + done
            if done < len(groups):
                undelivered.append(message_id)
        return {
            "addressed": addressed,
            "delivered": delivered,
            "undelivered": addressed - delivered,
            "undelivered_messages": len(undelivered),
            "undelivered_message_ids": sorted(undelivered)[:LISTED_IDS],
        }

    def latency(self) -> dict[str, Any]:
        overall: list[float] = []
        by_group: dict[str, list[float]] = {}
        by_path: dict[str, list[float]] = {"broker": [], "fallback": []}
        copies = before = 0
        undelivered: list[str] = []
        for message_id, accepted in self.emergencies.items():
            groups = self._groups_of(message_id)
            missing = not groups
            for group in sorted(groups):
                copies += 1
                delivered = self.first_delivery.get((message_id, group))
                if delivered is None:
                    missing = True
                    continue
                ms = _ms(accepted, delivered)
                before += ms < 0
                overall.append(ms)
                by_group.setdefault(group, []).append(ms)
                by_path[self.paths[message_id]].append(ms)
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
            "by_path": {path: _percentiles(v) for path, v in by_path.items()},
        }

    def not_drained(self) -> list[str]:
        waiting = []
        for message_id, (at, groups) in self.fallbacks.items():
            if any(self.drained.get((message_id, group), "") < at for group in groups):
                waiting.append(message_id)
        return sorted(waiting)


def report_before(
    trail: Trail, period: Period, environment: str = "test", now: datetime = NOW
) -> dict[str, Any]:
    """The report as it was made before: the whole window in memory (``load_window``), verified
    at once (``check_window``), every record of it counted in one pass, sorted by key."""
    window = load_window(trail.store, WRITER, period)
    check = check_window(window, Keyring([trail.signer]))
    figures = _BeforeFigures(*period.bounds)
    for key in sorted(window.objects.keys() - window.abandoned):
        try:
            records = decode_object(window.objects[key])
        except ValueError:
            continue
        for record in records:
            figures.add(record)
    problem = check.problem
    return report_document(
        figures,  # type: ignore[arg-type]
        environment=environment,
        locks=window.locks,
        verified=problem is None,
        problem=None if problem is None else f"{problem.where}: {problem.why}",
        generated_at=format_timestamp(now),
        writers=[check.as_dict()],
        required=required_lock(environment),
    )


def report_now(
    trail: Trail, period: Period, environment: str = "test", now: datetime = NOW
) -> dict[str, Any]:
    run = ComplianceReporter(
        environment=environment,
        writers=[WRITER],
        trail=trail.store,
        keys=Keyring([trail.signer]),
        reports=reporter(trail)[1],
        topic=reporter(trail)[2],
        clock=lambda: now,
    )
    return run.report(period)


def at(hour: float, minute: float = 0) -> datetime:
    return MIDNIGHT + timedelta(hours=hour, minutes=minute)


def delivered(message_id: str, group: str, **fields: Any) -> dict[str, Any]:
    return {"event": "delivered", "message_id": message_id, "groups": [group], **fields}


def busy_trail(*, seal_to: int = 27) -> Trail:
    """Dec 1 22:00 to Dec 3 03:00, sealed every hour up to ``seal_to`` hours after Dec 2 00:00:
    messages whose deliveries and drains come one and two intervals after their acceptance,
    emergencies on both paths, one never delivered, a message accepted twice, an acceptance that
    names no groups, a delivery written before its acceptance, messages accepted the evening
    before and in the margin after, rejections, restricted and unarchived messages."""
    trail = Trail()
    later: list[tuple[datetime, dict[str, Any]]] = []  # (when written, record)
    for hour in range(-2, 27):
        start = at(hour)
        ids = [f"m{hour:+03d}-{n}" for n in range(3)]
        for n, message_id in enumerate(ids):
            trail.write(
                start + timedelta(minutes=5 + n),
                *accepted_and_routed(message_id, groups=["media", "academic"]),
            )
            later.append((start + timedelta(minutes=20), delivered(message_id, "media")))
            later.append((start + timedelta(minutes=75 + n), delivered(message_id, "academic")))
        emergency = f"e{hour:+03d}"
        if hour % 3 == 0:  # on the fallback path, drained in the next hour
            trail.write(
                start + timedelta(minutes=30),
                {
                    "event": "accepted",
                    "message_id": emergency,
                    "transport": "sns",
                    "groups": ["government"],
                    "priority": EMERGENCY,
                },
                {
                    "event": "fallback",
                    "message_id": emergency,
                    "groups": ["government"],
                    "reason": "unavailable",
                },
            )
            later.append(
                (
                    start + timedelta(minutes=95),
                    {"event": "drained", "message_id": emergency, "groups": ["government"]},
                )
            )
            later.append((start + timedelta(minutes=125), delivered(emergency, "government")))
        elif hour % 3 == 1:
            trail.write(
                start + timedelta(minutes=30),
                *accepted_and_routed(emergency, groups=["government", "media"], priority=EMERGENCY),
            )
            later.append((start + timedelta(minutes=30, seconds=1), delivered(emergency, "media")))
            later.append((start + timedelta(minutes=130), delivered(emergency, "government")))
        else:  # an emergency nobody delivered, and a rejection
            trail.write(
                start + timedelta(minutes=30),
                *accepted_and_routed(emergency, priority=EMERGENCY, classification="restricted"),
                {"event": "rejected", "reason": "invalid-envelope" if hour % 2 else "unavailable"},
            )
        if hour == 5:  # the consumer's record reached the writer before the router's
            trail.write(at(5, 40), delivered("early", "media", at=format_timestamp(at(5, 41))))
            trail.write(at(5, 42), *accepted_and_routed("early", at=format_timestamp(at(5, 40))))
        if hour in (3, 9):  # one message id accepted twice (a producer re-sent it)
            trail.write(at(hour, 45), *accepted_and_routed("twice", groups=[f"g{hour}"]))
            later.append((at(hour, 50), delivered("twice", f"g{hour}")))
        if hour == 4:  # an acceptance from before they named groups, delivered from a queue
            trail.write(at(4, 50), *accepted_and_routed("legacy", groups=[]))
            later.append(
                (at(6), {"event": "delivered", "message_id": "legacy", "queues": ["fabric.media"]})
            )
        if hour == 8:
            trail.write(
                at(8, 55),
                *accepted_and_routed(
                    "sealed", classification="restricted", encrypted=True, archived=False
                ),
            )
            trail.write(  # stored on the fallback path, never drained
                at(8, 56),
                {"event": "accepted", "message_id": "stuck", "transport": "sns", "groups": ["x"]},
                {"event": "fallback", "message_id": "stuck", "groups": ["x"]},
            )
        for when, record in sorted(
            (item for item in later if item[0] < start + timedelta(hours=1)),
            key=lambda item: item[0],
        ):
            trail.write(when, record)
        later = [item for item in later if item[0] >= start + timedelta(hours=1)]
        if hour < seal_to:
            trail.checkpoint(start + timedelta(hours=1))
    return trail


@pytest.mark.parametrize("seal_to", [27, 24, 3])
def test_interval_by_interval_gives_the_report_the_whole_window_gave(seal_to: int) -> None:
    trail = busy_trail(seal_to=seal_to)
    # Reported at 02:10 on Dec 3, before the checkpoint that seals the day's margin is due (a
    # later report of a day its checkpoints stopped in is not verified: test_compliance_review).
    when = at(26, 10)
    before = report_before(trail, Period.day(DAY), now=when)
    now = report_now(trail, Period.day(DAY), now=when)
    assert now == before
    # The trail exercises what it is meant to.
    assert before["verification"]["verified"] is True
    assert before["copies"]["addressed"] > before["copies"]["delivered"] > 100
    latency = before["emergency_latency_ms"]
    assert latency["by_path"]["fallback"]["count"] > 0
    assert latency["undelivered_messages"] > 0
    assert before["fallback_not_drained"]["messages"] > 0


def _damage(trail: Trail, how: str) -> None:
    store = trail.store
    audit = store.keys(f"audit/{WRITER}/2026/12/02/")
    checkpoints = store.keys(f"checkpoints/{WRITER}/")
    if how in ("object", "object-and-checkpoint"):
        key = audit[40]
        lines = store.objects[key].data.splitlines()
        record = json.loads(lines[0])
        record["transport"] = "sns"
        store.put(key, canonical(record) + b"\n" + b"\n".join(lines[1:]) + b"\n")
    if how in ("checkpoint", "object-and-checkpoint"):
        del store.objects[checkpoints[20]]
    if how == "unnamed":
        store.put(f"audit/{WRITER}/2026/12/02/000000000100-000000000100.jsonl", b"{}\n")
    if how == "no-outcome":
        # Accepted in the period (an acceptance in the margin after it is the next period's).
        trail.write(at(28, 30), {"event": "accepted", "message_id": "lost", "groups": ["media"]})
        trail.write(at(28, 31), *accepted_and_routed("fine"))
    if how == "outcome-in-the-next-interval":
        # One batch written in two calls, a checkpoint between them: both in the window.
        trail.write(at(27, 59), {"event": "accepted", "message_id": "split", "groups": ["media"]})
        trail.checkpoint(at(28))
        trail.write(at(28, 1), {"event": "routed", "message_id": "split", "queues": []})
        for hour in (29, 30, 31):
            trail.checkpoint(at(hour))


@pytest.mark.parametrize(
    "how",
    [
        "object",
        "checkpoint",
        "object-and-checkpoint",
        "unnamed",
        "no-outcome",
        "outcome-in-the-next-interval",
    ],
)
def test_a_damaged_trail_is_named_as_the_whole_window_named_it(how: str) -> None:
    trail = busy_trail(seal_to=27)
    _damage(trail, how)
    period = Period(MIDNIGHT, at(29))
    before = report_before(trail, period)
    assert now_equal(report_now(trail, period), before)
    assert before["verification"]["verified"] is (how == "outcome-in-the-next-interval")


def now_equal(now: dict[str, Any], before: dict[str, Any]) -> bool:
    assert now["verification"] == before["verification"]
    assert now == before
    return True


# -- memory --------------------------------------------------------------------------------


class CopyingStore:
    """The trail as S3 hands it out: every read is new bytes (the memory stand-in shares its)."""

    def __init__(self, trail: Trail) -> None:
        self._store = trail.store

    def keys(self, prefix: str) -> list[str]:
        return self._store.keys(prefix)

    def deleted(self, prefix: str, *, after: str = "") -> list[str]:
        return self._store.deleted(prefix, after=after)

    def read(self, key: str) -> StoredObject | None:
        stored = self._store.objects.get(key)
        if stored is None:
            return None
        return StoredObject(bytes(bytearray(stored.data)), stored.lock_mode, None)


def steady_trail(hours: int, per_hour: int = 60) -> Trail:
    """``hours`` of ``per_hour`` messages (accepted, routed, delivered by two groups a few
    minutes later, in the next object), sealed hourly."""
    trail = Trail()
    padding = "x" * 300  # about the size of the fabric's records
    for hour in range(hours):
        start = at(hour)
        for n in range(per_hour // 10):
            ids = [f"m-{hour:04d}-{n:02d}-{k}" for k in range(10)]
            when = start + timedelta(minutes=5 * n)
            trail.write(
                when,
                *(
                    record
                    for message_id in ids
                    for record in accepted_and_routed(
                        message_id, groups=["media", "academic"], topic=padding
                    )
                ),
            )
            trail.write(
                when + timedelta(minutes=2),
                *(delivered(m, g, topic=padding) for m in ids for g in ("media", "academic")),
            )
        trail.checkpoint(start + timedelta(hours=1))
    return trail


def peak_bytes(trail: Trail, hours: int) -> int:
    run = ComplianceReporter(
        environment="test",
        writers=[WRITER],
        trail=CopyingStore(trail),
        keys=Keyring([trail.signer]),
        reports=reporter(trail)[1],
        topic=reporter(trail)[2],
        clock=lambda: at(hours, 30),  # the period's closing checkpoint is not due yet
        workers=2,
    )
    tracemalloc.start()
    try:
        report = run.report(Period(MIDNIGHT, at(hours)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report["verification"]["verified"] is True
    assert report["copies"]["delivered"] == report["copies"]["addressed"] > 0
    return peak


def test_memory_holds_one_interval_not_the_period() -> None:
    small, large = 2, 20
    small_peak = peak_bytes(steady_trail(small, per_hour=120), small)
    large_peak = peak_bytes(steady_trail(large, per_hour=120), large)
    # Ten times the records: the interval read at a time is the same, only the message ids
    # (for a second acceptance of one) grow. The whole window at once grew about tenfold.
    print(f"peak {small_peak:,} B for {small} hours, {large_peak:,} B for {large} hours")
    assert large_peak < 2.5 * small_peak, (small_peak, large_peak)
    assert math.isfinite(large_peak / small_peak)


# -- the Object Lock production requires ---------------------------------------------------


def quiet_trail() -> Trail:
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, 22, tzinfo=UTC), 28)
    return trail


def test_production_objects_locked_in_compliance_mode_for_seven_years_verify() -> None:
    trail = quiet_trail()
    report = report_now(trail, Period.day(DAY), environment="prod")
    lock = report["object_lock"]
    assert lock["required"] == {"mode": "COMPLIANCE", "retention_days": 2555}
    assert (lock["noncompliant"], lock["noncompliant_objects"]) == (0, [])
    assert report["verification"] == {**report["verification"], "verified": True, "problem": None}


@pytest.mark.parametrize(
    ("mode", "until", "why"),
    [
        ("GOVERNANCE", "2033-12-03T00:00:00Z", "Object Lock GOVERNANCE, COMPLIANCE required"),
        (None, None, "no Object Lock (COMPLIANCE required)"),
        ("COMPLIANCE", None, "no retain-until date (2555 days required)"),
        (
            "COMPLIANCE",
            "2032-12-02T00:00:00Z",  # six years
            "retained until 2032-12-02T00:00:00Z, less than the 2555 days required",
        ),
    ],
)
def test_a_production_object_not_locked_as_required_is_a_problem(
    mode: str | None, until: str | None, why: str
) -> None:
    trail = quiet_trail()
    key = trail.store.keys(f"audit/{WRITER}/2026/12/02/")[7]
    trail.store.put(key, trail.store.objects[key].data, lock_mode=mode, retain_until=until)
    report = report_now(trail, Period.day(DAY), environment="prod")
    assert report["object_lock"]["noncompliant"] == 1
    assert report["object_lock"]["noncompliant_objects"] == [f"{key}: {why}"]
    assert report["verification"]["verified"] is False
    assert report["verification"]["problem"] == f"{key}: {why}"
    (writer,) = report["verification"]["writers"]
    assert writer["problem"] is None, "the trail itself verifies"


def test_a_production_checkpoint_under_governance_is_a_problem_too() -> None:
    trail = quiet_trail()
    key = trail.store.keys(f"checkpoints/{WRITER}/")[10]
    trail.store.put(key, trail.store.objects[key].data, lock_mode="GOVERNANCE")
    report = report_now(trail, Period.day(DAY), environment="prod")
    assert report["verification"]["problem"] == (
        f"{key}: Object Lock GOVERNANCE, COMPLIANCE required"
    )


def test_a_trail_problem_is_named_before_a_lock_problem() -> None:
    trail = quiet_trail()
    audit = trail.store.keys(f"audit/{WRITER}/2026/12/02/")
    trail.store.put(audit[3], trail.store.objects[audit[3]].data, lock_mode="GOVERNANCE")
    del trail.store.objects[audit[9]]
    report = report_now(trail, Period.day(DAY), environment="prod")
    assert report["verification"]["problem"].startswith(f"{audit[9]}: named by ")
    assert report["object_lock"]["noncompliant"] == 1


def test_staging_keeps_its_short_governance_lock_without_a_problem() -> None:
    trail = quiet_trail()
    key = trail.store.keys(f"audit/{WRITER}/2026/12/02/")[7]
    trail.store.put(key, trail.store.objects[key].data, lock_mode="GOVERNANCE")
    report = report_now(trail, Period.day(DAY), environment="staging")
    assert report["object_lock"]["required"] is None
    assert report["verification"]["verified"] is True
    assert report["object_lock"]["modes"] == {"COMPLIANCE": 78, "GOVERNANCE": 1}


def test_the_production_lock_is_the_one_the_stack_configures() -> None:
    from stacks.config import load_app_config, read_cdk_context

    context = {**read_cdk_context(Path(__file__).parents[2]), "env": "prod"}
    (prod,) = load_app_config(context).environments
    audit = prod.audit
    policy = required_lock("prod")
    assert policy is not None
    assert (str(audit.lock_mode), audit.retention_days) == (policy.mode, policy.days)


# -- odd checkpoints -------------------------------------------------------------------------


def test_a_checkpoint_with_malformed_abandoned_attempts_is_named_not_a_crash() -> None:
    trail = quiet_trail()
    key = trail.store.keys(f"checkpoints/{WRITER}/")[12]
    body = json.loads(trail.store.objects[key].data)
    body["abandoned"] = [{"sha256": "00"}]
    trail.store.put(key, json.dumps(body).encode())
    report = report_now(trail, Period.day(DAY))
    assert report["verification"]["verified"] is False
    assert report["verification"]["problem"] == (
        f"{key}: not a checkpoint (a UTC at, named objects, a last_seq)"
    )


def test_a_production_lock_problem_reaches_the_summary_the_page_and_the_rows() -> None:
    trail = quiet_trail()
    key = trail.store.keys(f"audit/{WRITER}/2026/12/02/")[7]
    trail.store.put(key, trail.store.objects[key].data, lock_mode="GOVERNANCE")
    _, reports, topic, metrics = reporter(trail)
    run = ComplianceReporter(
        environment="prod",
        writers=[WRITER],
        trail=trail.store,
        keys=Keyring([trail.signer]),
        reports=reports,
        topic=topic,
        metrics=metrics,
        clock=lambda: NOW,
    )
    summary = run.run(Period.day(DAY))
    assert (summary["verified"], summary["noncompliant_objects"]) == (False, 1)
    assert summary["problem"] == f"{key}: Object Lock GOVERNANCE, COMPLIANCE required"
    assert topic.published[0][0].endswith("NOT VERIFIED")
    assert metrics.totals["TrailNotVerified"] == 1
    files = {name.rsplit(".", 1)[-1]: data.decode() for name, (data, _) in reports.files.items()}
    assert "object_lock,noncompliant,1" in files["csv"]
    assert (
        "Objects not locked as this environment requires (COMPLIANCE, 2,555 days)"
        in (files["html"])
    )
    assert f"NOT VERIFIED: {key}: Object Lock GOVERNANCE" in files["html"]


# -- the figures, record by record -----------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_the_figures_equal_those_that_held_every_message_whatever_the_order(seed: int) -> None:
    """Random records in random order: deliveries before and after their acceptance, from other
    groups, twice; acceptances twice (the same priority), naming no groups, before, in and after
    the period; fallbacks and drains; records with no message id."""
    rng = random.Random(seed)  # noqa: S311 (test data, not secrets)
    groups = ["media", "academic", "government", ""]
    moments = [at(-1, 30), at(0), at(0, 0.5), at(6), at(23, 59), at(24), at(24, 30)]
    records: list[dict[str, Any]] = []
    for n in range(rng.randint(5, 60)):
        message_id = f"m{n % 23}"
        emergency = n % 23 % 3 == 0
        when = format_timestamp(rng.choice(moments) + timedelta(seconds=rng.randint(0, 59)))
        kind = rng.choice(["accepted", "accepted", "delivered", "delivered", "fallback", "drained"])
        record: dict[str, Any] = {"event": kind, "message_id": message_id, "at": when}
        if kind == "accepted":
            record.update(
                groups=rng.sample(groups[:3], rng.randint(0, 3)),
                transport=rng.choice(["rabbitmq", "sns"]),
                priority=EMERGENCY if emergency else "normal",
            )
        elif kind == "delivered":
            group = rng.choice(groups)
            record.update(groups=[group] if group else [], queues=[f"fabric.{group or 'x'}"])
        else:
            record.update(groups=rng.sample(groups[:3], rng.randint(0, 2)))
        if rng.random() < 0.05:
            del record["message_id"]
        records.append(record)
        if rng.random() < 0.3:
            records.append(dict(record))
    rng.shuffle(records)
    before, now = _BeforeFigures(*Period.day(DAY).bounds), Figures(*Period.day(DAY).bounds)
    for record in records:
        before.add(record)
        now.add(record)
    assert now.copies() == before.copies()
    assert now.latency() == before.latency()
    assert now.not_drained() == before.not_drained()
    assert (now.events, now.transports) == (before.events, before.transports)
