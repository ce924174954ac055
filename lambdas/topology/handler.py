"""Topology function: applies the broker topology through the management API, for CloudFormation
(the custom resource) and for the runbook (``topology diff``, ``topology apply``)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from fabric.custom_resource import ANSWER_MARGIN_S, respond
from fabric.topology_resource import is_cloudformation_event, on_event, on_request


def handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """A CloudFormation request is answered at its ``ResponseURL``, always (SUCCESS or FAILED
    with the reason), and before the function's timeout: killed there, it would answer nothing
    and the deploy would wait for the resource's ServiceTimeout without a reason.

    Any other event is an operator's request from the runbook (``fabric.topology_resource.
    on_request``): the diff or apply report is the function's answer, within the same deadline;
    a malformed request gets ``{"error": ...}`` and changes nothing."""
    remaining = context.get_remaining_time_in_millis() / 1000
    deadline = time.monotonic() + remaining - ANSWER_MARGIN_S
    if not is_cloudformation_event(event):
        return on_request(event, os.environ, deadline=deadline)
    return respond(
        event,
        context.log_stream_name,
        lambda _request, _props: on_event(event, os.environ, deadline=deadline),
    )
