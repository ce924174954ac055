"""Replay's first phase, reading and verifying the period's trail, within the run's time.

A period whose trail takes longer to read than the function may run used to be ended by
Lambda's timeout in the middle of the selection: no report, no cursor, and every retry the
same. The selection now stops once the run's time is up, before the next part of the trail,
with ``stopped: period too long`` (replay shorter periods), as the compliance report stops on
``PeriodTooLong``: nothing replayed, the cursor where the run started.

Here each read of an audit object or a checkpoint costs a second on the run's clock (a large
period's trail); the trails are written by the real router and audit writer into the in-memory
bucket (``tests.unit.test_replay.Trail``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from datetime import timedelta

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryTransport
from fabric.audit_chain import Keyring
from fabric.audit_writer import ARCHIVE_PREFIX
from fabric.replay import ReplayCursor, Replayer
from fabric.routing import default_routing_table
from tests.unit.test_replay import DAY, Clock, MemoryArchive, Trail, donation, request
from tests.unit.test_replay_memory import resent_after_their_replay

HOURS = 24
STEP = 1.0  # seconds of one read of the trail: an interval here is one object


class SlowTrail(MemoryArchive):
    """The bucket, where reading an audit object or a checkpoint takes ``STEP`` seconds of
    ``clock`` (``slower`` seconds once ``slower_after`` of them were read); archive objects
    (the bodies) cost nothing."""

    def __init__(
        self,
        archive: MemoryArchive,
        clock: Clock,
        *,
        slower_after: int | None = None,
        slower: float = STEP,
    ) -> None:
        super().__init__(objects=archive.objects, delete_markers=archive.delete_markers)
        self.clock = clock
        self.trail_reads = 0
        self._slower_after = slower_after
        self._slower = slower
        self._lock = threading.Lock()  # the trail is read 16 objects at a time

    def read(self, key: str) -> bytes | None:
        if not key.startswith(ARCHIVE_PREFIX):
            with self._lock:
                self.trail_reads += 1
                later = self._slower_after is not None and self.trail_reads > self._slower_after
                self.clock.now += self._slower if later else STEP
        return super().read(key)


def timed(
    trail: Trail, writers: Sequence[str], *, slower_after: int | None = None, slower: float = STEP
) -> tuple[Replayer, MemoryTransport, MemoryAuditSink, Clock]:
    clock = Clock()
    broker, audit = MemoryTransport(name="rabbitmq"), MemoryAuditSink()
    run = Replayer(
        archive=SlowTrail(trail.archive, clock, slower_after=slower_after, slower=slower),
        writers=writers,
        keys=Keyring([trail.signer]),
        broker=broker,
        audit=audit,
        table=default_routing_table(),
        clock=clock,
        sleep=clock.sleep,
        now=lambda: DAY + timedelta(days=2),
    )
    return run, broker, audit, clock


def hourly(trail: Trail, *, first: int = 0, hours: int = HOURS) -> None:
    """A message an hour from 00:30, each sealed by its own checkpoint: ``hours`` intervals."""
    for n in range(first, first + hours):
        at = DAY + timedelta(hours=n - first, minutes=30)
        trail.route([donation(n)], source="community", at=at)


def message(n: int) -> str:
    return str(uuid.UUID(int=n + 1))


def reading_time(
    trail: Trail, writers: Sequence[str], *, stopped: str = "done", **fields: object
) -> float:
    """The seconds one read of the period takes: a dry run with all the time it needs (the
    bodies cost nothing), which stops as ``stopped`` says."""
    run, _, _, clock = timed(trail, writers)
    report = run.run(request(dry_run=True, **fields))
    assert report.stopped == stopped
    return clock.now


def test_a_period_too_long_to_read_in_the_runs_time_stops_before_its_end_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trail = Trail("writer-a")
    hourly(trail)
    whole = reading_time(trail, ["writer-a"])
    seconds = 0.75 * whole  # the deadline falls among the hourly intervals
    run, broker, audit, clock = timed(trail, ["writer-a"])

    with caplog.at_level(logging.WARNING, logger="fabric.replay"):
        report = run.run(request(max_seconds=seconds))

    # Stopped at the first look at the clock after the deadline: one interval past it at most,
    # where Lambda would have ended the reading of the rest (and the run) with no answer.
    assert seconds <= clock.now <= seconds + STEP < whole
    assert report.stopped == "period too long"
    assert report.to_dict()["stopped"] == "period too long"
    # Nothing of a partial selection: no message counted, listed, published or audited.
    assert (report.selected, report.pending, report.remaining, report.finished) == (0, 0, 0, 0)
    assert (report.messages, report.problems, report.trail_problems) == ([], [], [])
    assert (report.trail_incomplete, report.unsealed_objects) == ([], 0)
    assert report.cursor is None
    assert broker.published == []
    assert audit.records == []
    (logged,) = [r.getMessage() for r in caplog.records if "too long" in r.getMessage()]
    assert "in the trail of writer-a" in logged
    assert "replay it in shorter periods" in logged


def test_a_deadline_while_the_windows_are_planned_also_stops_before_the_next_writer() -> None:
    first = Trail("writer-a")
    second = Trail("writer-b", archive=first.archive, signer=first.signer)
    hourly(first)
    hourly(second, first=100)
    writers = ["writer-a", "writer-b"]
    whole = reading_time(first, writers)
    run, broker, _, clock = timed(first, writers)

    # Planning writer-a's window (its checkpoints) takes more than a second.
    report = run.run(request(max_seconds=1.0))

    assert report.stopped == "period too long"
    assert broker.published == []
    assert clock.now < whole / 2  # writer-b's checkpoints and every object were left unread


def test_a_chunk_that_stops_too_long_keeps_its_cursor_and_nothing_is_replayed_twice() -> None:
    trail = Trail("writer-a")
    hourly(trail)
    whole = reading_time(trail, ["writer-a"])
    published: list[str] = []

    run, broker, _, _ = timed(trail, ["writer-a"])
    first = run.run(request(max_messages=5, max_seconds=10 * whole))
    published += [m.message_id for m in broker.published]
    assert (first.stopped, first.replayed) == ("message limit", 5)
    assert first.cursor == ReplayCursor(DAY + timedelta(hours=4, minutes=30), message(4))

    run, broker, _, clock = timed(trail, ["writer-a"])
    short = run.run(request(after=first.cursor, max_seconds=0.75 * whole))
    assert short.stopped == "period too long"
    assert clock.now < whole
    assert broker.published == []
    assert short.cursor == first.cursor  # a resumed run goes on from the same place

    run, broker, _, _ = timed(trail, ["writer-a"])
    rest = run.run(request(after=short.cursor, max_seconds=10 * whole))
    published += [m.message_id for m in broker.published]
    assert rest.stopped == "done"
    assert published == [message(n) for n in range(HOURS)]  # each once, in order


def test_a_trail_found_not_authentic_before_the_time_is_up_is_still_not_verified() -> None:
    # writer-a, read first, has an edited sealed object; the time runs out in writer-b's trail.
    # More time would not make writer-a's trail authentic: the run says so, not "too long".
    first = Trail("writer-a")
    second = Trail("writer-b", archive=first.archive, signer=first.signer)
    first.route([donation(0)], source="community", at=DAY + timedelta(minutes=30))
    hourly(second, first=100)
    (edited,) = [k for k in first.archive.objects if k.startswith("audit/writer-a/")]
    first.archive.put(
        edited, first.archive.objects[edited].replace(b"donation.received", b"donation.refunded")
    )
    writers = ["writer-a", "writer-b"]
    whole = reading_time(first, writers, stopped="trail not verified")
    run, broker, _, clock = timed(first, writers)

    report = run.run(request(max_seconds=whole - 5 * STEP))

    assert clock.now < whole
    assert (report.stopped, broker.published) == ("trail not verified", [])
    (problem,) = report.trail_problems
    assert problem.startswith(f"writer-a: {edited}: its SHA-256 differs")


def test_a_second_read_that_runs_out_of_time_leaves_the_first_selection_standing() -> None:
    # A run that takes one keeps the re-sends of 0 and 1, sets the rest aside, then finds both
    # done: nothing kept. Its first read took 40% of its time, so it reads again, but the
    # bucket has slowed down and the second read would take three times as long: it stops at
    # the deadline and goes on as if it had not read again (its cursor moves past the re-sends,
    # ``time limit``), and the runs resumed from there replay the rest once each, in order.
    trail, cursor = resent_after_their_replay(count=3)
    writers = ["writer-a", "writer-b"]
    once = reading_time(trail, writers, after=cursor)
    seconds = 2.5 * once
    run, broker, _, clock = timed(trail, writers, slower_after=int(once), slower=3 * STEP)

    report = run.run(request(max_messages=1, after=cursor, max_seconds=seconds))

    assert clock.now <= seconds + 3 * STEP  # not the 4 reads' worth the second read needed
    assert report.stopped == "time limit"
    assert broker.published == []
    assert report.cursor is not None
    assert report.cursor > cursor
    published: list[str] = []
    for _ in range(10):
        run, broker, _, _ = timed(trail, writers)
        resumed = run.run(request(max_messages=1, after=report.cursor, max_seconds=seconds))
        published += [m.message_id for m in broker.published]
        report = resumed
        if resumed.stopped == "done":
            break
    assert published == [str(uuid.UUID(int=n)) for n in (4, 5, 6)]
    assert report.stopped == "done"
