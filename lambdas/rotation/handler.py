"""Password rotation: Secrets Manager's four rotation steps for a RabbitMQ user's secret."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fabric.rotation import on_event


def handler(event: Mapping[str, Any], context: Any) -> None:
    """Run the event's step; an error fails the invocation, and Secrets Manager retries."""
    on_event(event, os.environ)
