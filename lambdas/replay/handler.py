"""Replay Lambda: re-publishes archived messages of a period (on demand, by the runbook)."""

from __future__ import annotations

from typing import Any

from fabric.bootstrap import replay_from_environment
from fabric.replay import parse_request

RUNTIME = replay_from_environment()


def handler(event: dict[str, Any], _context: Any) -> dict[str, Any]:
    """A replay request (``fabric.replay.parse_request``) → the run's report; a malformed
    request → ``{"error": ...}`` and nothing is replayed."""
    try:
        request = parse_request(event, max_seconds=RUNTIME.settings.max_seconds)
    except ValueError as exc:
        return {"error": str(exc)}
    return RUNTIME.replayer.run(request).to_dict()
