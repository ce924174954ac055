"""The runbook's report command: what an operator sees, with the real report function behind a
stand-in for Lambda's invoke (moto cannot run functions without Docker)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import pytest

from fabric.adapters.audit_storage import S3ObjectStore
from scripts import runbook
from tests.integration.test_compliance_report_handler import (  # noqa: F401 (fixtures)
    AUDIT_BUCKET,
    REPORTS_BUCKET,
    WRITER,
    Fabric,
    aws,
    fabric,
    handler,
    reports,
)

pytestmark = pytest.mark.integration


class ReportFunction:
    """Lambda's invoke, running the handler in this process (or answering as told)."""

    def __init__(self, function: ModuleType | None, *, answer: Any = None) -> None:
        self.handler, self.answer = function, answer
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
        assert InvocationType == "RequestResponse"
        event = json.loads(Payload)
        self.calls.append((FunctionName, event))
        if self.handler is None:
            return {
                "Payload": io.BytesIO(json.dumps(self.answer).encode()),
                "FunctionError": "Unhandled",
            }
        result = self.handler.handler(event, None)
        return {"Payload": io.BytesIO(json.dumps(result).encode())}


def run(function: ReportFunction, request: dict[str, Any]) -> tuple[int, str]:
    out = io.StringIO()
    clients = {"lambda": function}
    status = runbook.report("test", client=clients.__getitem__, request=request, out=out)
    return status, out.getvalue()


def test_a_report_prints_the_verdict_the_figures_and_where_the_files_are(
    handler: ModuleType,  # noqa: F811
    fabric: Fabric,  # noqa: F811
    aws: dict[str, Any],  # noqa: F811
) -> None:
    function = ReportFunction(handler)
    status, output = run(function, {"date": "2026-11-20"})
    assert status == 0
    assert function.calls == [("fabric-test-compliance-report", {"date": "2026-11-20"})]
    assert "2026-11-20T00:00:00Z to 2026-11-21T00:00:00Z" in output
    assert "accepted                   72" in output
    assert "emergency latency p99      40.0 ms" in output
    assert "encryption coverage        100.00 %" in output
    base = f"s3://{REPORTS_BUCKET}/compliance/test/2026/11/20/2026-11-20"
    assert f"html                       {base}.html" in output
    assert "summary: verified" in output
    assert len(reports(aws)) == 3


def test_a_trail_that_does_not_verify_exits_1_and_names_the_place(
    handler: ModuleType,  # noqa: F811
    fabric: Fabric,  # noqa: F811
    aws: dict[str, Any],  # noqa: F811
) -> None:
    store = S3ObjectStore(AUDIT_BUCKET, lambda: aws["s3"])
    key = store.keys(f"audit/{WRITER}/2026/11/20/")[3]
    store.put(key, store.get(key).replace(b'"rabbitmq"', b'"sqs"', 1))
    status, output = run(ReportFunction(handler), {"date": "2026-11-20"})
    assert status == 1
    assert f"NOT VERIFIED: {key}: its SHA-256 differs from the checkpoint's" in output


def test_a_refused_request_exits_2_with_the_reason_and_writes_nothing(
    handler: ModuleType,  # noqa: F811
    aws: dict[str, Any],  # noqa: F811
) -> None:
    status, output = run(ReportFunction(handler), {"date": "2026-11-31"})
    assert status == 2
    assert "refused: date '2026-11-31' is not a calendar date" in output
    assert reports(aws) == []


def test_a_failed_function_exits_1_with_its_error() -> None:
    crashed = {"errorMessage": "Task timed out after 900.00 seconds"}
    status, output = run(ReportFunction(None, answer=crashed), {"date": "2026-11-20"})
    assert status == 1
    assert "the report function failed" in output
    assert "Task timed out" in output


def test_the_cli_asks_the_environments_function_for_a_day_or_a_range(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = {
        "period": {"start": "2026-11-20T00:00:00Z", "end": "2026-11-21T00:00:00Z"},
        "verified": True,
        "problem": None,
        "records": 0,
        "accepted": 0,
        "rejected": 0,
        "delivered": 0,
        "acceptance_rate": None,
        "delivery_success_rate": None,
        "copies_undelivered": 0,
        "emergencies_accepted": 0,
        "emergency_copies_undelivered": 0,
        "emergency_latency_p99_ms": None,
        "encryption_coverage": None,
        "fallback_not_drained": 0,
        "dead_lettered": 0,
        "objects": 0,
        "unlocked_objects": 0,
        "expired_objects": 0,
        "earliest_retain_until": None,
        "report": {"bucket": "b", "json": "k.json", "html": "k.html", "csv": "k.csv"},
    }

    class Answering(ReportFunction):
        def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
            self.calls.append((FunctionName, json.loads(Payload)))
            return {"Payload": io.BytesIO(json.dumps(summary).encode())}

    function = Answering(None)
    monkeypatch.setattr(runbook, "_client", lambda service, region: function)
    assert runbook.main(["report", "--env", "dev", "--date", "2026-11-20"]) == 0
    assert runbook.main(["report", "--env", "dev", "--start", "2026-11-20T01:00:00Z",
                         "--end", "2026-11-20T02:00:00Z"]) == 0  # fmt: skip
    assert runbook.main(["report", "--env", "dev"]) == 0
    yesterday = f"{datetime.now(UTC).date() - timedelta(days=1)}"
    assert function.calls == [
        ("fabric-dev-compliance-report", {"date": "2026-11-20"}),
        (
            "fabric-dev-compliance-report",
            {"start": "2026-11-20T01:00:00Z", "end": "2026-11-20T02:00:00Z"},
        ),
        ("fabric-dev-compliance-report", {"date": yesterday}),
    ]
    assert "emergency latency p99      not recorded" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        runbook.main(["report", "--env", "dev", "--start", "2026-11-20T01:00:00Z"])
    assert usage.value.code == 2
    assert len(function.calls) == 3, "nothing invoked on bad usage"
