"""Replay's first phase, reading and verifying the period's trail, within the run's time.

A period whose trail takes longer to read than the function may run used to be ended by
Lambda's timeout in the middle of the selection: no report, no cursor, and every retry the
same. The selection now stops once the run's time is up, before the next part of the trail,
with ``stopped: period too long`` (replay shorter periods), as the compliance report stops on
``PeriodTooLong``: nothing replayed, the cursor where the run started.

Here each read of a checkpoint costs a second on the run's clock (a large period's trail), and
each round of reads of an interval's audit objects (``READ_WORKERS`` of them at a time, as
``fabric.compliance_run.read_objects`` reads them) a second too, or as long as a test says; the
trails are written by the real router and audit writer into the in-memory bucket
(``tests.unit.test_replay.Trail``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryTransport
from fabric.audit_chain import Keyring
from fabric.audit_writer import ARCHIVE_PREFIX, AUDIT_PREFIX
from fabric.compliance_run import READ_WORKERS
from fabric.replay import ReplayCursor, Replayer
from fabric.routing import default_routing_table
from fabric.settings import ReplaySettings
from tests.unit.test_replay import DAY, Clock, MemoryArchive, Trail, donation, request
from tests.unit.test_replay_memory import resent_after_their_replay

HOURS = 24
STEP = 1.0  # seconds of one read of the trail: an interval of up to READ_WORKERS objects
TIMEOUT = 15 * 60.0  # the replay function's (stacks.constructs.replay)
# What the function deploys with when REPLAY_MAX_SECONDS is not set.
LIMIT = ReplaySettings.from_env(
    {
        "FABRIC_ENV": "test",
        "RABBITMQ_HOST": "127.0.0.1",
        "RABBITMQ_PORT": "5671",
        "RABBITMQ_TLS": "true",
        "RABBITMQ_SECRET_ARN": "arn:aws:secretsmanager:ap-southeast-3:111111111111:secret:x",
        "AUDIT_BUCKET": "fabric-test-audit",
        "AUDIT_WRITERS": "writer-a",
        "SIGNING_KEY_ARN": "arn:aws:kms:ap-southeast-3:111111111111:key/k",
    }
).max_seconds


class SlowTrail(MemoryArchive):
    """The bucket, where reading a checkpoint takes ``STEP`` seconds of ``clock`` and a round of
    audit objects ``per_object`` (``slower`` seconds, either, once ``slower_after`` reads of
    the trail were made; the first audit object ``retried`` seconds more); archive objects (the
    bodies) cost nothing.

    ``read_objects`` reads an interval's objects ``READ_WORKERS`` at a time, in a thread pool
    of its own: the reads of a round run together, so a round costs as one read, charged on
    its first (each pool's reads are counted by its threads' name, ``ThreadPoolExecutor-N_k``).
    """

    def __init__(
        self,
        archive: MemoryArchive,
        clock: Clock,
        *,
        per_object: float = STEP,
        slower_after: int | None = None,
        slower: float = STEP,
        retried: float = 0.0,
    ) -> None:
        super().__init__(objects=archive.objects, delete_markers=archive.delete_markers)
        self.clock = clock
        self.trail_reads = 0
        self._per_object = per_object
        self._slower_after = slower_after
        self._slower = slower
        self._retried = retried
        self._lock = threading.Lock()  # the trail is read 16 objects at a time
        self._pool_reads: Counter[str] = Counter()

    def read(self, key: str) -> bytes | None:
        if not key.startswith(ARCHIVE_PREFIX):
            with self._lock:
                self.trail_reads += 1
                later = self._slower_after is not None and self.trail_reads > self._slower_after
                cost = STEP
                if key.startswith(AUDIT_PREFIX):
                    pool = threading.current_thread().name.rpartition("_")[0]
                    self._pool_reads[pool] += 1
                    first = self._pool_reads[pool] % READ_WORKERS == 1
                    cost = self._per_object + self._retried if first else 0.0
                    self._retried = 0.0
                self.clock.now += self._slower if later and cost else cost
        return super().read(key)


def timed(
    trail: Trail,
    writers: Sequence[str],
    *,
    per_object: float = STEP,
    slower_after: int | None = None,
    slower: float = STEP,
    retried: float = 0.0,
) -> tuple[Replayer, MemoryTransport, MemoryAuditSink, Clock]:
    clock = Clock()
    archive = SlowTrail(
        trail.archive,
        clock,
        per_object=per_object,
        slower_after=slower_after,
        slower=slower,
        retried=retried,
    )
    run, broker, audit = replayer_on(archive, trail, writers)
    return run, broker, audit, clock


def replayer_on(
    archive: SlowTrail, trail: Trail, writers: Sequence[str]
) -> tuple[Replayer, MemoryTransport, MemoryAuditSink]:
    """A replayer of ``trail`` reading ``archive`` and timed on its clock."""
    clock = archive.clock
    broker, audit = MemoryTransport(name="rabbitmq"), MemoryAuditSink()
    run = Replayer(
        archive=archive,
        writers=writers,
        keys=Keyring([trail.signer]),
        broker=broker,
        audit=audit,
        table=default_routing_table(),
        clock=clock,
        sleep=clock.sleep,
        now=lambda: DAY + timedelta(days=2),
    )
    return run, broker, audit


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

    # Stopped before the interval that would have ended past the deadline (intervals take a
    # second here), where Lambda would have ended the reading of the rest (and the run) with no
    # answer.
    assert seconds - STEP <= clock.now <= seconds < whole
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


@pytest.mark.parametrize("interval", [45.0, 70.0, 100.0, 150.0, 200.0, 300.0])
def test_a_run_answers_before_the_functions_timeout_however_long_its_intervals_take(
    interval: float,
) -> None:
    # Each checkpoint interval takes `interval` seconds to read, verify and search, as one of
    # 1 to 10 million records does (25-40 s a million). The run used to look at its time
    # only before an interval, and begin it while its limit had not passed: one begun just
    # before the limit ended a whole interval after it, past the function's timeout when
    # that was longer than the 60 s between them, and the run was ended with no report.
    trail = Trail("writer-a")
    hourly(trail)
    run, broker, _, clock = timed(trail, ["writer-a"], per_object=interval)

    report = run.run(request(max_seconds=LIMIT))

    assert clock.now < TIMEOUT
    assert clock.now <= LIMIT  # no interval begun that the ones before said would end later
    assert (report.stopped, broker.published) == ("period too long", [])


def test_an_interval_longer_than_every_one_before_it_still_ends_before_the_timeout() -> None:
    # Intervals of 40 s, but the last one begun in time takes 100 s more: the margin between
    # the run's limit and the function's timeout is there for such a step (and the answer).
    # Within 60 s of margin, it ended past the timeout.
    trail = Trail("writer-a")
    hourly(trail)
    uniform = SlowTrail(trail.archive, Clock(), per_object=40.0)
    replayer_on(uniform, trail, ["writer-a"])[0].run(request(max_seconds=LIMIT))
    last = uniform.trail_reads  # the last read: the last interval begun
    slower = SlowTrail(trail.archive, Clock(), per_object=40.0, slower_after=last - 1, slower=140.0)
    run, broker, _ = replayer_on(slower, trail, ["writer-a"])

    report = run.run(request(max_seconds=LIMIT))

    assert slower.trail_reads == last
    assert LIMIT < slower.clock.now < TIMEOUT
    assert (report.stopped, broker.published) == ("period too long", [])


def test_one_slow_interval_does_not_make_a_period_that_fits_too_long() -> None:
    # Intervals of 29 s, but the first object read is retried once (the reader allows about
    # 30 s a call): the whole read takes 750 s of the run's 780. Every later interval was
    # estimated as long as that first one (59 s): the run stopped at 721 s, "period too long",
    # and replayed nothing. The slow one counts only for the next few intervals now.
    trail = Trail("writer-a")
    hourly(trail)
    run, broker, _, clock = timed(trail, ["writer-a"], per_object=29.0, retried=30.0)

    report = run.run(request(max_seconds=LIMIT))

    assert (report.stopped, report.replayed) == ("done", HOURS)
    assert [m.message_id for m in broker.published] == [message(n) for n in range(HOURS)]
    assert clock.now <= LIMIT


def test_a_large_interval_after_small_ones_is_foreseen_and_not_begun_too_late() -> None:
    # 23 hourly intervals of one object, then one of 160 (160 writer calls, then a checkpoint),
    # 30 s a round of 16 objects read, verified and searched: the large one comes with 66 s left
    # to the run's limit and takes 300 s (10 rounds). Estimated as long as the small ones, it
    # was begun and ended past the function's timeout (no report); estimated per round, it is
    # not begun.
    large = 10 * READ_WORKERS
    trail = Trail("writer-a")
    hourly(trail, hours=HOURS - 1)
    for n in range(large):
        at = DAY + timedelta(hours=HOURS - 1, seconds=n)
        trail.route([donation(HOURS - 1 + n)], source="community", at=at, seal=n == large - 1)
    run, broker, _, clock = timed(trail, ["writer-a"], per_object=30.0)

    report = run.run(request(max_seconds=LIMIT))

    assert clock.now <= LIMIT < TIMEOUT
    assert (report.stopped, broker.published) == ("period too long", [])
    assert report.cursor is None


@pytest.mark.parametrize("large", [40, 600])
def test_a_slow_small_interval_does_not_make_a_large_one_after_it_too_long(large: int) -> None:
    # Three quiet hours of one object, the first one's read retried (2 s and 20 s more: the
    # reader allows about 30 s a call), then a busy hour of `large` objects, 2 s a round of 16.
    # The busy hour was estimated at the slowest seconds an object took in the three before it
    # (22 s) times its objects, 880 s for 40 and 13,200 s for 600, and the run stopped at once,
    # "period too long", with nothing replayed. Estimated per round of reads at the pace of the
    # three before it (26 s for their 3 rounds), its 3 or 38 rounds fit (at the slowest one's
    # 22 s a round, 38 rounds would not: 836 s).
    trail = Trail("writer-a")
    hourly(trail, hours=3)
    for n in range(large):
        at = DAY + timedelta(hours=3, seconds=n)
        trail.route([donation(3 + n)], source="community", at=at, seal=n == large - 1)
    run, broker, _, clock = timed(trail, ["writer-a"], per_object=2.0, retried=20.0)

    report = run.run(request(max_seconds=LIMIT))

    assert (report.stopped, report.replayed) == ("done", 3 + large)
    assert {m.message_id for m in broker.published} == {message(n) for n in range(3 + large)}
    assert clock.now <= LIMIT


def test_a_delete_marker_found_before_the_time_is_up_is_reported_not_lost() -> None:
    # writer-b's delete-marker listing finds a deleted object before any interval is read;
    # the time runs out among writer-a's intervals. The run said "period too long" with no
    # trail problem: the evidence of the deletion was dropped, and the operator was told to
    # split the period.
    first = Trail("writer-a")
    second = Trail("writer-b", archive=first.archive, signer=first.signer)
    hourly(first)
    hourly(second, first=100)
    deleted = min(k for k in first.archive.objects if k.startswith("audit/writer-b/"))
    first.archive.delete_markers.add(deleted)
    del first.archive.objects[deleted]
    writers = ["writer-a", "writer-b"]
    whole = reading_time(first, writers, stopped="trail not verified")
    run, broker, _, clock = timed(first, writers)

    report = run.run(request(max_seconds=whole - 6 * STEP))

    assert clock.now < whole  # writer-a's last intervals were left unread
    assert (report.stopped, broker.published) == ("trail not verified", [])
    (problem,) = report.trail_problems
    assert problem.startswith(f"writer-b: {deleted}: deleted after it was written")


def test_a_tampered_object_after_the_last_checkpoint_found_in_time_is_reported() -> None:
    # The objects after writer-a's last checkpoint are verified first: an edited one breaks
    # the hash chain. The time runs out among the sealed intervals read after them; the run
    # said "period too long" with no trail problem.
    trail = Trail("writer-a")
    hourly(trail)
    at = DAY + timedelta(hours=23, minutes=50)
    trail.route([donation(500)], source="community", at=at, seal=False)
    tail = max(k for k in trail.archive.objects if k.startswith("audit/writer-a/"))
    edited = trail.archive.objects[tail].replace(b"donation.received", b"donation.refunded")
    trail.archive.put(tail, edited)
    whole = reading_time(trail, ["writer-a"], stopped="trail not verified")
    run, broker, _, clock = timed(trail, ["writer-a"])

    report = run.run(request(max_seconds=whole / 2))

    assert clock.now < whole
    assert (report.stopped, broker.published) == ("trail not verified", [])
    (problem,) = report.trail_problems
    assert problem.startswith(f"writer-a: {tail} record ")
    assert "prev hash does not match" in problem
