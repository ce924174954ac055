"""Replay's memory follows the run, not the period: a run keeps the whole acceptance only of
the messages it can take (``max_messages``), and indexes only their bodies when it searches the
archive; chunked runs still replay what one run would, each message once, in the same order,
from the same acceptance; and a run that would have to read the period twice never runs past
its time.

The trails are written by the real router and audit writer into the in-memory bucket
(``tests.unit.test_replay.Trail``).
"""

from __future__ import annotations

import json
import random
import tracemalloc
import uuid
from datetime import timedelta

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryTransport
from fabric.audit_chain import Keyring
from fabric.audit_writer import ARCHIVE_PREFIX
from fabric.replay import ReplayCursor, Replayer, ReplayFilter, ReplayReport
from fabric.routing import default_routing_table
from tests.unit.test_replay import (
    DAY,
    Clock,
    MemoryArchive,
    Trail,
    donation,
    replayer,
    request,
)


def test_a_run_over_a_large_period_holds_far_less_than_its_acceptances() -> None:
    # 10,000 acceptances, sealed every 1,000: the former selection held every one of them
    # (about 500 bytes each: 7.7 MB at the peak); a run that takes 100 needs their ids only
    # (1.9 MB at the peak, most of it the same at any size of the period).
    trail = Trail()
    for call in range(100):
        trail.route(
            [donation(call * 100 + n) for n in range(100)],
            source="community",
            at=DAY + timedelta(seconds=call),
            seal=call % 10 == 9,
        )
    run, broker, _ = replayer(trail)

    tracemalloc.start()
    try:
        report = run.run(request(max_messages=100))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (report.selected, report.replayed, report.stopped) == (10_000, 100, "message limit")
    assert [m.message_id for m in broker.published] == [
        str(uuid.UUID(int=n + 1)) for n in range(100)
    ]
    assert peak < 4_000_000, f"peak {peak / 1e6:.1f} MB"


def replay_in_chunks(run: Replayer, chunk: int, **fields: object) -> None:
    """Run after run from the cursor, as the runbook does, until the replay is done."""
    cursor: ReplayCursor | None = None
    for _ in range(1000):
        report = run.run(request(max_messages=chunk, after=cursor, **fields))
        cursor = report.cursor or cursor
        if report.stopped == "done":
            return
        assert report.stopped == "message limit"
        assert report.finished > 0, "a run that finishes nothing never ends the replay"
    raise AssertionError("the replay never finished")


def sent(broker: MemoryTransport) -> list[tuple[str, object]]:
    return [(m.message_id, json.loads(m.body)["payload"]) for m in broker.published]


def test_chunks_replay_what_one_run_replays_once_each_in_its_order_and_from_its_acceptance() -> (
    None
):
    # Two writers; acceptances that reach a writer late (their time before the writer's last
    # write); messages accepted twice by either writer with another payload, sometimes before
    # and after a chunk's cursor; the last writes of one writer not sealed yet. Small chunks
    # make every run set most of the period aside.
    rng = random.Random(20261203)  # noqa: S311 (test data, not secrets)
    first = Trail("writer-a")
    second = Trail("writer-b", archive=first.archive, signer=first.signer)
    count = 60
    for n in range(count):
        written = DAY + timedelta(minutes=10 * n + 5)
        trail = rng.choice((first, second))
        late = timedelta(minutes=rng.choice((0, 0, 7, 95, 300)))
        at = max(DAY, written - late)
        message = n if n < 12 or rng.random() > 0.3 else rng.randrange(n)  # again: an old id
        unsealed = trail is second and n >= count - 6
        trail.route(
            [donation(message, payload=n)],
            source="community",
            at=at,
            written=written,
            seal=not unsealed,
        )
    whole, broker, _ = replayer(first, writers=("writer-a", "writer-b"))
    whole_report = whole.run(request(include_unsealed=True))
    assert whole_report.stopped == "done"
    expected = sent(broker)
    assert len(expected) == whole_report.selected == len({m for m, _ in expected}) > 40

    for chunk in (1, 2, 3, 7):
        run, broker, _ = replayer(first, writers=("writer-a", "writer-b"))
        replay_in_chunks(run, chunk, include_unsealed=True)
        assert sent(broker) == expected, chunk


def test_a_sealed_acceptance_set_aside_by_a_short_run_still_wins_over_an_unsealed_one() -> None:
    # The message was accepted (sealed, writer a) at 03:00 and, unsealed, at 01:00 by writer b
    # with another body. A run that takes one message keeps room for two: it sets the 03:00
    # acceptance aside behind 02:00 and 02:01 unless it read the 01:00 one first; it must still
    # replay the sealed body, at the message's first place (01:00).
    first = Trail("writer-a")
    second = Trail("writer-b", archive=first.archive, signer=first.signer)
    for n in range(1, 4):
        first.route([donation(n)], source="community", at=DAY + timedelta(hours=2, minutes=n))
    first.route([donation(0, payload="sealed")], source="community", at=DAY + timedelta(hours=3))
    second.route(
        [donation(0, payload="unsealed")],
        source="community",
        at=DAY + timedelta(hours=1),
        written=DAY + timedelta(hours=4),
        seal=False,
    )
    run, broker, _ = replayer(first, writers=("writer-a", "writer-b"))

    report = run.run(request(max_messages=1, include_unsealed=True))

    assert (report.replayed, report.unsealed, report.stopped) == (1, 0, "message limit")
    assert sent(broker) == [(str(uuid.UUID(int=1)), "sealed")]
    assert report.cursor == ReplayCursor(DAY + timedelta(hours=1), str(uuid.UUID(int=1)))


def test_messages_kept_and_then_found_behind_the_cursor_do_not_starve_a_run() -> None:
    # Three messages were accepted at 00:10-00:30 (writer b) and again at 05:00-05:02 (writer
    # a, read first). After a run that replayed them, a run that takes one keeps two of the
    # later acceptances, sets the third and everything after aside, and only then learns that
    # the three are done: it reads the period again instead of finishing nothing.
    first = Trail("writer-a")
    second = Trail("writer-b", archive=first.archive, signer=first.signer)
    for n in range(3):
        second.route([donation(n)], source="community", at=DAY + timedelta(minutes=10 * (n + 1)))
    for n in range(3):
        first.route([donation(n)], source="community", at=DAY + timedelta(hours=5, minutes=n))
    first.route([donation(3), donation(4)], source="community", at=DAY + timedelta(hours=6))
    run, broker, _ = replayer(first, writers=("writer-a", "writer-b"))
    done = run.run(request(max_messages=3))
    assert [m.message_id for m in broker.published] == [str(uuid.UUID(int=n)) for n in (1, 2, 3)]

    report = run.run(request(max_messages=1, after=done.cursor))

    assert (report.selected, report.pending, report.replayed) == (5, 2, 1)
    assert (report.remaining, report.stopped) == (1, "message limit")
    assert broker.published[-1].message_id == str(uuid.UUID(int=4))


def test_a_body_searched_for_in_the_whole_archive_does_not_make_a_run_index_every_body() -> None:
    # 7,000 acceptances, sealed call by call; the first call's bodies were never archived. A
    # run for one of its messages searches every archive object of the period for the body
    # (and reports it missing): it must not hold the hash of every body it went through
    # (about 70 bytes each, the period's size: 1.6 times the peak of a run that reads the body
    # beside its record), only its own messages'.
    trail = Trail()
    for call in range(100):
        trail.route(
            [donation(call * 70 + n) for n in range(70)],
            source="community",
            at=DAY + timedelta(seconds=call),
            archive=call != 0,
        )

    def peak(message: int) -> tuple[ReplayReport, int]:
        run, _, _ = replayer(trail)
        chosen = ReplayFilter(message_ids=frozenset({str(uuid.UUID(int=message + 1))}))
        tracemalloc.start()
        try:
            report = run.run(request(selection=chosen))
            return report, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    found, beside = peak(70)  # its body is beside its record: nothing else is read
    missing, searched = peak(0)

    assert (found.replayed, missing.missing_body) == (1, 1)
    assert searched < 1.2 * beside, f"{searched / 1e6:.2f} MB against {beside / 1e6:.2f} MB"


class SlowTrail(MemoryArchive):
    """The bucket, where reading an audit object or a checkpoint takes a second of ``clock``
    (a large period's trail: reading it is most of a run's time)."""

    def __init__(self, archive: MemoryArchive, clock: Clock) -> None:
        super().__init__(objects=archive.objects, delete_markers=archive.delete_markers)
        self.clock = clock

    def read(self, key: str) -> bytes | None:
        if not key.startswith(ARCHIVE_PREFIX):
            self.clock.now += 1.0
        return super().read(key)


def resent_after_their_replay(count: int) -> tuple[Trail, ReplayCursor]:
    """Messages 0-2 accepted at 00:10-00:30 (writer b) and, re-sent, at 05:00-05:02 (writer a,
    read first), then ``count`` more from 05:03 (writer a); and the cursor of a run that
    replayed 0-2."""
    first = Trail("writer-a")
    second = Trail("writer-b", archive=first.archive, signer=first.signer)
    for n in range(3):
        second.route([donation(n)], source="community", at=DAY + timedelta(minutes=10 * (n + 1)))
    for n in range(3 + count):
        first.route([donation(n)], source="community", at=DAY + timedelta(hours=5, minutes=n))
    run, broker, _ = replayer(first, writers=("writer-a", "writer-b"))
    done = run.run(request(max_messages=3))
    assert [m.message_id for m in broker.published] == [str(uuid.UUID(int=n)) for n in (1, 2, 3)]
    assert done.cursor is not None
    return first, done.cursor


def timed(trail: Trail) -> tuple[Replayer, MemoryTransport, Clock]:
    clock = Clock()
    broker = MemoryTransport(name="rabbitmq")
    run = Replayer(
        archive=SlowTrail(trail.archive, clock),
        writers=("writer-a", "writer-b"),
        keys=Keyring([trail.signer]),
        broker=broker,
        audit=MemoryAuditSink(),
        table=default_routing_table(),
        clock=clock,
        sleep=clock.sleep,
        now=lambda: DAY + timedelta(days=2),
    )
    return run, broker, clock


def reading_time(trail: Trail, after: ReplayCursor) -> float:
    """The seconds one read of the period takes (a run that keeps all it needs reads once)."""
    run, _, clock = timed(trail)
    run.run(request(after=after, dry_run=True))
    return clock.now


@pytest.mark.parametrize(("reads", "replayed"), [(1.5, [4]), (3, [4, 5])])
def test_a_run_reads_the_period_again_only_when_a_second_read_fits_in_its_time(
    reads: float, replayed: list[int]
) -> None:
    # A run that takes two keeps 0-3 (room for four), sets 4 aside, then finds 0-2 done: it
    # kept one message. Reading again takes as long as the first read: with 1.5 reads' time
    # that would leave none to publish (or, in Lambda, no time to return a report), so it
    # publishes the one it kept (the right first one) and the next run goes on after it.
    trail, after = resent_after_their_replay(count=3)
    seconds = reads * reading_time(trail, after)
    run, broker, clock = timed(trail)

    report = run.run(request(max_messages=2, after=after, max_seconds=seconds))

    assert clock.now <= seconds
    assert [m.message_id for m in broker.published] == [str(uuid.UUID(int=n)) for n in replayed]
    assert (report.replayed, report.stopped) == (len(replayed), "message limit")
    assert report.cursor == ReplayCursor(
        DAY + timedelta(hours=5, minutes=replayed[-1] - 1), str(uuid.UUID(int=replayed[-1]))
    )


def test_a_run_that_kept_nothing_and_cannot_read_again_moves_its_cursor_for_the_next() -> None:
    # A run that takes one keeps the re-sends of 0 and 1, sets everything after them aside,
    # then finds both done: nothing to publish, and no time to read again. It stops within its
    # time with a cursor past the re-sends, and the runs after it replay the rest once each,
    # in order, each within its time, as the runbook resumes them.
    trail, cursor = resent_after_their_replay(count=3)
    seconds = 1.5 * reading_time(trail, cursor)
    published: list[str] = []
    stops: list[str] = []
    for _ in range(10):
        run, broker, clock = timed(trail)
        report = run.run(request(max_messages=1, after=cursor, max_seconds=seconds))
        assert clock.now <= seconds
        assert report.cursor is not None
        assert report.cursor > cursor
        published += [m.message_id for m in broker.published]
        stops.append(report.stopped)
        cursor = report.cursor
        if report.stopped == "done":
            break

    assert stops[0] == "time limit"
    assert published == [str(uuid.UUID(int=n)) for n in (4, 5, 6)]
    assert stops[-1] == "done"
