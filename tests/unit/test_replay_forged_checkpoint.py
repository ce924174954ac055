"""Replay on a trail with a forged checkpoint: its seal is checked before anything it names is
read, as the compliance report does, so a forged checkpoint cannot decide what the replay
reads (keys its role may not read stopped the run; many keys cost a read each)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from fabric.adapters.memory_archive import MemoryArchive
from tests.unit.test_replay import DAY, Trail, donation, replayer, request


class ReadLog(MemoryArchive):
    """A MemoryArchive that remembers which keys were read."""

    def __init__(self) -> None:
        super().__init__()
        self.read_keys: list[str] = []

    def read(self, key: str) -> bytes | None:
        self.read_keys.append(key)
        return super().read(key)


def forged_trail(extra: list[str]) -> tuple[Trail, str]:
    """Two sealed calls, then their checkpoint again (a new version of its key), also naming
    ``extra``, with its old signature: forged by someone without the signing key."""
    trail = Trail(archive=ReadLog())
    trail.route([donation(1)], source="community", at=DAY + timedelta(hours=1), seal=False)
    trail.route([donation(2)], source="community", at=DAY + timedelta(hours=2), seal=False)
    key = trail.seal(DAY + timedelta(hours=3))
    body: dict[str, Any] = json.loads(trail.archive.objects[key])
    body["objects"] = body["objects"] + [{"key": k, "sha256": "0" * 64} for k in extra]
    trail.archive.put(key, json.dumps(body).encode())
    return trail, key


def test_a_forged_checkpoint_stops_the_replay_before_anything_it_names_is_read() -> None:
    outside = f"archive/{Trail().writer}/2026/12/01/000000000001-000000000001.jsonl"
    many = [f"audit/{Trail().writer}/2026/12/01/9{n:011d}-9{n:011d}.jsonl" for n in range(500)]
    trail, key = forged_trail([outside, *many])
    archive = trail.archive
    assert isinstance(archive, ReadLog)
    run, broker, _audit = replayer(trail)

    report = run.run(request())

    assert report.stopped == "trail not verified"
    assert broker.published == []
    (problem,) = report.trail_problems
    assert problem == f"{trail.writer}: {key}: the signature does not match the checkpoint"
    assert not {outside, *many} & set(archive.read_keys)
