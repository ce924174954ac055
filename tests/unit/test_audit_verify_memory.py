"""Verifying a whole trail interval by interval (``verify_intervals``, what ``runbook verify``
runs): it holds one checkpoint's objects at a time, however long the trail, and finds what
reading the whole trail at once finds."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from fabric.audit_chain import Keyring, Verification, verify_intervals, verify_trail
from tests.unit.test_compliance_run import WRITER, Trail, accepted_and_routed

START = datetime(2026, 12, 1, tzinfo=UTC)
OBJECTS_PER_HOUR = 12


def hourly_trail(hours: int, *, unsealed: int = 0) -> Trail:
    """``hours`` of traffic, ``OBJECTS_PER_HOUR`` objects an hour, sealed at the end of each
    hour, then ``unsealed`` objects after the last checkpoint. Each message's outcome is in the
    object after its acceptance, at the hour's end in the next interval."""
    trail = Trail()
    waiting: list[dict[str, Any]] = []
    for n in range(hours * OBJECTS_PER_HOUR + unsealed):
        at = START + timedelta(minutes=5 * n)
        accepted, routed = zip(
            *(accepted_and_routed(f"m-{n:05d}-{i}", topic="x" * 300) for i in range(5)),
            strict=True,
        )
        trail.write(at, *accepted, *waiting)
        waiting = list(routed)
        if n < hours * OBJECTS_PER_HOUR and (n + 1) % OBJECTS_PER_HOUR == 0:
            trail.checkpoint(at + timedelta(minutes=1))
    trail.write(START + timedelta(days=30), *waiting)
    return trail


class Held(bytes):
    """An audit object's bytes as read, counted while anything holds them."""

    live = peak = 0

    def __new__(cls, data: bytes) -> Held:
        Held.live += 1
        Held.peak = max(Held.peak, Held.live)
        return super().__new__(cls, data)

    def __del__(self) -> None:
        Held.live -= 1


def by_interval(trail: Trail) -> Verification:
    """The trail read as ``runbook verify`` reads the bucket: new bytes at every read."""

    def read(key: str) -> bytes | None:
        stored = trail.store.objects.get(key)
        if stored is None:
            return None
        return Held(stored.data) if key.startswith("audit/") else bytes(stored.data)

    return verify_intervals(
        object_keys=trail.store.keys(f"audit/{WRITER}/"),
        checkpoint_keys=trail.store.keys(f"checkpoints/{WRITER}/"),
        read=read,
        keys=Keyring([trail.signer]),
        writer=WRITER,
    )


def whole(trail: Trail) -> Verification:
    return verify_trail(
        objects={k: trail.store.objects[k].data for k in trail.store.keys(f"audit/{WRITER}/")},
        checkpoints=[
            (k, json.loads(trail.store.objects[k].data))
            for k in trail.store.keys(f"checkpoints/{WRITER}/")
        ],
        keys=Keyring([trail.signer]),
        writer=WRITER,
    )


def test_a_long_trail_is_verified_holding_one_intervals_objects_at_a_time() -> None:
    hours = 40
    trail = hourly_trail(hours, unsealed=3)
    Held.live = Held.peak = 0

    result = by_interval(trail)

    assert result.ok, result.problem
    objects = hours * OBJECTS_PER_HOUR + 3 + 1
    assert (result.objects, result.checkpoints) == (objects, hours)
    assert result.records == whole(trail).records
    # Read all at once, the trail held all 484 objects; one interval is at most 12 (the tail
    # after the last checkpoint: 4).
    assert Held.peak == OBJECTS_PER_HOUR, Held.peak
    assert Held.live == 0


def test_an_acceptance_whose_outcome_never_came_is_named_across_intervals() -> None:
    trail = hourly_trail(3)
    # The last object (the outcomes of the last acceptances) never reached the trail.
    last = trail.store.keys(f"audit/{WRITER}/")[-1]
    del trail.store.objects[last]

    result, reference = by_interval(trail), whole(trail)

    assert result.problem is not None
    assert result.problem == reference.problem
    assert result.problem.authentic is False
    assert result.problem.why == "an accepted message has no outcome (routed or fallback)"
