"""The compliance report run on in-memory stand-ins: which period a request names, what of the
trail a period reads (its days, not the years before), what it finds, and what it writes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from fabric.adapters.compliance_memory import (
    MemoryReportStore,
    MemorySigner,
    MemorySummaryTopic,
    MemoryTrailStore,
)
from fabric.adapters.memory import MemoryMetrics
from fabric.audit import AuditBatch
from fabric.audit_chain import Keyring, canonical
from fabric.audit_writer import AuditWriter, ChainState
from fabric.compliance_run import (
    ComplianceReporter,
    InvalidReportRequest,
    Period,
    StoredObject,
    load_window,
    report_keys,
    requested_period,
)
from fabric.envelope import format_timestamp

WRITER = "fabric-test-audit-writer"
DAY = date(2026, 12, 2)
NOW = datetime(2026, 12, 5, 2, 30, tzinfo=UTC)


class MemoryChains:
    """The audit writer's chain store, in memory (``fabric.audit_writer.ChainStore``)."""

    def __init__(self) -> None:
        self.states: dict[str, ChainState] = {}
        self.marks: set[str] = set()
        self.failures = 0  # state updates after a stored object that fail (a timeout)

    def load(self, writer: str) -> ChainState:
        return self.load_from(self.states.get(writer, ChainState()))

    def save(self, writer: str, state: ChainState, *, batch_ids: Sequence[str]) -> bool:
        if batch_ids and self.failures:
            self.failures -= 1
            raise TimeoutError("the state update after the object was stored")
        if self.states.get(writer, ChainState()).version != state.version:
            return False
        state.version += 1
        self.states[writer] = self.load_from(state)
        self.marks.update(batch_ids)
        return True

    @staticmethod
    def load_from(state: ChainState) -> ChainState:
        return dataclasses.replace(
            state, pending=list(state.pending), abandoned=list(state.abandoned)
        )

    def written(self, batch_ids: Sequence[str]) -> set[str]:
        return {b for b in batch_ids if b in self.marks}


class CountingStore(MemoryTrailStore):
    """Remembers which keys were read and which prefixes listed."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.listed: list[str] = []

    def read(self, key: str) -> StoredObject | None:
        self.reads.append(key)
        return super().read(key)

    def keys(self, prefix: str) -> list[str]:
        self.listed.append(prefix)
        return super().keys(prefix)


def accepted_and_routed(message_id: str, **fields: Any) -> tuple[dict[str, Any], ...]:
    """What the router records for a message RabbitMQ stored (one audit batch)."""
    return (
        {
            "event": "accepted",
            "message_id": message_id,
            "transport": "rabbitmq",
            "groups": ["media"],
            **fields,
        },
        {"event": "routed", "message_id": message_id, "queues": ["fabric.media"], **fields},
    )


class Trail:
    """A writer's trail written by the real AuditWriter, with a clock the test moves (another
    writer's trail can share the bucket and the signing key of ``beside``)."""

    def __init__(self, name: str = WRITER, *, beside: Trail | None = None) -> None:
        self.store: CountingStore = CountingStore() if beside is None else beside.store
        self.signer: MemorySigner = MemorySigner() if beside is None else beside.signer
        self.clock = datetime(2026, 12, 1, tzinfo=UTC)
        self.chains = MemoryChains()
        self.writer = AuditWriter(
            name,
            chains=self.chains,
            objects=self.store,
            signer=self.signer,
            now=lambda: self.clock,
        )
        self.batches = 0

    def write(self, at: datetime, *records: dict[str, Any]) -> str:
        """Records written at ``at`` (the writer's clock), each with ``at`` unless it has one."""
        self.clock = at
        self.batches += 1
        stamped = [{"at": format_timestamp(at), **r} for r in records]
        written = self.writer.write([(f"b{self.batches}", AuditBatch(stamped))])
        assert written.key is not None
        return written.key

    def checkpoint(self, at: datetime) -> str:
        self.clock = at
        return self.writer.checkpoint()

    def hours(self, first: datetime, count: int, per_hour: int = 2) -> None:
        """``count`` hours of traffic from ``first``, sealed at the top of every hour."""
        for hour in range(count):
            start = first + timedelta(hours=hour)
            for n in range(per_hour):
                at = start + timedelta(minutes=10 + 20 * n)
                message = f"m-{at:%d%H%M}"
                self.write(at, *accepted_and_routed(message))
            self.checkpoint(start + timedelta(hours=1))


def reporter(
    trail: Trail, now: datetime = NOW, **options: Any
) -> tuple[ComplianceReporter, Any, Any, Any]:
    reports, topic, metrics = MemoryReportStore("reports"), MemorySummaryTopic(), MemoryMetrics()
    return (
        ComplianceReporter(
            environment="test",
            writers=[WRITER],
            trail=trail.store,
            keys=Keyring([trail.signer]),
            reports=reports,
            topic=topic,
            metrics=metrics,
            clock=lambda: now,
            **options,
        ),
        reports,
        topic,
        metrics,
    )


@pytest.fixture
def trail() -> Trail:
    """Three days (Dec 1-3) of two messages an hour, sealed hourly."""
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 72)
    return trail


# -- which period ------------------------------------------------------------------------------


def test_the_schedule_reports_the_utc_day_before_its_event() -> None:
    event = {
        "source": "aws.events",
        "detail-type": "Scheduled Event",
        "time": "2026-12-04T02:30:00Z",
        "detail": {},
    }
    period = requested_period(event, now=NOW)
    assert period == Period.day(date(2026, 12, 3))
    assert period.bounds == ("2026-12-03T00:00:00Z", "2026-12-04T00:00:00Z")
    assert period.label == "2026-12-03"


def test_on_demand_a_date_or_a_range() -> None:
    assert requested_period({"date": "2026-12-01"}, now=NOW) == Period.day(date(2026, 12, 1))
    period = requested_period(
        {"start": "2026-12-01T08:00:00+07:00", "end": "2026-12-01T12:00:00Z"}, now=NOW
    )
    assert period.bounds == ("2026-12-01T01:00:00Z", "2026-12-01T12:00:00Z")
    assert period.label == "20261201T010000Z--20261201T120000Z"


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ("2026-12-01", "must be a JSON object"),
        ({}, 'give {"date": "YYYY-MM-DD"} or {"start": ..., "end": ...}'),
        ({"date": "2026-12-01", "start": "x"}, "got the fields ['date', 'start']"),
        ({"date": "20261201"}, "date must be YYYY-MM-DD"),
        ({"date": "2026-02-30"}, "is not a calendar date"),
        ({"start": "2026-12-01T00:00:00", "end": "2026-12-02T00:00:00Z"}, "needs a time zone"),
        ({"start": "yesterday", "end": "2026-12-02T00:00:00Z"}, "not an RFC 3339 timestamp"),
        ({"start": 1, "end": "2026-12-02T00:00:00Z"}, "start must be an RFC 3339 timestamp"),
        ({"start": "2026-12-02T00:00:00Z", "end": "2026-12-01T00:00:00Z"}, "before end"),
        ({"start": "2026-10-01T00:00:00Z", "end": "2026-12-01T00:00:00Z"}, "at most 31 days"),
        ({"date": "2026-12-06"}, "starts in the future"),
    ],
)
def test_a_bad_request_is_refused_with_its_reason(event: Any, reason: str) -> None:
    with pytest.raises(InvalidReportRequest) as refused:
        requested_period(event, now=NOW)
    assert reason in str(refused.value)


# -- what a period reads -----------------------------------------------------------------------


def test_a_day_reads_its_own_objects_and_the_checkpoints_around_it(trail: Trail) -> None:
    window = load_window(trail.store, WRITER, Period.day(DAY))
    assert window.problem is None
    # Dec 2 whole, and the hour on each side: the objects sealed by the checkpoints of 00:00
    # Dec 2 to 01:00 Dec 3 (the day's end plus the hour a late record may take).
    by_day = [key.split("/")[4] for key in window.objects]
    assert (by_day.count("01"), by_day.count("02"), by_day.count("03")) == (2, 48, 2)
    assert window.anchor is not None
    assert window.anchor[1]["at"] == "2026-12-01T23:00:00Z"
    assert [body["at"] for _, body in window.checkpoints][::25] == [
        "2026-12-02T00:00:00Z",
        "2026-12-03T01:00:00Z",
    ]
    # Nothing else of the trail was read: no object of Dec 1 before 23:00 or of Dec 3 after
    # 01:00, and a few checkpoints for the search (log2 of 72 twice) besides the 27 needed.
    audit = [k for k in trail.store.reads if k.startswith("audit/")]
    assert sorted(audit) == sorted(window.objects)
    checkpoints = set(trail.store.reads) - set(audit)
    assert 27 <= len(checkpoints) <= 27 + 14


def test_an_untouched_day_verifies_and_counts_only_its_records(trail: Trail) -> None:
    run, reports, _, _ = reporter(trail)
    report = run.report(Period.day(DAY))
    assert report["verification"]["verified"] is True
    assert report["outcomes"] == {"accepted": 48, "routed": 48}
    (writer,) = report["verification"]["writers"]
    assert (writer["checkpoints"], writer["objects"], writer["unsealed_objects"]) == (26, 52, 0)
    # Every object read is locked, and the checkpoints too.
    assert report["object_lock"]["objects"] == 52 + 27
    assert report["object_lock"]["unlocked"] == []
    assert reports.files == {}, "report() writes nothing"


def test_a_record_that_reached_the_writer_after_midnight_counts_in_its_own_day() -> None:
    trail = Trail()
    trail.hours(datetime(2026, 12, 2, 22, tzinfo=UTC), 2)  # 22:00-24:00, sealed at 23 and 24
    late = trail.write(
        datetime(2026, 12, 3, 0, 0, 2, tzinfo=UTC),
        *accepted_and_routed("late", at="2026-12-02T23:59:59.95Z"),
    )
    assert "/2026/12/03/" in late
    trail.checkpoint(datetime(2026, 12, 3, 1, tzinfo=UTC))
    report = reporter(trail)[0].report(Period.day(DAY))
    assert report["verification"]["verified"] is True
    assert report["outcomes"]["accepted"] == 5


def test_a_changed_record_in_the_day_fails_and_is_named(trail: Trail) -> None:
    key = trail.store.keys(f"audit/{WRITER}/2026/12/02/")[5]
    stored = trail.store.objects[key]
    lines = stored.data.splitlines()
    changed = json.loads(lines[1])
    changed["transport"] = "sns"
    lines[1] = canonical(changed)
    trail.store.put(key, b"\n".join(lines) + b"\n")
    report = reporter(trail)[0].report(Period.day(DAY))
    verification = report["verification"]
    assert verification["verified"] is False
    assert verification["problem"] == f"{key}: its SHA-256 differs from the checkpoint's"


def test_a_deleted_checkpoint_in_the_day_fails_and_is_named(trail: Trail) -> None:
    keys = trail.store.keys(f"checkpoints/{WRITER}/")
    gone = keys[24 + 10]  # sealing 10:00 on Dec 2
    del trail.store.objects[gone]
    problem = reporter(trail)[0].report(Period.day(DAY))["verification"]["problem"]
    assert problem == f"{keys[24 + 11]}: checkpoint 36, expected 35"


@pytest.mark.parametrize(
    "name",
    [
        "000000000100-000000000100.jsonl",  # a sequence number inside the day's sealed range
        "000000000999-000000000999.jsonl",  # one beyond it, dated a day that is sealed
        "000000000001-000000000001.jsonl",  # one the days before sealed, dated this day
    ],
)
def test_an_object_no_checkpoint_names_fails_and_is_named(trail: Trail, name: str) -> None:
    forged = f"audit/{WRITER}/2026/12/02/{name}"
    trail.store.put(forged, b'{"event":"accepted"}\n')
    problem = reporter(trail)[0].report(Period.day(DAY))["verification"]["problem"]
    assert problem == f"{forged}: an object no checkpoint names, among sealed ones"


def test_a_write_the_writer_abandoned_is_named_and_the_day_still_verifies() -> None:
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 24)
    trail.chains.failures = 1
    at = datetime(2026, 12, 2, 0, 10, tzinfo=UTC)
    with pytest.raises(TimeoutError):
        trail.write(at, *accepted_and_routed("m-lost-attempt"))
    trail.write(at, *accepted_and_routed("m-lost-attempt"), *accepted_and_routed("m-other"))
    trail.hours(datetime(2026, 12, 2, 1, tzinfo=UTC), 47)

    report = reporter(trail)[0].report(Period.day(DAY))
    assert report["verification"]["problem"] is None
    # The abandoned attempt's records are read for its hash, and counted only where chained:
    # 23 hours of two messages, and the two of the retried write.
    assert report["outcomes"]["accepted"] == 48
    assert report["copies"]["addressed"] == 48

    # A new version of the abandoned object is not the attempt the checkpoint named.
    (abandoned,) = [
        item["key"]
        for key in trail.store.keys(f"checkpoints/{WRITER}/")
        for item in json.loads(trail.store.read(key).data).get("abandoned", [])  # type: ignore[union-attr]
    ]
    trail.store.put(abandoned, b'{"forged":true}\n')
    problem = reporter(trail)[0].report(Period.day(DAY))["verification"]["problem"]
    assert problem == f"{abandoned}: an abandoned attempt whose SHA-256 differs"


def test_a_stray_key_in_the_trail_fails_and_is_named(trail: Trail) -> None:
    stray = f"audit/{WRITER}/2026/12/02/notes.txt"
    trail.store.put(stray, b"hello")
    problem = reporter(trail)[0].report(Period.day(DAY))["verification"]["problem"]
    assert problem == f"{stray}: not an audit object key"


def test_a_checkpoint_that_is_not_one_fails_and_is_named(trail: Trail) -> None:
    key = trail.store.keys(f"checkpoints/{WRITER}/")[36]
    trail.store.put(key, b"[]")
    problem = reporter(trail)[0].report(Period.day(DAY))["verification"]["problem"]
    assert problem == f"{key}: not a checkpoint (a UTC at, named objects, a last_seq)"


def test_today_so_far_is_verified_by_its_chain_and_counted_as_not_yet_sealed() -> None:
    trail = Trail()
    trail.hours(datetime(2026, 12, 4, tzinfo=UTC), 2)
    trail.write(datetime(2026, 12, 4, 2, 5, tzinfo=UTC), *accepted_and_routed("x"))
    now = datetime(2026, 12, 4, 2, 10, tzinfo=UTC)
    report = reporter(trail, now)[0].report(Period.day(date(2026, 12, 4)))
    (writer,) = report["verification"]["writers"]
    assert report["verification"]["verified"] is True
    assert (writer["unsealed_objects"], writer["records"]) == (1, 10)


def test_a_young_trail_without_a_checkpoint_is_read_whole_and_verifies() -> None:
    trail = Trail()
    trail.write(datetime(2026, 12, 2, 9, tzinfo=UTC), *accepted_and_routed("x"))
    report = reporter(trail, datetime(2026, 12, 2, 9, 30, tzinfo=UTC))[0].report(Period.day(DAY))
    assert report["verification"]["verified"] is True
    assert report["outcomes"] == {"accepted": 1, "routed": 1}


def test_a_quiet_day_is_proven_quiet_by_its_checkpoints() -> None:
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, 23, tzinfo=UTC), 1)
    for hour in range(1, 27):
        trail.checkpoint(datetime(2026, 12, 2, tzinfo=UTC) + timedelta(hours=hour))
    report = reporter(trail)[0].report(Period.day(DAY))
    (writer,) = report["verification"]["writers"]
    assert report["verification"]["verified"] is True
    assert report["outcomes"] == {}
    assert writer["checkpoints"] == 26


def test_an_unlocked_object_is_named_in_the_report(trail: Trail) -> None:
    key = trail.store.keys(f"audit/{WRITER}/2026/12/02/")[3]
    trail.store.put(key, trail.store.objects[key].data, lock_mode=None, retain_until=None)
    report = reporter(trail)[0].report(Period.day(DAY))
    assert report["object_lock"]["unlocked"] == [key]
    assert report["verification"]["verified"] is True


# -- what a run writes -------------------------------------------------------------------------


def test_a_run_writes_three_files_then_publishes_a_summary_without_content(trail: Trail) -> None:
    run, reports, topic, metrics = reporter(trail)
    summary = run.run(Period.day(DAY))
    keys = report_keys("test", Period.day(DAY))
    assert keys.json == "compliance/test/2026/12/02/2026-12-02.json"
    assert {k: t for k, (_, t) in reports.files.items()} == {
        keys.json: "application/json",
        keys.html: "text/html; charset=utf-8",
        keys.csv: "text/csv; charset=utf-8",
    }
    document = json.loads(reports.files[keys.json][0])
    assert document["version"] == "fabric.compliance-report/2"
    assert b"<svg" in reports.files[keys.html][0]
    ((subject, message, attributes),) = topic.published
    assert subject == "Messaging Fabric test compliance 2026-12-02: verified"
    assert attributes == {"verified": "true", "environment": "test"}
    assert json.loads(message) == summary
    assert summary["verified"] is True
    assert (summary["accepted"], summary["records"]) == (48, 96)
    assert summary["report"] == {
        "bucket": "reports",
        "json": keys.json,
        "html": keys.html,
        "csv": keys.csv,
    }
    assert "m-02" not in message, "no message ids in the summary"
    assert (summary["emergencies_accepted"], summary["emergency_copies_undelivered"]) == (0, 0)
    assert (summary["acceptance_rate"], summary["delivery_success_rate"]) == (1.0, 0.0)
    assert summary["copies_undelivered"] == 48  # nobody consumed them in this trail
    assert metrics.totals == {"ComplianceReports": 1, "TrailNotVerified": 0}


def test_a_run_on_a_damaged_trail_still_reports_and_says_not_verified(trail: Trail) -> None:
    key = trail.store.keys(f"checkpoints/{WRITER}/")[40]
    del trail.store.objects[key]
    run, reports, topic, metrics = reporter(trail)
    summary = run.run(Period.day(DAY))
    assert summary["verified"] is False
    assert summary["problem"].startswith(trail.store.keys(f"checkpoints/{WRITER}/")[40])
    (subject, _, attributes) = topic.published[0]
    assert subject.endswith("NOT VERIFIED")
    assert attributes["verified"] == "false"
    assert len(reports.files) == 3
    assert metrics.totals["TrailNotVerified"] == 1
