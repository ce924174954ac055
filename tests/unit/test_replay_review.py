"""Replay review: a period given in a local time zone reads the same trail as in UTC, and a
request for a period no trail can hold is refused with a reason instead of crashing the run."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from fabric.replay import parse_request
from tests.unit.test_replay import DAY, Trail, donation, replayer, request

JAKARTA = timezone(timedelta(hours=7))


def test_a_period_given_in_jakarta_time_finds_the_acceptances_not_yet_sealed() -> None:
    # A young trail: its first checkpoint (23:10Z) comes after the period's start (23:00Z,
    # 06:00 on Dec 2 in Jakarta), so the run lists the audit objects by day from the period's
    # start. The acceptance at 23:40Z is not sealed yet: it must be reported, never skipped.
    trail = Trail()
    trail.route([donation(1)], source="community", at=DAY + timedelta(hours=23, minutes=5))
    trail.seal(DAY + timedelta(hours=23, minutes=10))
    trail.route(
        [donation(2)], source="community", at=DAY + timedelta(hours=23, minutes=40), seal=False
    )
    start = datetime(2026, 12, 2, 6, tzinfo=JAKARTA)
    for tz in (JAKARTA, UTC):
        run, broker, _ = replayer(trail)
        report = run.run(
            request(start=start.astimezone(tz), end=(start + timedelta(hours=1)).astimezone(tz))
        )
        assert (report.selected, report.replayed, report.unsealed) == (2, 1, 1), tz
        assert report.unsealed_objects == 1
        (held,) = report.problems
        assert (held.message_id, held.outcome) == (str(uuid.UUID(int=3)), "unsealed")
        assert [m.message_id for m in broker.published] == [str(uuid.UUID(int=2))]


def test_a_period_given_west_of_utc_reads_the_late_days_in_utc() -> None:
    # The period ends at 20:00 on Dec 1 in New York (01:00Z Dec 2); its last acceptance reached
    # the writer a day later (02:00Z Dec 3, within late_days 1), and is not sealed yet.
    new_york = timezone(timedelta(hours=-5))
    trail = Trail()
    trail.route([donation(1)], source="community", at=DAY + timedelta(hours=20))
    at = DAY + timedelta(hours=24, minutes=59)
    trail.route(
        [donation(2)],
        source="community",
        at=at,
        written=at + timedelta(days=1, hours=1),
        seal=False,
    )
    run, _, _ = replayer(trail)
    report = run.run(
        request(
            start=datetime(2026, 12, 1, 10, tzinfo=new_york),
            end=datetime(2026, 12, 1, 20, tzinfo=new_york),
        )
    )
    assert (report.selected, report.replayed, report.unsealed) == (2, 1, 1)


@pytest.mark.parametrize(
    "start",
    ["9999-12-30T00:00:00Z", "2999-01-01T00:00:00+07:00"],
)
def test_a_period_that_starts_in_the_future_is_refused_with_a_reason(start: str) -> None:
    begin = datetime.fromisoformat(start)
    event = {"start": start, "end": (begin + timedelta(hours=23)).isoformat()}
    with pytest.raises(ValueError, match="starts in the future"):
        parse_request(event, now=datetime(2026, 12, 7, tzinfo=UTC))
