"""Replay's memory follows the run, not the period: a run keeps the whole acceptance only of
the messages it can take (``max_messages``), and chunked runs still replay what one run would,
each message once, in the same order, from the same acceptance.

The trails are written by the real router and audit writer into the in-memory bucket
(``tests.unit.test_replay.Trail``).
"""

from __future__ import annotations

import json
import random
import tracemalloc
import uuid
from datetime import timedelta

from fabric.adapters.memory import MemoryTransport
from fabric.replay import ReplayCursor, Replayer
from tests.unit.test_replay import DAY, Trail, donation, replayer, request


def test_a_run_over_a_large_period_holds_far_less_than_its_acceptances() -> None:
    # 20,000 acceptances, sealed every 1,000: the former selection held every one of them
    # (about 500 bytes each: 11.5 MB at the peak); a run that takes 100 needs their ids only.
    trail = Trail()
    for call in range(200):
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

    assert (report.selected, report.replayed, report.stopped) == (20_000, 100, "message limit")
    assert [m.message_id for m in broker.published] == [
        str(uuid.UUID(int=n + 1)) for n in range(100)
    ]
    assert peak < 6_000_000, f"peak {peak / 1e6:.1f} MB"


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
