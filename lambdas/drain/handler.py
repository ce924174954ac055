"""Drain Lambda: moves fallback-queue messages back into RabbitMQ (scheduled, or on demand)."""

from __future__ import annotations

from typing import Any

from fabric.bootstrap import drainer_from_environment

DRAINER = drainer_from_environment()


def handler(event: dict[str, Any], _context: Any) -> dict[str, Any]:
    """``{"max_messages"?: n}`` → ``{"moved": {queue: n}, "total", "left", "stopped"}``."""
    limit = event.get("max_messages") if isinstance(event, dict) else None
    options = {"max_messages": limit} if isinstance(limit, int) and limit > 0 else {}
    report = DRAINER.drain(**options)
    return {
        "moved": report.moved,
        "total": report.total,
        "left": report.left,
        "stopped": report.stopped,
    }
