"""CloudFormation custom-resource plumbing: run an action, always answer CloudFormation.

CloudFormation waits (up to an hour) for a response at the event's pre-signed ``ResponseURL``;
a handler that crashes without answering stalls the deploy. ``respond`` therefore catches every
error, answers FAILED with the error's class and message, and re-raises nothing.

A Create that fails answers with a physical id of its own (``<logical id>-create-failed-<request
id>``), never an id a successful Create answers: the rollback then sends a Delete with that id,
and the action (which removes anything only under an id that a successful Create or Update
answered) removes nothing an earlier, healthy resource manages. Every other answer carries the
id CloudFormation sent (it wants the same id in every response for a resource; a Delete never
changes it), or the logical id when a request has none (CloudFormation always sends one with
Update and Delete).

CloudFormation refuses a response body over 4096 bytes: the ``Reason`` is cut so that the whole
encoded document fits (JSON escapes a non-ASCII character into 6 or 12 bytes).
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

_LOG = logging.getLogger(__name__)
# Reason strings are shown in the CloudFormation console; keep them short and secret-free.
_MAX_REASON = 1000
# CloudFormation's limit on the whole response body.
MAX_RESPONSE_BYTES = 4096
FAILED_CREATE = "-create-failed-"
# Kept free before the function's timeout for the answer itself (``_put`` waits up to 30 s).
ANSWER_MARGIN_S = 40.0


def respond(
    event: Mapping[str, Any],
    log_stream_name: str,
    action: Callable[[str, Mapping[str, Any]], tuple[str, dict[str, str]]],
    *,
    send: Callable[[str, bytes], None] | None = None,
) -> dict[str, Any]:
    """Run ``action(request_type, properties)`` → (physical id, data) and report the result.

    The action's physical id answers a Create or an Update; a Delete answers the request's.
    Returns the response document that was sent (for tests and logs).
    """
    physical_id = str(event.get("PhysicalResourceId") or event.get("LogicalResourceId", "resource"))
    status, reason = "SUCCESS", "OK"
    data: dict[str, str] = {}
    try:
        answered, data = action(str(event["RequestType"]), event.get("ResourceProperties", {}))
        if event.get("RequestType") != "Delete":
            physical_id = answered
    except Exception as exc:  # CloudFormation must always get an answer
        _LOG.exception("custom resource %s failed", event.get("RequestType"))
        status, reason = "FAILED", f"{type(exc).__name__}: {exc}"[:_MAX_REASON]
        if event.get("RequestType") == "Create":
            physical_id = f"{event.get('LogicalResourceId')}{FAILED_CREATE}{event.get('RequestId')}"
    document = {
        "Status": status,
        "Reason": "",
        "PhysicalResourceId": physical_id,
        "StackId": event.get("StackId"),
        "RequestId": event.get("RequestId"),
        "LogicalResourceId": event.get("LogicalResourceId"),
        "NoEcho": False,
        "Data": data,
    }
    body = _fitted(document, reason, f" (log stream {log_stream_name})")
    (send or _put)(str(event["ResponseURL"]), body)
    return document


def _fitted(document: dict[str, Any], reason: str, suffix: str) -> bytes:
    """The encoded ``document`` with ``reason + suffix`` as its ``Reason``, ``reason`` cut to
    what fits in ``MAX_RESPONSE_BYTES`` (the log stream in ``suffix`` always stays)."""
    document["Reason"] = suffix
    room = MAX_RESPONSE_BYTES - len(json.dumps(document).encode())
    kept = 0
    for character in reason:
        room -= len(json.dumps(character)) - 2  # its size inside a JSON string
        if room < 0:
            break
        kept += 1
    document["Reason"] = reason[:kept] + suffix
    return json.dumps(document).encode()


def _put(url: str, body: bytes) -> None:
    if not url.startswith("https://"):
        raise ValueError("CloudFormation response URLs are https")
    request = urllib.request.Request(  # noqa: S310 (https checked above)
        url, data=body, method="PUT", headers={"content-type": "", "content-length": str(len(body))}
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (https checked)
        response.read()
