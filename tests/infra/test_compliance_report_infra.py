"""The compliance report function: read-only on the trail, write-only under compliance/<env>/,
verify-only on the signing key, a daily schedule, an encrypted TLS-only topic, its alarms."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fabric import metrics
from stacks.constructs.fallback import TOPIC_POLICY_ACTIONS
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.test_audit_writer_infra import (
    BUCKET,
    BUCKET_ARN,
    FORBIDDEN_ON_THE_BUCKET,
    Trail,
    _allows,
)
from tests.infra.test_functions import fabric_functions, of_type
from tests.infra.test_redrive import listed, statements

# Every S3 action a role could use to change or remove what is in the audit bucket.
WRITES_ON_THE_TRAIL = (
    *FORBIDDEN_ON_THE_BUCKET,
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:RestoreObject",
    "s3:PutObjectAcl",
    "s3:PutBucketPolicy",
    "s3:PutLifecycleConfiguration",
)


@pytest.fixture
def trail(env: Synthesized, assembly: Assembly) -> Trail:
    return Trail(env, assembly)


def reporter(template: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    ((item),) = (
        (k, v)
        for k, v in fabric_functions(template).items()
        if "reports a period of the audit trail" in v["Properties"]["Description"]
    )
    return item


def reports_bucket_arn(trail: Trail) -> str:
    output = trail.stateful["Outputs"]["ReportsBucketName"]["Value"]
    return f"arn:aws:s3:::{trail.render(output, stateful=True)}"


def test_the_report_is_named_sized_for_a_day_of_a_million_records(trail: Trail) -> None:
    _, function = reporter(trail.services)
    props = function["Properties"]
    name = trail.env.stage.stage_name
    # The runbook invokes it by this name (scripts/runbook.py report --env <env>).
    assert props["FunctionName"] == f"fabric-{name}-compliance-report"
    assert (props["Timeout"], props["MemorySize"]) == (900, 4096)
    assert props["ReservedConcurrentExecutions"] == 2


def test_the_report_gets_exactly_the_variables_its_settings_read(trail: Trail) -> None:
    template = trail.services
    _, function = reporter(template)
    variables = function["Properties"]["Environment"]["Variables"]
    name = trail.env.stage.stage_name
    assert set(variables) == {
        "FABRIC_ENV",
        "AUDIT_BUCKET",
        "AUDIT_WRITERS",
        "SIGNING_KEY_ARN",
        "REPORTS_BUCKET",
        "REPORTS_KEY_ARN",
        "COMPLIANCE_TOPIC_ARN",
    }
    assert variables["FABRIC_ENV"] == name
    # The chain the audit writer writes (its AUDIT_WRITER_NAME).
    assert variables["AUDIT_WRITERS"] == f"fabric-{name}-audit-writer"
    assert trail.render(variables["AUDIT_BUCKET"]) == BUCKET
    assert trail.render(variables["SIGNING_KEY_ARN"]) == trail.signing_key_arn
    reports_id, _ = trail.stateful_resource(variables["REPORTS_BUCKET"])
    reports = trail.stateful["Resources"][reports_id]
    assert reports["Type"] == "AWS::S3::Bucket"
    assert "ObjectLockEnabled" not in reports["Properties"]
    key_id, _ = trail.stateful_resource(variables["REPORTS_KEY_ARN"])
    assert key_id.startswith("KeysAudit")
    # The reports bucket's own default key: the files are encrypted as the bucket says.
    (encryption,) = reports["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    default = encryption["ServerSideEncryptionByDefault"]
    assert default["KMSMasterKeyID"]["Fn::GetAtt"][0] == key_id
    (topic_id,) = [
        k
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{name}-compliance"
    ]
    assert variables["COMPLIANCE_TOPIC_ARN"] == {"Ref": topic_id}


def test_the_report_reads_the_writers_trail_and_writes_only_its_reports(trail: Trail) -> None:
    _, function = reporter(trail.services)
    granted = statements(trail.services, function)
    writer = f"fabric-{trail.env.stage.stage_name}-audit-writer"
    s3 = {s["Sid"]: s for s in granted if any(a.startswith("s3:") for a in listed(s["Action"]))}
    assert set(s3) == {"ListTheTrail", "ReadTheTrail", "WriteReports"}

    listing = s3["ListTheTrail"]
    assert sorted(listed(listing["Action"])) == ["s3:ListBucket", "s3:ListBucketVersions"]
    assert trail.render(listing["Resource"]) == BUCKET_ARN
    assert listing["Condition"] == {
        "StringLike": {"s3:prefix": [f"audit/{writer}/*", f"checkpoints/{writer}/*"]}
    }
    read = s3["ReadTheTrail"]
    assert sorted(listed(read["Action"])) == ["s3:GetObject", "s3:GetObjectRetention"]
    assert sorted(trail.render(r) for r in listed(read["Resource"])) == [
        f"{BUCKET_ARN}/audit/{writer}/*",
        f"{BUCKET_ARN}/checkpoints/{writer}/*",
    ]
    write = s3["WriteReports"]
    assert listed(write["Action"]) == ["s3:PutObject"]
    env = trail.env.stage.stage_name
    assert trail.render(write["Resource"]) == f"{reports_bucket_arn(trail)}/compliance/{env}/*"

    # Nothing in any of its statements may change or remove anything in the audit bucket.
    bucket = [BUCKET_ARN, f"{BUCKET_ARN}/audit/{writer}/x", f"{BUCKET_ARN}/checkpoints/{writer}/x"]
    for statement in granted:
        for action in WRITES_ON_THE_TRAIL:
            assert not _allows(statement, action, bucket, trail, stateful=False), (
                action,
                statement,
            )


def test_the_report_uses_each_key_only_as_it_must(trail: Trail) -> None:
    _, function = reporter(trail.services)
    granted = statements(trail.services, function)
    region = trail.region
    by_sid = {s.get("Sid"): s for s in granted}
    s3 = f"s3.{region}.amazonaws.com"

    read = by_sid["AuditKeyToRead"]
    assert listed(read["Action"]) == ["kms:Decrypt"]
    assert trail.stateful_resource(read["Resource"])[0].startswith("KeysAudit")
    condition = read["Condition"]["StringEquals"]
    assert condition["kms:ViaService"] == s3
    assert trail.render(condition["kms:EncryptionContext:aws:s3:arn"]) == BUCKET_ARN

    write = by_sid["AuditKeyToWriteReports"]
    assert listed(write["Action"]) == ["kms:GenerateDataKey"]
    assert trail.stateful_resource(write["Resource"])[0].startswith("KeysAudit")
    condition = write["Condition"]["StringEquals"]
    assert condition["kms:ViaService"] == s3
    assert trail.render(condition["kms:EncryptionContext:aws:s3:arn"]) == reports_bucket_arn(trail)

    # Verify only: the report checks checkpoints and can never sign one.
    verify = by_sid["VerifyCheckpoints"]
    assert listed(verify["Action"]) == ["kms:Verify"]
    assert trail.render(verify["Resource"]) == trail.signing_key_arn
    assert verify["Condition"] == {"StringEquals": {"kms:SigningAlgorithm": "ECDSA_SHA_256"}}

    topics = by_sid["TopicsKeyThroughSns"]
    assert sorted(listed(topics["Action"])) == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert trail.stateful_resource(topics["Resource"])[0].startswith("KeysTopics")
    assert topics["Condition"] == {
        "StringEquals": {
            "kms:ViaService": f"sns.{region}.amazonaws.com",
            "kms:EncryptionContext:aws:sns:topicArn": by_sid["PublishSummaries"]["Resource"],
        }
    }

    for statement in granted:
        actions = listed(statement["Action"])
        assert "kms:Sign" not in actions
        if statement is not verify:
            assert trail.signing_key_arn not in [
                trail.render(r) for r in listed(statement["Resource"])
            ]
        if statement["Resource"] == "*":
            assert all(a.startswith(("xray:", "ec2:")) for a in actions), statement


def test_the_report_runs_every_day_for_the_day_before(trail: Trail) -> None:
    template = trail.services
    function_id, _ = reporter(template)
    name = trail.env.stage.stage_name
    (rule_id, rule), *others = [
        (k, r)
        for k, r in of_type(template, "AWS::Events::Rule").items()
        if r["Properties"]["Targets"][0]["Arn"] == {"Fn::GetAtt": [function_id, "Arn"]}
    ]
    assert not others
    props = rule["Properties"]
    assert props["Name"] == f"fabric-{name}-compliance-report"
    # 02:30 UTC: after the previous day's last records and the checkpoint that seals them.
    assert props["ScheduleExpression"] == "cron(30 2 * * ? *)"
    (target,) = props["Targets"]
    # No fixed input: the function reads the scheduled event's time (the day before it).
    assert "Input" not in target
    assert target["RetryPolicy"]["MaximumRetryAttempts"] == 2
    (permission,) = [
        p
        for p in of_type(template, "AWS::Lambda::Permission").values()
        if p["Properties"].get("SourceArn") == {"Fn::GetAtt": [rule_id, "Arn"]}
    ]
    assert permission["Properties"]["Principal"] == "events.amazonaws.com"


def test_the_summary_goes_to_an_encrypted_tls_only_topic_only(trail: Trail) -> None:
    template = trail.services
    _, function = reporter(template)
    name = trail.env.stage.stage_name
    ((topic_id, topic),) = [
        (k, t)
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{name}-compliance"
    ]
    key_id, _ = trail.stateful_resource(topic["Properties"]["KmsMasterKeyId"])
    assert key_id.startswith("KeysTopics")
    (policy,) = [
        p
        for p in of_type(template, "AWS::SNS::TopicPolicy").values()
        if p["Properties"]["Topics"] == [{"Ref": topic_id}]
    ]
    denied = [
        s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"
    ]
    (without_tls,) = [
        s for s in denied if s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    ]
    # Every action a topic policy takes, not only Publish: a subscription over plain HTTP too.
    assert sorted(listed(without_tls["Action"])) == sorted(TOPIC_POLICY_ACTIONS)
    published = [s for s in statements(template, function) if "sns:Publish" in listed(s["Action"])]
    assert [s["Resource"] for s in published] == [{"Ref": topic_id}]
    # Prod keeps the topic (and its subscriptions) when the stack goes.
    if name == "prod":
        assert topic.get("DeletionPolicy") == "Retain"


def test_failures_a_bad_trail_and_a_missing_report_page_on_the_alarms_topic(
    trail: Trail,
) -> None:
    template = trail.services
    function_id, _ = reporter(template)
    name = trail.env.stage.stage_name
    (alarms_topic,) = [
        k
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{name}-alarms"
    ]
    found = report_alarms(template)
    assert set(found) == {"Errors", "TrailNotVerified", "Missing"}
    for alarm in found.values():
        assert alarm["AlarmActions"] == alarm["OKActions"] == [{"Ref": alarms_topic}]
        assert alarm["Threshold"] == 1

    errors = found["Errors"]
    assert (errors["Namespace"], errors["MetricName"]) == ("AWS/Lambda", "Errors")
    assert errors["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": function_id}}]
    assert errors["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert errors["EvaluationPeriods"] == 1

    dimensions = [{"Name": metrics.DIMENSION, "Value": name}]
    not_verified = found["TrailNotVerified"]
    assert (not_verified["Namespace"], not_verified["MetricName"]) == (
        metrics.NAMESPACE,
        metrics.TRAIL_NOT_VERIFIED,
    )
    assert not_verified["Dimensions"] == dimensions
    assert not_verified["Statistic"] == "Maximum"
    assert not_verified["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"

    missing = found["Missing"]
    assert missing["MetricName"] == metrics.COMPLIANCE_REPORTS
    assert missing["Dimensions"] == dimensions
    assert missing["Statistic"] == "Sum"
    assert missing["ComparisonOperator"] == "LessThanThreshold"
    # No report at all (no data) is exactly what this alarm is for.
    assert missing["TreatMissingData"] == "breaching"


def report_alarms(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compliance report's alarms' properties, by the readable part of their logical ids."""
    return {
        logical_id.removeprefix("ComplianceReport")[:-8]: a["Properties"]
        for logical_id, a in of_type(template, "AWS::CloudWatch::Alarm").items()
        if logical_id.startswith("ComplianceReport")
    }


_STATISTICS: dict[str, Callable[[list[float]], float]] = {"Sum": sum, "Maximum": max}
_BREACHES: dict[str, Callable[[float, float], bool]] = {
    "GreaterThanOrEqualToThreshold": lambda value, threshold: value >= threshold,
    "LessThanThreshold": lambda value, threshold: value < threshold,
}


def alarm_states(
    alarm: dict[str, Any],
    datapoints: list[tuple[datetime, float]],
    times: list[datetime],
    *,
    aligned: bool,
) -> dict[datetime, str]:
    """The state of ``alarm`` (its synthesized properties) at each of ``times``, as CloudWatch
    evaluates it: the latest ``EvaluationPeriods`` periods, ALARM when ``DatapointsToAlarm`` of
    them breach, missing data treated as the alarm says (``ignore``: no data keeps the state).

    ``aligned``: periods on multiples of their length, the newest one still open; otherwise
    periods ending at the evaluation time (a sliding window).
    """
    period = timedelta(seconds=alarm["Period"])
    count = alarm["EvaluationPeriods"]
    needed = alarm.get("DatapointsToAlarm", count)
    statistic = _STATISTICS[alarm["Statistic"]]
    breaches = _BREACHES[alarm["ComparisonOperator"]]
    missing = alarm["TreatMissingData"]
    state, states = "INSUFFICIENT_DATA", {}
    for now in times:
        end = now
        if aligned:
            epoch = datetime(1970, 1, 1, tzinfo=UTC)
            end = epoch + (now - epoch) // period * period + period
        breached: list[bool] = []
        for index in range(count):
            start = end - (index + 1) * period
            values = [v for when, v in datapoints if start <= when < min(start + period, now)]
            if values:
                breached.append(breaches(statistic(values), alarm["Threshold"]))
            elif missing != "ignore":
                breached.append(missing == "breaching")
        if breached:
            state = "ALARM" if sum(breached) >= min(needed, len(breached)) else "OK"
        states[now] = state
    return states


def _minutes(start: datetime, end: datetime) -> list[datetime]:
    return [start + timedelta(minutes=m) for m in range((end - start) // timedelta(minutes=1))]


@pytest.mark.parametrize("aligned", [True, False])
def test_a_daily_report_that_ends_later_than_the_day_before_raises_no_alarm(
    trail: Trail, aligned: bool
) -> None:
    alarm = report_alarms(trail.services)["Missing"]
    # The 02:30 run ends some minutes later each day; on the 5th after Lambda's two retries.
    ends = [
        datetime(2026, 3, day, 2, 30, tzinfo=UTC) + timedelta(minutes=minutes)
        for day, minutes in ((1, 2), (2, 3), (3, 11), (4, 3), (5, 52), (6, 4), (7, 15))
    ]
    states = alarm_states(
        alarm,
        [(end, 1.0) for end in ends],
        _minutes(datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 8, tzinfo=UTC)),
        aligned=aligned,
    )
    assert {when for when, state in states.items() if state != "OK"} == set()


@pytest.mark.parametrize("aligned", [True, False])
def test_a_missed_daily_report_pages_the_next_morning_until_one_is_written(
    trail: Trail, aligned: bool
) -> None:
    alarm = report_alarms(trail.services)["Missing"]
    last = datetime(2026, 3, 3, 2, 35, tzinfo=UTC)
    rerun = datetime(2026, 3, 4, 9, 0, tzinfo=UTC)  # runbook.py report, once paged
    reports = [(last - timedelta(days=days), 1.0) for days in range(3)] + [(rerun, 1.0)]
    states = alarm_states(
        alarm,
        reports,
        _minutes(datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 5, tzinfo=UTC)),
        aligned=aligned,
    )
    paged = min(when for when, state in states.items() if state == "ALARM")
    # Not before a full day without a report; by the next morning, hours before the re-run.
    assert last + timedelta(days=1) < paged <= datetime(2026, 3, 4, 5, 0, tzinfo=UTC)
    assert states[rerun + timedelta(minutes=1)] == "OK"


@pytest.mark.parametrize("aligned", [True, False])
def test_a_clean_rerun_clears_trail_not_verified_and_nothing_else_does(
    trail: Trail, aligned: bool
) -> None:
    alarm = report_alarms(trail.services)["TrailNotVerified"]
    bad = datetime(2026, 3, 3, 2, 35, tzinfo=UTC)
    clean = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)  # after the operator fixed the cause

    states = alarm_states(
        alarm,
        [(bad - timedelta(days=1), 0.0), (bad, 1.0), (clean, 0.0)],
        _minutes(datetime(2026, 3, 2, 2, 30, tzinfo=UTC), datetime(2026, 3, 4, tzinfo=UTC)),
        aligned=aligned,
    )
    assert states[bad - timedelta(minutes=5)] == "OK"
    assert {states[bad + timedelta(minutes=m)] for m in range(1, 7 * 60)} == {"ALARM"}
    assert {state for when, state in states.items() if when >= clean + timedelta(minutes=10)} == {
        "OK"
    }


def test_the_reports_async_dlq_is_watched_by_function_dlq_depth(trail: Trail) -> None:
    template = trail.services
    _, function = reporter(template)
    dlq_id = function["Properties"]["DeadLetterConfig"]["TargetArn"]["Fn::GetAtt"][0]
    watched = json.dumps(
        [
            alarm["Properties"]["Metrics"]
            for logical_id, alarm in of_type(template, "AWS::CloudWatch::Alarm").items()
            if logical_id.startswith("DeadLetterAlarmsFunctionDlqDepth")
        ]
    )
    assert json.dumps({"Fn::GetAtt": [dlq_id, "QueueName"]}) in watched
