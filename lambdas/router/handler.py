"""Router Lambda: direct invoke, HTTPS (API Gateway HTTP API) and SQS ingest, one handler."""

from __future__ import annotations

from typing import Any

from fabric.bootstrap import router_runtime, settle_after_init
from fabric.entrypoints import dispatch

# Built once per container at import, reused by warm invocations (connection, caches).
RUNTIME = router_runtime()
settle_after_init()


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Route the event's messages; the answer's shape depends on the entry point."""
    return dispatch(event, context.invoked_function_arn, RUNTIME)
