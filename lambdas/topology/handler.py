"""Topology custom resource: applies the broker topology through the management API."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fabric.custom_resource import respond
from fabric.topology_resource import on_event


def handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """Answer CloudFormation, always (SUCCESS or FAILED with the reason)."""
    return respond(
        event,
        context.log_stream_name,
        lambda request, _props: on_event(
            request, os.environ, physical_id=event.get("PhysicalResourceId")
        ),
    )
