"""Replay's search of the archive for a body not beside its record, within the run's time.

A body is archived beside the record that names it; one that was not (``archived: false``, too
big for its audit message) or whose object is lost is looked for in the period's other archive
objects. That search reads objects one by one: on a busy period more than the function may run.
Here each archive object read costs 50 ms on the run's clock (an S3 GET of a few hundred KB).
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from fabric.envelope import format_timestamp
from tests.unit.test_replay import DAY, Clock, Trail, donation, replayer, request

READ_SECONDS = 0.05
OTHERS = 400  # other writer calls of the day, one archive object each: 20 s to read them all


def busy_day(trail: Trail, *, first: int) -> None:
    """Ordinary traffic after 01:00: one writer call (one archive object) a message, sealed by
    a checkpoint every 100 calls."""
    for n in range(first, first + OTHERS):
        at = DAY + timedelta(hours=1, seconds=60 * (n - first))
        trail.route([donation(n)], source="community", at=at, seal=(n - first) % 100 == 99)
    trail.seal(DAY + timedelta(hours=23, minutes=59))


def slow_archive(trail: Trail, clock: Clock) -> list[str]:
    """Every read of an archive object takes READ_SECONDS on ``clock``; the keys read."""
    plain = trail.archive.read
    read: list[str] = []

    def read_slowly(key: str) -> bytes | None:
        if key.startswith("archive/"):
            read.append(key)
            clock.now += READ_SECONDS
        return plain(key)

    trail.archive.read = read_slowly  # type: ignore[method-assign]
    return read


def accepted_by_broker_not_archived(trail: Trail, n: int, at: Any) -> None:
    """Message ``n`` as the router records it on the broker path when its body is too big for
    the audit message: ``transport`` rabbitmq, ``archived: false``, no body archived."""
    records = [
        record.to_dict()
        for record in trail.recorded([donation(n)], source="community", at=at).records
    ]
    for record in records:
        record["transport"] = "rabbitmq"
        if record["event"] == "accepted":
            record["archived"] = False
    trail.write(records, {}, at)
    trail.seal(at)


def test_a_body_the_broker_path_did_not_archive_is_missing_without_reading_the_archive() -> None:
    trail = Trail()
    accepted_by_broker_not_archived(trail, 0, DAY + timedelta(minutes=1))
    busy_day(trail, first=1)
    for dry_run in (False, True):
        clock = Clock()
        read = slow_archive(trail, clock)
        run, broker, _ = replayer(trail, clock=clock)
        report = run.run(request(max_messages=5, max_seconds=10.0, dry_run=dry_run))

        # Nothing but the archive objects beside the five records is read: no archive object
        # can hold a body the broker took that was too big for its audit message.
        assert len(read) == 5, dry_run
        assert (report.missing_body, report.stopped) == (1, "message limit")
        assert report.replayed + report.would_replay == 4
        (problem,) = report.problems
        assert (problem.message_id, problem.outcome) == (str(uuid.UUID(int=1)), "missing-body")
        assert problem.detail == "not archived (its record says archived: false)"
        assert len(broker.published) == (0 if dry_run else 4)


def test_a_search_that_outlasts_the_time_limit_stops_before_its_message_and_resumes_there() -> None:
    # Message 3 was accepted on the fallback path without its body (too big for the audit
    # message); the drain archived the same bytes the next day, so its search reads the whole
    # day's archive first: 20 s, more than the run's 10.
    trail = Trail()
    for n in (0, 1):
        trail.route([donation(n)], source="community", at=DAY + timedelta(minutes=n))
    records = trail.route(
        [donation(2)], source="community", at=DAY + timedelta(minutes=2), archive=False
    )
    accepted = next(r for r in records if r["event"] == "accepted")
    busy_day(trail, first=3)
    drained_at = DAY + timedelta(days=1, hours=1)
    sink = trail.recorded([donation(2)], source="community", at=DAY + timedelta(minutes=2))
    drained = {
        "event": "drained",
        "at": format_timestamp(drained_at),
        "message_id": accepted["message_id"],
        "source": "drain",
        "body_sha256": accepted["body_sha256"],
    }
    trail.write([drained], sink.bodies, drained_at)
    trail.seal(drained_at + timedelta(minutes=5))

    clock = Clock()
    slow_archive(trail, clock)
    run, broker, audit = replayer(trail, clock=clock)
    first = run.run(request(max_messages=10, max_seconds=10.0))

    # Stopped on its time limit, not killed past it: the two messages before the search are
    # replayed and audited, and the cursor stands before the one whose body was not found yet.
    assert first.stopped == "time limit"
    assert clock.now <= 10.0 + READ_SECONDS
    assert first.replayed == 2
    assert [m.message_id for m in broker.published] == [str(uuid.UUID(int=n)) for n in (1, 2)]
    assert len(audit.records) == 2
    assert first.cursor is not None
    assert first.cursor.message_id == str(uuid.UUID(int=2))
    assert first.remaining == first.pending - 2

    # A run with time enough goes on from the cursor: the message is found and replayed, and
    # nothing of the first run is published again.
    resumed = run.run(request(max_messages=2, after=first.cursor))
    assert (resumed.replayed, resumed.missing_body) == (2, 0)
    assert [m.message_id for m in broker.published] == [str(uuid.UUID(int=n)) for n in (1, 2, 3, 4)]
