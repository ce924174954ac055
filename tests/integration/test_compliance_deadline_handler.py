"""The compliance report function on moto, invoked with less time left than reading its period
takes: it writes nothing, tells the compliance topic, and the runbook's ``report`` says to split
the period and exits 2, instead of the function being ended by Lambda's timeout."""

from __future__ import annotations

import io
import json
from types import ModuleType
from typing import Any

import pytest

from scripts import runbook
from tests.integration.test_compliance_report_handler import (  # noqa: F401 (fixtures)
    WRITER,
    Fabric,
    aws,
    fabric,
    handler,
    reports,
    summaries,
)

pytestmark = pytest.mark.integration


class LambdaContext:
    """The part of Lambda's context the handler reads: the invocation's time left."""

    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


class ReportFunction:
    """Lambda's invoke, running the handler in this process with ``context``."""

    def __init__(self, function: ModuleType, context: LambdaContext) -> None:
        self.function, self.context = function, context

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
        answer = self.function.handler(json.loads(Payload), self.context)
        return {"Payload": io.BytesIO(json.dumps(answer).encode())}


def test_a_period_the_function_has_no_time_for_is_not_reported_and_the_topic_is_told(
    handler: ModuleType,  # noqa: F811
    fabric: Fabric,  # noqa: F811
    aws: dict[str, Any],  # noqa: F811
) -> None:
    # 100 s left: less than the run keeps to write and publish a report once it stops reading.
    function = ReportFunction(handler, LambdaContext(remaining_ms=100_000))
    out = io.StringIO()
    status = runbook.report(
        "test", client={"lambda": function}.__getitem__, request={"date": "2026-11-20"}, out=out
    )

    assert status == 2
    printed = out.getvalue()
    assert (
        "refused: the period 2026-11-20T00:00:00Z to 2026-11-21T00:00:00Z is too long to read"
        f" within the function's time (stopped before the trail of {WRITER}); nothing was"
        " written: report it in shorter periods (runbook.py report --start/--end)"
    ) in printed
    assert reports(aws) == []
    (notice,) = summaries(aws)
    assert notice["Subject"] == "Messaging Fabric test compliance 2026-11-20: NOT REPORTED"
    assert notice["MessageAttributes"]["verified"]["Value"] == "false"
    body = json.loads(notice["Message"])
    assert (body["verified"], body["reported"]) == (False, False)
    assert "too long to read" in body["problem"]


def test_with_the_functions_whole_time_the_day_is_reported(
    handler: ModuleType,  # noqa: F811
    fabric: Fabric,  # noqa: F811
    aws: dict[str, Any],  # noqa: F811
) -> None:
    summary = handler.handler({"date": "2026-11-20"}, LambdaContext(remaining_ms=900_000))
    assert summary["verified"] is True
    assert len(reports(aws)) == 3
