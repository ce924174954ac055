"""Compliance report review: records a consumer may write (a leap second, lowercase RFC 3339)
are counted and never stop the report, a past period that no checkpoint seals is not reported
verified, and a request for a date the calendar cannot hold is refused with a reason."""

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
