"""Verifying a whole trail interval by interval (``verify_intervals``, what ``runbook verify``
runs): it holds one checkpoint's objects at a time, however long the trail, and finds what
reading the whole trail at once finds."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fabric.audit_chain import (
    Keyring,
    Verification,
    canonical,
    make_checkpoint,
    verify_intervals,
    verify_trail,
)
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


def by_interval(
    trail: Trail, *, object_keys: list[str] | None = None, reads: list[str] | None = None
) -> Verification:
    """The trail read as ``runbook verify`` reads the bucket: new bytes at every read (each
    key read added to ``reads``); ``object_keys`` as listed (default: listed now)."""

    def read(key: str) -> bytes | None:
        if reads is not None:
            reads.append(key)
        stored = trail.store.objects.get(key)
        if stored is None:
            return None
        return Held(stored.data) if key.startswith("audit/") else bytes(stored.data)

    return verify_intervals(
        object_keys=trail.store.keys(f"audit/{WRITER}/") if object_keys is None else object_keys,
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


def test_a_forged_checkpoint_is_named_before_anything_it_names_is_read() -> None:
    # A new version of checkpoint 1, unsigned, naming the whole trail 50 times over and keys
    # outside the writer's objects: each was read before its signature was checked (24,053
    # reads, 483 objects held at once).
    trail = hourly_trail(40)
    first = trail.store.keys(f"checkpoints/{WRITER}/")[0]
    body = json.loads(trail.store.objects[first].data)
    every = [{"key": key, "sha256": "0" * 64} for key in trail.store.keys(f"audit/{WRITER}/")]
    outside = [{"key": key, "sha256": "0" * 64} for key in ("archive/x.jsonl", "reports/y.csv")]
    body["objects"] = every * 50 + outside
    trail.store.put(first, canonical(body))
    reads: list[str] = []

    result = by_interval(trail, reads=reads)

    assert result.problem is not None
    assert (result.problem.where, result.problem.why) == (
        first,
        "the signature does not match the checkpoint",
    )
    assert reads == [first]


def test_a_signed_checkpoint_naming_a_key_outside_the_writers_objects_is_named_not_read() -> None:
    trail = hourly_trail(2)
    last = trail.store.keys(f"checkpoints/{WRITER}/")[-1]
    sealed = json.loads(trail.store.objects[last].data)
    outside = f"archive/{WRITER}/elsewhere.jsonl"
    trail.store.put(outside, b"not the writer's object")
    named = [(item["key"], item["sha256"]) for item in sealed["objects"]]
    digest = hashlib.sha256(b"not the writer's object").hexdigest()
    resealed = make_checkpoint(
        writer=WRITER,
        sequence=sealed["checkpoint"],
        objects=[*named, (outside, digest)],
        last_seq=sealed["last_seq"],
        last_hash=sealed["last_hash"],
        previous_signature=sealed["previous_signature"],
        at=sealed["at"],
        signer=trail.signer,
    )
    trail.store.put(last, canonical(resealed))
    reads: list[str] = []

    result = by_interval(trail, reads=reads)

    assert result.problem is not None
    assert (result.problem.where, result.problem.why) == (
        outside,
        f"named by {last}, outside audit/{WRITER}/",
    )
    assert outside not in reads


def test_an_object_sealed_after_the_objects_were_listed_is_named_missing_not_unnamed() -> None:
    # Listed before the writer wrote and sealed it (runbook verify lists the checkpoints first
    # now): it read as "an object no checkpoint names, among sealed ones", a planted object.
    trail = hourly_trail(3)
    listed = trail.store.keys(f"audit/{WRITER}/")
    late = trail.write(START + timedelta(days=31), *accepted_and_routed("late"))
    sealing = trail.checkpoint(START + timedelta(days=31, minutes=1))
    reads: list[str] = []

    result = by_interval(trail, object_keys=listed, reads=reads)

    assert result.problem is not None
    assert (result.problem.where, result.problem.why) == (late, f"named by {sealing} but missing")
    assert late not in reads
    assert by_interval(trail).ok  # listed after the checkpoints, it verifies


class CountingSigner:
    """The trail's signer, counting the signatures it checks (a KMS call each in AWS)."""

    def __init__(self, signer: Any) -> None:
        self.key_id, self._signer, self.verified = signer.key_id, signer, 0

    def sign(self, message: bytes) -> bytes:
        return bytes(self._signer.sign(message))

    def verify(self, message: bytes, signature: bytes) -> bool:
        self.verified += 1
        return bool(self._signer.verify(message, signature))


def test_each_checkpoint_signature_is_checked_once() -> None:
    # Its seal is checked before its objects are read, again with them, and again as the next
    # interval's anchor: one KMS call, not three.
    trail = hourly_trail(5, unsealed=2)
    signer = CountingSigner(trail.signer)

    result = verify_intervals(
        object_keys=trail.store.keys(f"audit/{WRITER}/"),
        checkpoint_keys=trail.store.keys(f"checkpoints/{WRITER}/"),
        read=lambda key: trail.store.objects[key].data,
        keys=Keyring([signer]),
        writer=WRITER,
    )

    assert result.ok, result.problem
    assert signer.verified == 5


def test_an_abandoned_attempt_that_is_not_listed_is_not_read() -> None:
    # A write whose state update failed, retried under another key: the checkpoint names the
    # first attempt abandoned, which was never stored here (nor listed): nothing to read.
    trail = hourly_trail(1)
    trail.chains.failures = 1
    with pytest.raises(TimeoutError):
        trail.write(START + timedelta(days=31), *accepted_and_routed("first"))
    intent = trail.chains.load(WRITER).intent
    assert intent is not None
    abandoned = intent[0]
    del trail.store.objects[abandoned]
    trail.write(START + timedelta(days=32), *accepted_and_routed("retried"))  # and seals
    sealing = trail.store.keys(f"checkpoints/{WRITER}/")[-1]
    named = json.loads(trail.store.objects[sealing].data)["abandoned"]
    assert [item["key"] for item in named] == [abandoned]
    reads: list[str] = []

    result = by_interval(trail, reads=reads)

    assert result.ok, result.problem
    assert abandoned not in reads
