"""Replay and delete markers: a plain DeleteObject, which Object Lock does not refuse, hides a
key from every listing and read. Replay looks for the markers in the window it reads and
refuses a trail with one, naming the key, instead of leaving a hidden object's messages out
silently or holding a hidden checkpoint's messages back as ``unsealed``.

The trail is written by the real router and audit writer (``tests.unit.test_replay.Trail``)
into moto's versioned Object Lock bucket, read through the S3 adapter the function uses.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import boto3
import pytest
from moto import mock_aws

from fabric.adapters.audit_storage import S3ObjectStore
from fabric.adapters.memory_archive import MemoryArchive
from fabric.replay import ReplayReport
from tests.integration.aws_audit import create_audit_bucket
from tests.integration.aws_fallback import REGION
from tests.unit.test_replay import DAY, Trail, donation, replayer, request
from tests.unit.test_replay_memory import resent_after_their_replay

BUCKET = "fabric-test-audit"
WRITER = "fabric-test-audit-writer"
DELETED = "deleted after it was written (a delete marker among its versions)"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's S3 with the audit bucket: versioned, Object Lock, compliance mode for 7 years."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "moto",
        "AWS_SECRET_ACCESS_KEY": "moto",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name=REGION)
        create_audit_bucket(client, BUCKET)
        yield client


def three_hours(s3: Any) -> tuple[Trail, list[str], list[str]]:
    """Messages 0-1 at 01:00 and 2-3 at 02:00, each call sealed by its checkpoint, and 4-5 at
    03:00, not sealed yet (the current hour's); the audit object keys and checkpoint keys."""
    trail = Trail(WRITER, archive=S3ObjectStore(BUCKET, lambda: s3))
    for hour in (1, 2, 3):
        numbers = (2 * hour - 2, 2 * hour - 1)
        trail.route(
            [donation(n) for n in numbers],
            source="community",
            at=DAY + timedelta(hours=hour),
            seal=hour < 3,
        )
    objects = trail.archive.keys(f"audit/{WRITER}/")
    checkpoints = trail.archive.keys(f"checkpoints/{WRITER}/")
    assert (len(objects), len(checkpoints)) == (3, 2)
    return trail, objects, checkpoints


def replay(trail: Trail, *, include_unsealed: bool = True) -> tuple[ReplayReport, list[str]]:
    """A replay of DAY (unsealed acceptances included unless told): the report and the ids
    published."""
    run, broker, _ = replayer(trail)
    report = run.run(request(include_unsealed=include_unsealed))
    return report, [message.message_id for message in broker.published]


def message(n: int) -> str:
    return str(uuid.UUID(int=n + 1))


def refused(report: ReplayReport, published: list[str], key: str) -> None:
    assert (report.stopped, report.selected, report.replayed) == ("trail not verified", 0, 0)
    assert report.trail_problems == [f"{WRITER}: {key}: {DELETED}"]
    assert published == []


def test_an_intact_trail_replays_every_message_as_before(s3: Any) -> None:
    trail, _, _ = three_hours(s3)

    report, published = replay(trail)

    assert (report.stopped, report.trail_problems, report.unsealed_objects) == ("done", [], 1)
    assert published == [message(n) for n in range(6)]
    # Without include_unsealed, the current hour's messages are held back, named.
    held, published = replay(trail, include_unsealed=False)
    assert published == [message(n) for n in range(4)]
    assert [(p.message_id, p.outcome) for p in held.problems] == [
        (message(4), "unsealed"),
        (message(5), "unsealed"),
    ]


def test_a_deleted_last_object_after_the_last_checkpoint_stops_the_replay_and_is_named(
    s3: Any,
) -> None:
    # Hidden, it leaves a hash chain that ends one object earlier and still verifies: its
    # messages were simply not offered for replay.
    trail, objects, _ = three_hours(s3)
    s3.delete_object(Bucket=BUCKET, Key=objects[-1])
    assert trail.archive.read(objects[-1]) is None  # hidden, its locked version kept

    refused(*replay(trail), objects[-1])


def test_a_deleted_last_sealed_object_is_named_as_deleted(s3: Any) -> None:
    trail, objects, _ = three_hours(s3)
    trail.seal(DAY + timedelta(hours=4))  # the 03:00 object sealed too
    s3.delete_object(Bucket=BUCKET, Key=objects[-1])

    refused(*replay(trail), objects[-1])


def test_a_deleted_last_checkpoint_stops_the_replay_and_is_named(s3: Any) -> None:
    # Hidden, it leaves the 02:00 object after the last checkpoint: its messages read as not
    # yet sealed, which only the hash chain protects.
    trail, _, checkpoints = three_hours(s3)
    s3.delete_object(Bucket=BUCKET, Key=checkpoints[-1])

    refused(*replay(trail, include_unsealed=False), checkpoints[-1])


def test_markers_before_the_window_are_the_earlier_days_business(s3: Any) -> None:
    # A day before the period, written and sealed, then deleted: the period's window starts
    # from the checkpoint after it (its anchor), and the earlier day's compliance report names
    # the deletion; the replay lists the period's days and the checkpoints after the anchor.
    trail = Trail(WRITER, archive=S3ObjectStore(BUCKET, lambda: s3))
    trail.route([donation(99)], source="community", at=DAY - timedelta(hours=12))
    early = trail.archive.keys(f"checkpoints/{WRITER}/")[0]
    trail.seal(DAY - timedelta(hours=1))  # the anchor of DAY's window
    trail.route([donation(0)], source="community", at=DAY + timedelta(hours=1))
    (before,) = trail.archive.keys(f"audit/{WRITER}/{DAY - timedelta(days=1):%Y/%m/%d}/")
    for key in (before, early):
        s3.delete_object(Bucket=BUCKET, Key=key)

    report, published = replay(trail)

    assert (report.stopped, report.trail_problems) == ("done", [])
    assert published == [message(0)]


class CountedListings(MemoryArchive):
    """The in-memory bucket, counting its version listings."""

    listings = 0

    def deleted(self, prefix: str, *, after: str = "") -> list[str]:
        self.listings += 1
        return super().deleted(prefix, after=after)


def test_a_run_that_reads_the_period_twice_lists_the_markers_once() -> None:
    # Time budget: a run whose selection comes out short reads the whole period again; the
    # markers it found nothing in are not listed again. Two writers, DAY's window through its
    # margin (Dec 1-3): three days and the checkpoints, per writer.
    trail, after = resent_after_their_replay(count=3)
    archive = CountedListings(objects=trail.archive.objects)
    trail.archive = archive
    run, broker, _ = replayer(trail, writers=("writer-a", "writer-b"))

    report = run.run(request(max_messages=2, after=after))

    assert report.stopped == "message limit"
    # Both of the two it takes: only a second read finds the second (one read keeps one).
    assert [m.message_id for m in broker.published] == [message(3), message(4)]
    assert archive.listings == 2 * (3 + 1)


def around_the_window(s3: Any) -> tuple[Trail, dict[str, str]]:
    """DAY's messages 0-1, sealed at 01:00; then checkpoints on Dec 2 (in DAY's window: its
    late day), on Dec 5 (the first at or after the end, ``late_days`` and the hour: it closes
    the window), on Dec 7, and on Dec 21, sealing message 7 of that day: their keys by name."""
    trail = Trail(WRITER, archive=S3ObjectStore(BUCKET, lambda: s3))
    trail.route([donation(0), donation(1)], source="community", at=DAY + timedelta(hours=1))
    checkpoints = {
        "inside": trail.seal(DAY + timedelta(days=1, hours=2)),
        "closing": trail.seal(DAY + timedelta(days=4)),
        "later": trail.seal(DAY + timedelta(days=6)),
    }
    trail.route([donation(7)], source="community", at=DAY + timedelta(days=20))
    checkpoints["weeks later"] = trail.archive.keys(f"checkpoints/{WRITER}/")[-1]
    return trail, checkpoints


@pytest.mark.parametrize("which", ["later", "weeks later"])
def test_a_deleted_checkpoint_after_the_closing_one_leaves_the_period_replayable(
    s3: Any, which: str
) -> None:
    # The bucket policy denies removing a marker: counted, it refused DAY's replay for good.
    # It is the replay of its own days that is refused, naming it.
    trail, checkpoints = around_the_window(s3)
    s3.delete_object(Bucket=BUCKET, Key=checkpoints[which])

    report, published = replay(trail)

    assert (report.stopped, report.trail_problems) == ("done", [])
    assert published == [message(0), message(1)]
    written = {"later": DAY + timedelta(days=6), "weeks later": DAY + timedelta(days=20)}[which]
    run, broker, _ = replayer(trail)
    own = run.run(request(start=written - timedelta(days=1), end=written + timedelta(days=1)))
    refused(own, [m.message_id for m in broker.published], checkpoints[which])


@pytest.mark.parametrize("which", ["inside", "closing"])
def test_a_deleted_checkpoint_in_or_closing_the_window_still_refuses_it(
    s3: Any, which: str
) -> None:
    # A hidden closing checkpoint makes the next one close the window: it sorts before that.
    trail, checkpoints = around_the_window(s3)
    s3.delete_object(Bucket=BUCKET, Key=checkpoints[which])

    refused(*replay(trail), checkpoints[which])
