"""The replay function: on demand, one at a time, read-only on the audit trail, broker only."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fabric.compliance_run import ANSWER_MARGIN_S
from fabric.naming import audit_queue_name
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.test_audit_writer_infra import BUCKET, BUCKET_ARN, Trail, _allows
from tests.infra.test_functions import fabric_functions, of_type
from tests.infra.test_redrive import BROKER_VARIABLES, listed, statements

# Everything that would change the trail or the bucket: no role of the replay may do any of it.
WRITES_TO_THE_BUCKET = (
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:DeleteObjectVersion",
    "s3:PutObjectRetention",
    "s3:BypassGovernanceRetention",
    "s3:PutObjectLegalHold",
    "s3:PutObjectAcl",
    "s3:RestoreObject",
    "s3:PutBucketPolicy",
    "s3:DeleteBucket",
    "s3:DeleteBucketPolicy",
    "s3:PutBucketObjectLockConfiguration",
    "s3:PutLifecycleConfiguration",
    "s3:PutBucketVersioning",
)


def replay(template: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    ((item),) = (
        (k, v)
        for k, v in fabric_functions(template).items()
        if "replays archived messages" in v["Properties"]["Description"]
    )
    return item


@pytest.fixture
def trail(env: Synthesized, assembly: Assembly) -> Trail:
    return Trail(env, assembly)


def test_the_replay_is_named_bounded_and_runs_one_at_a_time(trail: Trail) -> None:
    template = trail.services
    logical_id, function = replay(template)
    props = function["Properties"]
    # The runbook invokes it by this name (scripts/runbook.py replay --env <env>).
    assert props["FunctionName"] == f"fabric-{trail.env.stage.stage_name}-replay"
    assert props["ReservedConcurrentExecutions"] == 1
    assert (props["Timeout"], props["MemorySize"]) == (900, 2048)
    assert len(props["VpcConfig"]["SubnetIds"]) >= 2
    (config,) = [
        c
        for c in of_type(template, "AWS::Lambda::EventInvokeConfig").values()
        if c["Properties"]["FunctionName"] == {"Ref": logical_id}
    ]
    assert config["Properties"]["MaximumRetryAttempts"] == 0
    # The topology (the exchanges it publishes to) is applied before it exists.
    topology = next(iter(of_type(template, "Custom::FabricTopology")))
    assert topology in function["DependsOn"]


def test_the_replay_gets_exactly_the_variables_its_settings_read(trail: Trail) -> None:
    _, function = replay(trail.services)
    variables = function["Properties"]["Environment"]["Variables"]
    assert set(variables) == {
        *BROKER_VARIABLES,
        "AUDIT_BUCKET",
        "AUDIT_WRITERS",
        "SIGNING_KEY_ARN",
        "REPLAY_MAX_SECONDS",
        "AUDIT_QUEUE_URL",
    }
    # It verifies the deployed writer's trail, with the key that writer signs checkpoints with.
    assert variables["AUDIT_WRITERS"] == f"fabric-{trail.env.stage.stage_name}-audit-writer"
    assert trail.render(variables["SIGNING_KEY_ARN"]) == trail.signing_key_arn
    assert variables["FABRIC_ENV"] == trail.env.stage.stage_name
    assert (variables["RABBITMQ_PORT"], variables["RABBITMQ_TLS"]) == ("5671", "true")
    assert trail.render(variables["AUDIT_BUCKET"]) == BUCKET
    assert "BrokerUsersfabricplatform" in json.dumps(variables["RABBITMQ_SECRET_ARN"])
    # Two minutes inside the 15-minute timeout, as the compliance report keeps.
    assert variables["REPLAY_MAX_SECONDS"] == "780"
    assert function["Properties"]["Timeout"] - 780 >= ANSWER_MARGIN_S
    assert audit_queue_name(trail.env.stage.stage_name) in trail.render(
        variables["AUDIT_QUEUE_URL"]
    )
    assert "password" not in json.dumps(variables).lower()


def test_nothing_invokes_the_replay_but_an_operator(trail: Trail) -> None:
    template = trail.services
    logical_id, _ = replay(template)
    for kind in ("AWS::Events::Rule", "AWS::Scheduler::Schedule", "AWS::Lambda::Permission"):
        for resource in of_type(template, kind).values():
            assert logical_id not in json.dumps(resource), (kind, resource)
    for mapping in of_type(template, "AWS::Lambda::EventSourceMapping").values():
        assert mapping["Properties"]["FunctionName"] != {"Ref": logical_id}


def test_the_replay_lists_and_reads_only_the_writers_records_checkpoints_and_archive(
    trail: Trail,
) -> None:
    _, function = replay(trail.services)
    granted = statements(trail.services, function)
    writer = f"fabric-{trail.env.stage.stage_name}-audit-writer"
    prefixes = [f"{root}/{writer}/" for root in ("audit", "checkpoints", "archive")]
    s3 = [s for s in granted if any(a.startswith("s3:") for a in listed(s["Action"]))]
    by_action = {tuple(listed(s["Action"])): s for s in s3}
    assert set(by_action) == {("s3:ListBucket",), ("s3:ListBucketVersions",), ("s3:GetObject",)}
    listing = by_action[("s3:ListBucket",)]
    assert trail.render(listing["Resource"]) == BUCKET_ARN
    assert listing["Condition"] == {"StringLike": {"s3:prefix": [f"{p}*" for p in prefixes]}}
    # Delete markers (fabric.compliance_run.deleted_in_window) are looked for in the records
    # and checkpoints.
    versions = by_action[("s3:ListBucketVersions",)]
    assert trail.render(versions["Resource"]) == BUCKET_ARN
    assert versions["Condition"] == {
        "StringLike": {"s3:prefix": [f"audit/{writer}/*", f"checkpoints/{writer}/*"]}
    }
    reading = by_action[("s3:GetObject",)]
    assert "Condition" not in reading
    assert sorted(trail.render(r) for r in listed(reading["Resource"])) == sorted(
        f"{BUCKET_ARN}/{p}*" for p in prefixes
    )
    # No other writer's trail, nor any other object of the bucket.
    for key in (
        "audit/fabric-x-audit-writer/2026/12/01/000000000001-000000000001.jsonl",
        "checkpoints/fabric-x-audit-writer/00000001.json",
        "reports/2026.json",
    ):
        assert not any(
            _allows(s, "s3:GetObject", [f"{BUCKET_ARN}/{key}"], trail, stateful=False)
            for s in granted
        ), key


def test_the_replay_can_change_nothing_in_the_audit_bucket(trail: Trail) -> None:
    _, function = replay(trail.services)
    granted = statements(trail.services, function)
    resources = [BUCKET_ARN, f"{BUCKET_ARN}/audit/x", f"{BUCKET_ARN}/archive/x", f"{BUCKET_ARN}/x"]
    for statement in granted:
        for action in WRITES_TO_THE_BUCKET:
            assert not _allows(statement, action, resources, trail, stateful=False), (
                action,
                statement,
            )


def test_the_replay_uses_each_key_only_to_decrypt_through_its_service_and_to_verify(
    trail: Trail,
) -> None:
    _, function = replay(trail.services)
    granted = statements(trail.services, function)
    region = trail.region
    by_sid = {s.get("Sid"): s for s in granted}
    # Checkpoints are verified with the signing key: Verify only, with the writer's algorithm.
    verify = by_sid.pop("VerifyCheckpoints")
    assert listed(verify["Action"]) == ["kms:Verify"]
    assert trail.render(verify["Resource"]) == trail.signing_key_arn
    assert verify["Condition"] == {"StringEquals": {"kms:SigningAlgorithm": "ECDSA_SHA_256"}}
    granted = [s for s in granted if s is not verify]
    audit_key = by_sid["AuditKeyThroughS3"]
    assert listed(audit_key["Action"]) == ["kms:Decrypt"]
    key_id, _ = trail.stateful_resource(audit_key["Resource"])
    assert key_id.startswith("KeysAudit")
    condition = audit_key["Condition"]["StringEquals"]
    assert condition["kms:ViaService"] == f"s3.{region}.amazonaws.com"
    assert trail.render(condition["kms:EncryptionContext:aws:s3:arn"]) == BUCKET_ARN
    for statement in granted:
        actions = listed(statement["Action"])
        if not any(a.startswith("kms:") for a in actions):
            continue
        assert statement["Resource"] != "*", statement
        assert trail.signing_key_arn not in [trail.render(r) for r in listed(statement["Resource"])]
        # Every KMS grant goes through the service that holds the data.
        assert "kms:ViaService" in json.dumps(statement.get("Condition")), statement
        if statement is not audit_key:
            assert "KeysAudit" not in json.dumps(statement["Resource"]), statement
        # It publishes the stored ciphertext: nothing on the messages key, to decrypt or seal.
        assert "KeysMessages" not in json.dumps(statement["Resource"]), statement


def test_the_replay_publishes_through_the_broker_only_and_audits_through_the_audit_queue(
    trail: Trail,
) -> None:
    _, function = replay(trail.services)
    granted = statements(trail.services, function)
    actions = {a for s in granted for a in listed(s["Action"])}
    assert not any(a.startswith("sns:") for a in actions), actions  # no fallback topics
    assert not any(a.startswith(("dynamodb:", "kms:Sign", "mq:")) for a in actions), actions
    sends = [s for s in granted if "sqs:SendMessage" in listed(s["Action"])]
    targets = {
        trail.render(r) if isinstance(r, str) else json.dumps(r)
        for s in sends
        for r in listed(s["Resource"])
    }
    name = audit_queue_name(trail.env.stage.stage_name)
    audit_arn = f"arn:aws:sqs:{trail.region}:{trail.account}:{name}"
    assert audit_arn in targets
    # Besides the audit queue, only Lambda's write of a failed event to its own async DLQ.
    (own,) = targets - {audit_arn}
    assert "ReplayAsyncDlq" in own
    secret_reads = [s for s in granted if "secretsmanager:GetSecretValue" in listed(s["Action"])]
    assert len(secret_reads) == 1
    assert "BrokerUsersfabricplatform" in json.dumps(secret_reads[0]["Resource"])
    for statement in granted:
        if statement["Resource"] == "*":
            assert all(a.startswith(("xray:", "ec2:")) for a in listed(statement["Action"]))


def test_replay_errors_page_on_the_alarms_topic_and_its_async_dlq_is_watched(
    trail: Trail,
) -> None:
    template = trail.services
    replay_id, function = replay(template)
    (topic_id,) = [
        logical_id
        for logical_id, topic in of_type(template, "AWS::SNS::Topic").items()
        if topic["Properties"]["TopicName"] == f"fabric-{trail.env.stage.stage_name}-alarms"
    ]
    (alarm,) = [
        a["Properties"]
        for logical_id, a in of_type(template, "AWS::CloudWatch::Alarm").items()
        if logical_id.startswith("ReplayErrors")
    ]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/Lambda", "Errors")
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": replay_id}}]
    assert (alarm["Statistic"], alarm["Period"], alarm["Threshold"]) == ("Sum", 300, 1)
    assert alarm["AlarmActions"] == alarm["OKActions"] == [{"Ref": topic_id}]

    dlq_id = function["Properties"]["DeadLetterConfig"]["TargetArn"]["Fn::GetAtt"][0]
    watched = [
        dimension["Value"]
        for logical_id, alarm in of_type(template, "AWS::CloudWatch::Alarm").items()
        if logical_id.startswith("DeadLetterAlarmsFunctionDlqDepth")
        for query in alarm["Properties"]["Metrics"]
        if "MetricStat" in query
        for dimension in query["MetricStat"]["Metric"]["Dimensions"]
        if dimension["Name"] == "QueueName"
    ]
    assert {"Fn::GetAtt": [dlq_id, "QueueName"]} in watched
