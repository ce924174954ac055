"""A compliance report whose period takes longer to read than the function may run: it stops in
time and says the period must be split, instead of being ended by Lambda with nothing said (and
run twice more by the schedule's retries).

The function's time runs on a clock the test moves: each audit object read takes 10 s, as if
the period held far more records than these few (a day of a million takes 22 to 67 s)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

from fabric.compliance_run import ANSWER_MARGIN_S, Period, StoredObject
from tests.unit.test_compliance_run import Trail, reporter

FUNCTION_SECONDS = 900.0  # the function's timeout: 15 minutes
READ_SECONDS = 10.0
THREE_DAYS = Period(datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 12, 4, tzinfo=UTC))


class Invocation:
    """The seconds an invocation has used, as the audit objects it read took them."""

    def __init__(self, trail: Trail) -> None:
        self.used = 0.0
        plain = trail.store.read

        def read_slowly(key: str) -> StoredObject | None:
            if key.startswith("audit/"):
                self.used += READ_SECONDS
            return plain(key)

        trail.store.read = read_slowly  # type: ignore[method-assign]

    def time_left(self) -> float:
        return FUNCTION_SECONDS - self.used


def three_days() -> Trail:
    """Dec 1-3, two messages an hour, sealed hourly: 144 audit objects, 1,440 s to read."""
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 72)
    return trail


def test_a_period_too_long_for_the_functions_time_is_not_reported_and_the_topic_is_told() -> None:
    trail = three_days()
    invocation = Invocation(trail)
    run, reports, topic, metrics = reporter(trail)

    answer = run.run(THREE_DAYS, time_left=invocation.time_left)

    # It stopped on its own, with the margin to answer left, not past the function's timeout.
    assert invocation.time_left() >= ANSWER_MARGIN_S - READ_SECONDS
    assert set(answer) == {"error"}
    assert answer["error"].startswith(
        "the period 2026-12-01T00:00:00Z to 2026-12-04T00:00:00Z is too long to read within"
        " the function's time (stopped at the objects of checkpoints/fabric-test-audit-writer/"
    )
    assert answer["error"].endswith(
        "nothing was written: report it in shorter periods (runbook.py report --start/--end)"
    )
    # No report of part of the period is written, or counted as the period's report.
    assert reports.files == {}
    assert "ComplianceReports" not in metrics.totals
    ((subject, message, attributes),) = topic.published
    assert subject == (
        "Messaging Fabric test compliance 20261201T000000Z--20261204T000000Z: NOT REPORTED"
    )
    assert attributes == {"verified": "false", "environment": "test"}
    assert json.loads(message) == {
        "environment": "test",
        "period": {"start": "2026-12-01T00:00:00Z", "end": "2026-12-04T00:00:00Z"},
        "verified": False,
        "reported": False,
        "problem": answer["error"],
    }


def test_a_day_of_the_same_trail_fits_the_time_and_is_reported() -> None:
    trail = three_days()
    invocation = Invocation(trail)
    run, reports, topic, _ = reporter(trail)

    summary = run.run(Period.day(date(2026, 12, 2)), time_left=invocation.time_left)

    assert summary["verified"] is True
    assert summary["accepted"] == 48
    assert len(reports.files) == 3
    assert topic.published[0][0].endswith(": verified")
