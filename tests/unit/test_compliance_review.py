"""Compliance report review: records a consumer may write (a leap second, lowercase RFC 3339)
are counted and never stop the report, a past period that no checkpoint seals is not reported
verified (unless its writer stopped, having sealed all it wrote, while another seals it), and a
request for a date the calendar cannot hold is refused with a reason."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from fabric.adapters.compliance_memory import MemoryReportStore, MemorySummaryTopic
from fabric.audit_chain import Keyring
from fabric.compliance_run import (
    ComplianceReporter,
    InvalidReportRequest,
    Period,
    requested_period,
)
from tests.unit.test_compliance_run import NOW, WRITER, Trail, accepted_and_routed, reporter

NEW_YEAR = Period.day(date(2026, 12, 31))


def emergency_delivered_at(delivered: str) -> dict[str, Any]:
    """The report of Dec 31 (sealed the next hour) where media's consumer recorded the delivery
    of an emergency accepted a moment before, stamped ``delivered``."""
    trail = Trail()
    trail.hours(datetime(2026, 12, 30, 23, tzinfo=UTC), 1)
    accepted = datetime(2026, 12, 31, 23, 59, 59, 900000, tzinfo=UTC)
    trail.write(accepted, *accepted_and_routed("sos", priority="emergency"))
    trail.write(
        accepted + timedelta(seconds=1),
        {"event": "delivered", "at": delivered, "message_id": "sos", "groups": ["media"]},
    )
    trail.checkpoint(datetime(2027, 1, 1, 2, tzinfo=UTC))
    run = reporter(trail)[0]
    return run.report(NEW_YEAR)


def test_a_delivery_stamped_in_a_leap_second_is_counted_and_does_not_stop_the_report() -> None:
    # The audit writer takes 23:59:60Z from a consumer (RFC 3339 section 5.7): one such record
    # must not stop a whole day's report.
    report = emergency_delivered_at("2026-12-31T23:59:60.2Z")
    latency = report["emergency_latency_ms"]
    assert report["verification"]["verified"] is True
    assert (report["copies"]["delivered"], latency["undelivered_copies"]) == (1, 0)
    assert latency["max"] == 99.999  # to 23:59:59.999999, the leap second as Python holds it


def test_a_delivery_stamped_in_lowercase_rfc_3339_is_counted() -> None:
    report = emergency_delivered_at("2026-12-31t23:59:59.95z")
    latency = report["emergency_latency_ms"]
    assert (report["copies"]["delivered"], report["copies"]["undelivered"]) == (1, 0)
    assert (latency["count"], latency["max"]) == (1, 50.0)


def sealed_until(last_checkpoint: datetime) -> Trail:
    """Dec 2 and 3 of traffic, two messages an hour, with hourly checkpoints up to
    ``last_checkpoint``; what was written after it is not sealed."""
    trail = Trail()
    start = datetime(2026, 12, 2, tzinfo=UTC)
    for hour in range(48):
        at = start + timedelta(hours=hour)
        for minute in (10, 40):
            trail.write(at + timedelta(minutes=minute), *accepted_and_routed(f"m-{hour}-{minute}"))
        if at + timedelta(hours=1) <= last_checkpoint:
            trail.checkpoint(at + timedelta(hours=1))
    return trail


def test_a_past_day_whose_checkpoints_stopped_before_its_end_is_not_verified() -> None:
    # The writer's hourly checkpoint stopped at 12:00 on Dec 2; the report of Dec 2 runs on
    # Dec 5. Half of the day is protected by the unkeyed hash chain only.
    trail = sealed_until(datetime(2026, 12, 2, 12, tzinfo=UTC))
    run, _, topic, metrics = reporter(trail)
    summary = run.run(Period.day(date(2026, 12, 2)))
    assert summary["verified"] is False
    last = trail.store.keys("checkpoints/")[-1]
    assert summary["problem"] == (
        f"{last}: the last checkpoint (2026-12-02T12:00:00Z); none at or after"
        " 2026-12-03T01:00:00Z seals the period"
    )
    assert topic.published[0][0].endswith("NOT VERIFIED")
    assert metrics.totals["TrailNotVerified"] == 1


def test_a_trail_that_never_had_a_checkpoint_does_not_verify_a_past_day() -> None:
    trail = Trail()
    trail.write(datetime(2026, 12, 2, 9, tzinfo=UTC), *accepted_and_routed("x"))
    report = reporter(trail)[0].report(Period.day(date(2026, 12, 2)))
    assert report["verification"]["problem"] == (
        "checkpoints/fabric-test-audit-writer/: no checkpoint at or after"
        " 2026-12-03T01:00:00Z seals the period"
    )


@pytest.mark.parametrize(
    ("now", "verified"),
    [
        # The day's end, the hour a record may take, the hour until the hourly checkpoint and a
        # quarter hour for it to run: until then the last hours are counted as not yet sealed.
        (datetime(2026, 12, 4, 2, 14, tzinfo=UTC), True),
        (datetime(2026, 12, 4, 2, 15, tzinfo=UTC), False),
    ],
)
def test_a_period_whose_closing_checkpoint_is_not_due_yet_verifies_by_its_chain(
    now: datetime, verified: bool
) -> None:
    trail = sealed_until(datetime(2026, 12, 3, 23, tzinfo=UTC))
    run = ComplianceReporter(
        environment="test",
        writers=[WRITER],
        trail=trail.store,
        keys=Keyring([trail.signer]),
        reports=MemoryReportStore(),
        topic=MemorySummaryTopic(),
        clock=lambda: now,
    )
    report = run.report(Period.day(date(2026, 12, 3)))
    (writer,) = report["verification"]["writers"]
    assert writer["unsealed_objects"] == 2
    assert report["outcomes"] == {"accepted": 48, "routed": 48}
    assert report["verification"]["verified"] is verified


RETIRED = "fabric-test-audit-writer-old"


def renamed_on_dec_1() -> tuple[Trail, Trail]:
    """Writer "old" wrote and sealed hourly until Dec 1 12:00, nothing after; its successor
    writes from then on, sealed hourly until Dec 5 02:00 (``NOW`` is 02:30)."""
    old = Trail(RETIRED)
    old.hours(datetime(2026, 12, 1, tzinfo=UTC), 12)
    new = Trail(beside=old)
    new.hours(datetime(2026, 12, 1, 12, tzinfo=UTC), 24 * 3 + 14)
    return old, new


def both_writers(trail: Trail) -> ComplianceReporter:
    """The report of the old and the new writer (both stay configured: the old one's days)."""
    return ComplianceReporter(
        environment="test",
        writers=[WRITER, RETIRED],
        trail=trail.store,
        keys=Keyring([trail.signer]),
        reports=MemoryReportStore(),
        topic=MemorySummaryTopic(),
        clock=lambda: NOW,
    )


def test_a_writer_that_stopped_having_sealed_all_it_wrote_needs_no_later_seal() -> None:
    # After a writer rename both writers stay in AUDIT_WRITERS. The old one's last checkpoint
    # sealed everything it wrote: the day it stopped and every later day verify (before, every
    # later report paged NOT VERIFIED for good), and a day long after it stopped lists only
    # that day's folders of it, not one folder per day since.
    _, new = renamed_on_dec_1()
    run = both_writers(new)

    reports = {day: run.report(Period.day(date(2026, 12, day))) for day in (1, 2)}
    new.store.listed.clear()
    reports[4] = run.report(Period.day(date(2026, 12, 4)))

    assert {day: r["verification"]["problem"] for day, r in reports.items()} == {
        1: None,
        2: None,
        4: None,
    }
    assert reports[1]["outcomes"] == {"accepted": 48, "routed": 48}  # both writers' halves
    assert [p for p in new.store.listed if p.startswith(f"audit/{RETIRED}/")] == [
        f"audit/{RETIRED}/2026/12/04/",
        f"audit/{RETIRED}/2026/12/05/",
    ]


def test_a_writer_with_objects_after_its_last_checkpoint_leaves_their_days_not_verified() -> None:
    # The old writer wrote once more after its last checkpoint (it stopped sealing, then
    # stopped): that day is not proved. A later day it wrote nothing on verifies; an object
    # put after its end (only the unkeyed hash chain holds it) makes that day not verified.
    old, new = renamed_on_dec_1()
    old.write(datetime(2026, 12, 1, 12, 30, tzinfo=UTC), *accepted_and_routed("unsealed"))
    run = both_writers(new)
    last = old.store.keys(f"checkpoints/{RETIRED}/")[-1]

    dec1 = run.report(Period.day(date(2026, 12, 1)))
    assert dec1["verification"]["problem"] == (
        f"{last}: the last checkpoint (2026-12-01T12:00:00Z); none at or after"
        " 2026-12-02T01:00:00Z seals the period"
    )
    assert run.report(Period.day(date(2026, 12, 3)))["verification"]["verified"] is True

    old.write(datetime(2026, 12, 3, 9, tzinfo=UTC), *accepted_and_routed("put-later"))
    dec3 = run.report(Period.day(date(2026, 12, 3)))
    assert dec3["verification"]["verified"] is False
    assert dec3["verification"]["problem"].startswith(f"{last}: the last checkpoint")


def test_a_past_day_no_writer_seals_is_not_verified_even_if_nothing_was_written_after() -> None:
    # The only writer sealed all it wrote and then stopped altogether (its function failed, so
    # did its checkpoints): the day after is not proved quiet, nothing seals it.
    quiet = Trail()
    quiet.hours(datetime(2026, 12, 2, tzinfo=UTC), 12)
    report = reporter(quiet)[0].report(Period.day(date(2026, 12, 3)))
    last = quiet.store.keys("checkpoints/")[-1]
    assert report["verification"]["problem"] == (
        f"{last}: the last checkpoint (2026-12-02T12:00:00Z); none at or after"
        " 2026-12-04T01:00:00Z seals the period"
    )


def test_a_day_sealed_by_the_checkpoint_after_its_margin_verifies() -> None:
    trail = sealed_until(datetime(2026, 12, 3, 2, tzinfo=UTC))
    report = reporter(trail)[0].report(Period.day(date(2026, 12, 2)))
    assert report["verification"]["verified"] is True
    assert datetime(2026, 12, 3, 2, 15, tzinfo=UTC) < NOW  # the seal was due: it is there


@pytest.mark.parametrize(
    "event",
    [
        {"date": "9999-12-31"},
        {"start": "0001-01-01T00:00:00+01:00", "end": "2026-01-01T00:00:00Z"},
        {"start": "9999-12-31T00:00:00Z", "end": "9999-12-31T23:59:59-01:00"},
        {"source": "aws.events", "detail-type": "Scheduled Event", "time": "0001-01-01T00:00Z"},
    ],
)
def test_a_date_the_calendar_cannot_hold_is_refused_with_a_reason(event: dict[str, Any]) -> None:
    with pytest.raises(InvalidReportRequest, match="out of range"):
        requested_period(event, now=NOW)
