"""Redrive Lambda: moves dead letters back to where they came from (on demand, by the runbook)."""

from __future__ import annotations

from typing import Any

from fabric.bootstrap import redrive_from_environment
from fabric.redrive import parse_request

RUNTIME = redrive_from_environment()


def handler(event: dict[str, Any], _context: Any) -> dict[str, Any]:
    """A redrive request (``fabric.redrive.parse_request``) → the run's report; a malformed
    request or an unknown queue → ``{"error": ...}`` and nothing is moved."""
    try:
        request = parse_request(event, max_seconds=RUNTIME.settings.max_seconds)
        queue = RUNTIME.queue(request.source, request.queue)
    except ValueError as exc:
        return {"error": str(exc)}
    return RUNTIME.redriver.run(queue, request.plan).to_dict()
