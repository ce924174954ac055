"""Topology custom resource: applies the broker topology through the management API."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from fabric.custom_resource import ANSWER_MARGIN_S, respond
from fabric.topology_resource import on_event


def handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """Answer CloudFormation, always (SUCCESS or FAILED with the reason), and before the
    function's timeout: killed there, it would answer nothing and the deploy would wait for the
    resource's ServiceTimeout without a reason."""
    remaining = context.get_remaining_time_in_millis() / 1000
    deadline = time.monotonic() + remaining - ANSWER_MARGIN_S
    return respond(
        event,
        context.log_stream_name,
        lambda request, _props: on_event(
            request, os.environ, physical_id=event.get("PhysicalResourceId"), deadline=deadline
        ),
    )
