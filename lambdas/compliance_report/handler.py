"""Compliance report Lambda: the daily schedule (the previous UTC day) and on-demand requests
(``{"date": "YYYY-MM-DD"}`` or ``{"start": ..., "end": ...}``)."""

from __future__ import annotations

from typing import Any

from fabric.bootstrap import compliance_reporter_from_environment
from fabric.compliance_run import InvalidReportRequest, requested_period

REPORTER = compliance_reporter_from_environment()


def handler(event: Any, context: Any) -> dict[str, Any]:
    """Report the requested period → its summary (verdict, figures, the report's S3 keys).

    A request that names no valid period → ``{"error": ...}``, and nothing is read or written.
    A period too long to read in the invocation's time → ``{"error": ...}`` saying so, also
    published to the compliance topic, and nothing is written (``ComplianceReporter.run``); it
    is not retried, as it would run out of time again.
    A failure to read the trail or to store or publish the report raises, so the schedule's
    asynchronous invocation is retried (and lands in the function's DLQ after the retries).
    In-process callers (``make run``, tests) pass no context: no time limit.
    """
    try:
        period = requested_period(event)
    except InvalidReportRequest as exc:
        return {"error": str(exc)}
    if context is None:
        return REPORTER.run(period)
    return REPORTER.run(period, time_left=lambda: context.get_remaining_time_in_millis() / 1000)
