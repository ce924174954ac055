"""Drain Lambda: moves fallback-queue messages back into RabbitMQ (scheduled, or on demand)."""

from __future__ import annotations

from typing import Any

from fabric.bootstrap import drainer_from_environment

DRAINER = drainer_from_environment()


def handler(event: dict[str, Any], _context: Any) -> dict[str, Any]:
    """``{"max_messages"?: n}`` or a scheduled event → ``{"moved": {queue: n}, "total", "left",
    "stopped", "refused": [work queues that refused messages]}``, and ``"misdelivered": n``
    when the run found copies in a group's queue that were not published for that group (not
    moved: they are in ``left`` too); a bad ``max_messages`` → ``{"error": ...}`` and nothing
    is moved."""
    limit = event.get("max_messages") if isinstance(event, dict) else None
    if limit is not None and (type(limit) is not int or limit < 1):
        return {"error": "max_messages must be a positive whole number"}
    report = DRAINER.drain(max_messages=limit)
    answer: dict[str, Any] = {
        "moved": report.moved,
        "total": report.total,
        "left": report.left,
        "stopped": report.stopped,
        "refused": report.refused,
    }
    if report.misdelivered:
        answer["misdelivered"] = report.misdelivered
    return answer
