"""The runbook's drain command against moto's SQS: what an operator sees and what it invokes."""

from __future__ import annotations

import io
import json
from typing import Any

import boto3
import pytest

from scripts import runbook
from tests.integration.aws_fallback import REGION, create_fallback_path

pytestmark = pytest.mark.integration


class DrainFunction:
    """Stands in for the Lambda API's invoke (moto cannot run functions without Docker)."""

    def __init__(self, answer: dict[str, Any], *, error: bool = False) -> None:
        self.answer, self.error = answer, error
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
        assert InvocationType == "RequestResponse"
        self.calls.append((FunctionName, json.loads(Payload)))
        answer: dict[str, Any] = {"Payload": io.BytesIO(json.dumps(self.answer).encode())}
        if self.error:
            answer["FunctionError"] = "Unhandled"
        return answer


def park(aws: dict[str, Any], flow: str, group: str, count: int) -> None:
    for _ in range(count):
        aws["sqs"].send_message(QueueUrl=aws["queues"][(flow, group)], MessageBody="{}")


def run(function: DrainFunction, *args: str, **options: Any) -> tuple[int, str]:
    out = io.StringIO()
    clients = {"sqs": boto3.client("sqs", region_name=REGION), "lambda": function}
    status = runbook.drain("test", client=clients.__getitem__, out=out, **options)
    return status, out.getvalue()


def test_a_dry_run_shows_every_fallback_queue_and_moves_nothing(aws: dict[str, Any]) -> None:
    from fabric.stakeholders import Stakeholder

    park(aws, "emergency", Stakeholder.GOVERNMENT, 3)
    park(aws, "fallback", Stakeholder.MEDIA, 2)
    function = DrainFunction({})
    status, output = run(function, max_messages=None, dry_run=True)
    assert status == 0
    assert function.calls == []
    lines = [line for line in output.splitlines() if line.startswith("  fabric-test-")]
    assert len(lines) == 20  # each fallback queue and its subscription's DLQ
    assert lines[0].split()[:2] == ["fabric-test-emergency-government", "3"]  # emergencies first
    assert lines[1].split()[:2] == ["fabric-test-emergency-government-sub-dlq", "0"]
    assert "up to 5 message copies; nothing moved" in output
    left = aws["sqs"].get_queue_attributes(
        QueueUrl=aws["queues"][("fallback", Stakeholder.MEDIA)],
        AttributeNames=["ApproximateNumberOfMessages"],
    )
    assert left["Attributes"]["ApproximateNumberOfMessages"] == "2"


def test_a_drain_invokes_the_environments_function_and_reports_what_moved(
    aws: dict[str, Any],
) -> None:
    report = {"moved": {"fabric.media": 2}, "total": 2, "left": 0, "stopped": "empty"}
    function = DrainFunction(report)
    status, output = run(function, max_messages=50, dry_run=False)
    assert status == 0
    assert function.calls == [("fabric-test-drain", {"max_messages": 50})]
    assert "moved       2 into fabric.media" in output
    assert "summary: moved 2, received and not moved 0, stopped: empty" in output


def test_a_drain_that_a_full_work_queue_refused_exits_1_and_says_what_stays_in_sqs(
    aws: dict[str, Any],
) -> None:
    # The drain ran to "empty" for the other queues; fabric.community was full, so its 10
    # messages are still in the fallback queue: the operator must not read that as done.
    report = {
        "moved": {"fabric.media": 2},
        "total": 2,
        "left": 10,
        "stopped": "empty",
        "refused": ["fabric.community"],
    }
    status, output = run(DrainFunction(report), max_messages=None, dry_run=False)
    assert status == 1
    assert (
        "fabric.community refused messages (full or stalled?): they stay in the fallback queue"
        in output
    )
    assert "summary: moved 2, received and not moved 10, stopped: empty" in output


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ({"moved": {}, "total": 0, "left": 0, "stopped": "broker unavailable"}, False),
        ({"errorMessage": "Task timed out after 300.00 seconds"}, True),
    ],
)
def test_a_drain_that_stops_early_or_fails_exits_1_with_the_reason(
    aws: dict[str, Any], answer: dict[str, Any], error: bool
) -> None:
    status, output = run(DrainFunction(answer, error=error), max_messages=None, dry_run=False)
    assert status == 1
    assert ("broker unavailable" in output) or ("Task timed out" in output)


def test_the_cli_finds_the_queues_of_the_environment_named_in_cdk_json(
    aws: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    create_fallback_path("fabric-dev")
    assert runbook.main(["drain", "--env", "dev", "--dry-run"]) == 0
    assert "fabric-dev-emergency-government" in capsys.readouterr().out


def test_the_cli_refuses_an_unknown_environment(capsys: pytest.CaptureFixture[str]) -> None:
    assert runbook.main(["drain", "--env", "qa", "--dry-run"]) == 2
    assert "unknown environment 'qa'" in capsys.readouterr().out


def test_a_drain_that_met_copies_of_other_groups_exits_1_and_names_the_alarm(
    aws: dict[str, Any],
) -> None:
    # A subscription lost its filter: fabric.media's queue held two of academic's messages.
    report = {
        "moved": {"fabric.media": 1},
        "total": 1,
        "left": 2,
        "stopped": "empty",
        "refused": [],
        "misdelivered": 2,
    }
    status, output = run(DrainFunction(report), max_messages=None, dry_run=False)
    assert status == 1
    assert (
        "2 copies in a group's queue not published for that group: not moved "
        "(see FallbackMisdelivered)" in output
    )
    assert "summary: moved 1, received and not moved 2, stopped: empty" in output
