"""The SQS audit queue: audit batches survive a broker outage; only the fabric's functions send."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from fabric.naming import audit_queue_name
from stacks.constructs.queues import address
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.resolve import render
from tests.infra.test_functions import fabric_functions, services
from tests.infra.test_redrive import listed, statements

# The functions that emit audit batches, by their descriptions.
SENDERS = {
    "router": "routes messages",
    "drain": "drains the fallback",
    "redrive": "redrives dead letters",
    "replay": "replays archived messages",
}
# The one function that reads the queue (its grants: tests/infra/test_audit_writer_infra.py).
CONSUMER = "writes audit batches"


def _queues(env: Synthesized) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        q["Properties"]["QueueName"]: (logical_id, q)
        for logical_id, q in env.resources("AWS::SQS::Queue").items()
    }


def _function(template: dict[str, Any], which: str) -> dict[str, Any]:
    (function,) = [
        f
        for f in fabric_functions(template).values()
        if SENDERS[which] in f["Properties"]["Description"]
    ]
    return function


def _arn(env: Synthesized, name: str) -> str:
    return f"arn:aws:sqs:{env.region}:{env.stage.stateful.account}:{name}"


def test_the_audit_queue_is_encrypted_and_dead_letters_after_a_day_of_receives(
    env: Synthesized,
) -> None:
    name = audit_queue_name(env.stage.stage_name)
    assert name == f"fabric-{env.stage.stage_name}-audit"
    queues = _queues(env)
    queue_id, queue = queues[name]
    dlq_id, dlq = queues[f"{name}-dlq"]
    for props in (queue["Properties"], dlq["Properties"]):
        assert props["KmsMasterKeyId"]["Fn::GetAtt"][0].startswith("KeysQueues")
        assert props["MessageRetentionPeriod"] == 14 * 24 * 3600
    # Six times the audit writer's 5-minute timeout (AWS's advice for an SQS event source; Lambda
    # refuses a mapping whose queue hides a message for less than the function's timeout).
    assert queue["Properties"]["VisibilityTimeout"] == 1800
    # SQS counts every receive, also those of batches Lambda throttled (the writer runs one
    # instance at a time): a batch is parked after a day of receives, not after 5 hours.
    assert queue["Properties"]["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": [dlq_id, "Arn"]},
        "maxReceiveCount": 48,
    }
    assert 48 * queue["Properties"]["VisibilityTimeout"] == 24 * 3600
    assert dlq["Properties"]["RedriveAllowPolicy"] == {
        "redrivePermission": "byQueue",
        "sourceQueueArns": [_arn(env, name)],
    }
    # TLS only, on both.
    for logical_id in (queue_id, dlq_id):
        (policy,) = [
            p
            for p in env.resources("AWS::SQS::QueuePolicy").values()
            if p["Properties"]["Queues"] == [{"Ref": logical_id}]
        ]
        (deny,) = [
            s
            for s in policy["Properties"]["PolicyDocument"]["Statement"]
            if "aws:SecureTransport" in json.dumps(s)
        ]
        assert deny["Effect"] == "Deny"
        assert deny["Action"] == "sqs:*"
        assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    # Who may send: tests/infra/test_queue_policies.py.


def test_the_audit_queue_and_its_dlq_are_outputs(env: Synthesized) -> None:
    queues = _queues(env)
    name = audit_queue_name(env.stage.stage_name)
    outputs = env.json["Outputs"]
    assert outputs["AuditQueueUrl"]["Value"] == {"Ref": queues[name][0]}
    assert outputs["AuditDlqUrl"]["Value"] == {"Ref": queues[f"{name}-dlq"][0]}


@pytest.mark.parametrize("which", sorted(SENDERS))
def test_the_senders_find_the_audit_queue_by_its_url(
    env: Synthesized, assembly: Assembly, which: str
) -> None:
    function = _function(services(env, assembly), which)
    url = render(function["Properties"]["Environment"]["Variables"]["AUDIT_QUEUE_URL"])
    name = audit_queue_name(env.stage.stage_name)
    account = env.stage.stateful.account
    # SQS's QueueUrl of the queue (what the stateful stack's AuditQueueUrl output gives).
    assert url == f"https://sqs.{env.region}.amazonaws.com/{account}/{name}"
    stateful = env.stage.stateful
    assert url == render(stateful.resolve(address(stateful, stateful.audit_queue.queue).url))


def test_no_other_function_is_given_the_audit_queue(env: Synthesized, assembly: Assembly) -> None:
    template = services(env, assembly)
    name = audit_queue_name(env.stage.stage_name)
    others = [
        f
        for f in fabric_functions(template).values()
        if not any(what in f["Properties"]["Description"] for what in (*SENDERS.values(), CONSUMER))
    ]
    # the topology custom resource's function, the compliance report, the password rotation,
    # the broker metrics
    assert len(others) == 4
    for function in others:
        assert "AUDIT_QUEUE_URL" not in function["Properties"]["Environment"]["Variables"]
        # The queue (or its DLQ) as the end of an ARN or URL; the writer's name
        # fabric-<env>-audit-writer, which the compliance report reads under, is no queue.
        named = re.compile(rf"[:/]{re.escape(name)}(-dlq)?(?![\w-])")
        assert not named.search(json.dumps(statements(template, function)))


@pytest.mark.parametrize("which", sorted(SENDERS))
def test_the_senders_may_only_send_to_the_audit_queue(
    env: Synthesized, assembly: Assembly, which: str
) -> None:
    template = services(env, assembly)
    function = _function(template, which)
    granted = statements(template, function)
    name = audit_queue_name(env.stage.stage_name)
    queue_arn, dlq_arn = _arn(env, name), _arn(env, f"{name}-dlq")

    (audit,) = [s for s in granted if s.get("Sid") == "AuditBatches"]
    assert (audit["Effect"], audit["Action"], audit["Resource"]) == (
        "Allow",
        "sqs:SendMessage",
        queue_arn,
    )
    # Sending to the SSE-KMS queue needs the queues key through SQS, which every function's
    # managed policy already holds (no second grant of it for the audit queue).
    (key,) = [s for s in granted if s.get("Sid") == "OwnDeadLetterQueueKey"]
    assert "KeysQueues" in json.dumps(key["Resource"])
    assert key["Condition"] == {
        "StringEquals": {"kms:ViaService": f"sqs.{env.region}.amazonaws.com"}
    }

    # Nothing else on the audit queue or its DLQ, but the redrive's own work on the pair.
    for statement in granted:
        if statement is audit:
            continue
        resources = listed(statement["Resource"])
        if which != "redrive":
            assert queue_arn not in resources, statement
            assert dlq_arn not in resources, statement
        elif queue_arn in resources:
            assert statement["Sid"] == "PutBackAtSource", statement
        elif dlq_arn in resources:
            assert statement["Sid"] in {"ReadDeadLetters", "MoveDeadLetters"}, statement

    if which != "redrive":
        # Besides the audit queue, only Lambda's write of a failed event to its own async DLQ
        # (the redrive's sends to its sources: tests/infra/test_redrive.py).
        sends = [
            resource
            for s in granted
            if "sqs:SendMessage" in listed(s["Action"])
            for resource in listed(s["Resource"])
        ]
        assert len(sends) == 2, sends
        assert queue_arn in sends
        (own,) = [r for r in sends if r != queue_arn]
        assert "AsyncDlq" in json.dumps(own), own
