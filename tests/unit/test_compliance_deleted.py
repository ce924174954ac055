"""Compliance report: a delete marker hides an object from every listing and read, although
Object Lock keeps its version. The report names a deleted audit object of the period's days or
a deleted checkpoint after its anchor through its window's closing one, so a deletion nothing
else would catch (the unsealed tail of a writer that stopped, today's last object) does not read
verified; an overwrite stays listed and is caught as before."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from fabric.compliance_run import Period
from tests.unit.test_compliance_review import RETIRED, both_writers, renamed_on_dec_1
from tests.unit.test_compliance_run import WRITER, Trail, accepted_and_routed, reporter

DEC_1 = Period.day(date(2026, 12, 1))
DELETED = "deleted after it was written (a delete marker among its versions)"


def test_a_deleted_tail_of_a_writer_that_stopped_is_named_not_excused() -> None:
    # The old writer wrote once more after its last checkpoint, then stopped (a rename). A plain
    # DeleteObject on that object hides it: nothing of the old writer is listed after its last
    # checkpoint any more, which is what excuses a stopped writer; without the markers the day
    # read verified, one message short.
    old, new = renamed_on_dec_1()
    tail = old.write(datetime(2026, 12, 1, 12, 30, tzinfo=UTC), *accepted_and_routed("lost"))
    run = both_writers(new)
    assert run.report(DEC_1)["verification"]["verified"] is False  # the tail is unsealed

    new.store.delete(tail)

    report = run.report(DEC_1)
    assert report["verification"]["verified"] is False
    assert report["verification"]["problem"] == f"{tail}: {DELETED}"
    old_check = next(w for w in report["verification"]["writers"] if w["writer"] == RETIRED)
    assert old_check["problem"] == f"{tail}: {DELETED}"
    # The next day holds nothing of the old writer: it verifies (its report reads its own days).
    assert run.report(Period.day(date(2026, 12, 2)))["verification"]["verified"] is True


def test_a_retired_writers_hidden_last_hour_checkpoint_and_objects_is_named() -> None:
    # The old writer's last checkpoint and the two objects it sealed, all deleted: its trail
    # now ends an hour earlier, everything listed is sealed, and the stopped writer was excused.
    old, new = renamed_on_dec_1()
    last = old.store.keys(f"checkpoints/{RETIRED}/")[-1]
    hour = old.store.keys(f"audit/{RETIRED}/2026/12/01/")[-2:]
    for key in (last, *hour):
        new.store.delete(key)

    problem = both_writers(new).report(DEC_1)["verification"]["problem"]
    assert problem == f"{hour[0]}: {DELETED}"


def test_a_deleted_checkpoint_of_a_quiet_hour_after_the_anchor_is_named() -> None:
    # The old writer sealed a quiet hour before it stopped; deleting that checkpoint loses no
    # record, but it is a deletion in the trail all the same.
    old, new = renamed_on_dec_1()
    quiet = old.checkpoint(datetime(2026, 12, 1, 13, tzinfo=UTC))
    new.store.delete(quiet)

    problem = both_writers(new).report(DEC_1)["verification"]["problem"]
    assert problem == f"{quiet}: {DELETED}"


def test_todays_last_object_deleted_before_its_checkpoint_is_named() -> None:
    # A running writer: its next checkpoint would miss the object, but today's report runs on
    # the hash chain alone until then, and a hidden last object leaves that chain whole.
    trail = Trail()
    trail.hours(datetime(2026, 12, 4, tzinfo=UTC), 26)  # sealed to Dec 5 02:00
    latest = trail.write(datetime(2026, 12, 5, 2, 10, tzinfo=UTC), *accepted_and_routed("x"))
    today = Period(datetime(2026, 12, 5, tzinfo=UTC), datetime(2026, 12, 5, 2, 20, tzinfo=UTC))
    run = reporter(trail)[0]
    assert run.report(today)["verification"]["verified"] is True

    trail.store.delete(latest)

    assert run.report(today)["verification"]["problem"] == f"{latest}: {DELETED}"


def test_a_deleted_sealed_object_is_named_as_deleted() -> None:
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 72)
    key = trail.store.keys(f"audit/{WRITER}/2026/12/02/")[5]
    trail.store.delete(key)

    problem = reporter(trail)[0].report(Period.day(date(2026, 12, 2)))["verification"]["problem"]
    assert problem == f"{key}: {DELETED}"


@pytest.mark.parametrize("which", ["sealed", "tail"])
def test_an_overwritten_object_of_a_writer_that_stopped_stays_listed_and_fails(which: str) -> None:
    # A PutObject over an existing key adds a version that S3 lists and reads in place of the
    # locked one: a sealed object then differs from its checkpoint, and an overwritten tail is
    # still an object after the last checkpoint. Neither hides anything, so versions that are
    # not current are not looked for (the writer itself puts a key again when it retries a
    # write whose state update failed).
    old, new = renamed_on_dec_1()
    tail = old.write(datetime(2026, 12, 1, 12, 30, tzinfo=UTC), *accepted_and_routed("tail"))
    key = tail if which == "tail" else old.store.keys(f"audit/{RETIRED}/2026/12/01/")[3]
    new.store.put(key, b'{"forged":true}\n')

    report = both_writers(new).report(DEC_1)
    assert report["verification"]["verified"] is False
    check = next(w for w in report["verification"]["writers"] if w["writer"] == RETIRED)
    if which == "sealed":
        assert check["problem"] == f"{key}: its SHA-256 differs from the checkpoint's"
    else:  # the chain checks the forged record, then the stopped writer is not excused
        assert check["problem"].startswith(f"{key} record None: written by None")


def around_dec_2() -> tuple[Trail, dict[str, str]]:
    """A running writer sealing hourly from Dec 1 to Dec 4 02:00; of Dec 2's window, the
    checkpoints of Dec 2 12:00 (inside it) and Dec 3 01:00 (the first at or after the end and
    margin: it closes it), and the one of Dec 3 04:00 (after it, in Dec 3's): their keys."""
    trail, checkpoints = Trail(), {}
    for name, first, count in (
        ("inside", datetime(2026, 12, 1, tzinfo=UTC), 36),
        ("closing", datetime(2026, 12, 2, 12, tzinfo=UTC), 13),
        ("later", datetime(2026, 12, 3, 1, tzinfo=UTC), 3),
    ):
        trail.hours(first, count)
        checkpoints[name] = trail.store.keys(f"checkpoints/{WRITER}/")[-1]
    trail.hours(datetime(2026, 12, 3, 4, tzinfo=UTC), 22)
    return trail, checkpoints


def test_a_deleted_checkpoint_after_the_closing_one_is_the_later_days_problem() -> None:
    # The bucket policy denies removing a marker: counted, it failed Dec 2's report for good.
    trail, checkpoints = around_dec_2()
    run = reporter(trail)[0]
    trail.store.delete(checkpoints["later"])

    dec_2 = run.report(Period.day(date(2026, 12, 2)))["verification"]
    dec_3 = run.report(Period.day(date(2026, 12, 3)))["verification"]

    assert (dec_2["verified"], dec_2["problem"]) == (True, None)
    assert dec_3["problem"] == f"{checkpoints['later']}: {DELETED}"


@pytest.mark.parametrize("which", ["inside", "closing"])
def test_a_deleted_checkpoint_in_or_closing_the_window_is_named(which: str) -> None:
    # A hidden closing checkpoint makes the next one close the window: it sorts before that.
    trail, checkpoints = around_dec_2()
    trail.store.delete(checkpoints[which])

    report = reporter(trail)[0].report(Period.day(date(2026, 12, 2)))
    assert report["verification"]["problem"] == f"{checkpoints[which]}: {DELETED}"
