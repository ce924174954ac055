"""The broker metrics function: every minute, one at a time, the management API only, as the
monitor user only; its alarms say when the dead-letter alarms are blind."""

from __future__ import annotations

import json
from typing import Any

from tests.infra.conftest import Assembly, Synthesized
from tests.infra.test_functions import of_type, services
from tests.infra.test_rotation import role_statements, secret_named_by, user_secrets


def broker_metrics(template: dict[str, Any], env: Synthesized) -> tuple[str, dict[str, Any]]:
    name = f"fabric-{env.stage.stage_name}-broker-metrics"
    (item,) = (
        (k, v)
        for k, v in of_type(template, "AWS::Lambda::Function").items()
        if v["Properties"].get("FunctionName") == name
    )
    return item


def topology(template: dict[str, Any]) -> dict[str, Any]:
    (function,) = [
        f["Properties"]
        for f in of_type(template, "AWS::Lambda::Function").values()
        if "applies the RabbitMQ topology" in f["Properties"].get("Description", "")
    ]
    return function


def test_it_runs_every_minute_once_at_a_time_without_retries(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    logical_id, function = broker_metrics(template, env)
    props = function["Properties"]
    assert props["ReservedConcurrentExecutions"] == 1
    assert props["Timeout"] == 60
    (rule,) = [
        r["Properties"]
        for r in of_type(template, "AWS::Events::Rule").values()
        if any(t["Arn"] == {"Fn::GetAtt": [logical_id, "Arn"]} for t in r["Properties"]["Targets"])
    ]
    assert rule["ScheduleExpression"] == "rate(1 minute)"
    assert rule["Targets"][0]["RetryPolicy"]["MaximumRetryAttempts"] == 0
    (invoke_config,) = [
        c["Properties"]
        for c in of_type(template, "AWS::Lambda::EventInvokeConfig").values()
        if c["Properties"]["FunctionName"] == {"Ref": logical_id}
    ]
    assert invoke_config["MaximumRetryAttempts"] == 0
    # The monitor user exists once the topology is applied.
    (topology_id,) = of_type(template, "Custom::FabricTopology")
    assert topology_id in function["DependsOn"]


def test_it_reads_the_monitors_secret_only_and_publishes_through_its_log(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    _, function = broker_metrics(template, env)
    variables = function["Properties"]["Environment"]["Variables"]
    secrets = user_secrets(env)
    monitor = secret_named_by(variables["MONITOR_SECRET_ARN"], secrets)
    assert secrets[monitor].endswith("RabbitMQ user fabric-monitor")
    assert variables["RABBITMQ_VHOST"] == "/"
    assert variables["FABRIC_ENV"] == env.stage.stage_name
    # The same management API as the topology function applies the topology through.
    assert (
        variables["MANAGEMENT_URL"]
        == topology(template)["Environment"]["Variables"]["MANAGEMENT_URL"]
    )
    granted = role_statements(template, function)
    actions = {
        a for s in granted for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert not any(a.startswith("cloudwatch:") for a in actions)  # EMF: no PutMetricData
    readable = [
        s["Resource"] for s in granted if "secretsmanager:GetSecretValue" in json.dumps(s["Action"])
    ]
    assert [secret_named_by(r, secrets) for r in readable] == [monitor]


def test_the_monitor_users_secret_is_generated_and_rotated_like_the_other_users(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    secrets = user_secrets(env)
    (monitor,) = [k for k, d in secrets.items() if d.endswith("RabbitMQ user fabric-monitor")]
    secret = env.resources("AWS::SecretsManager::Secret")[monitor]["Properties"]
    assert json.loads(secret["GenerateSecretString"]["SecretStringTemplate"]) == {
        "username": "fabric-monitor"
    }
    rotated = [
        secret_named_by(s["Properties"]["SecretId"], secrets)
        for s in of_type(template, "AWS::SecretsManager::RotationSchedule").values()
    ]
    assert monitor in rotated
    # The topology function creates the user with the secret's password.
    users = topology(template)["Environment"]["Variables"]["USER_SECRET_ARNS"]
    literal = "".join(part for part in users["Fn::Join"][1] if isinstance(part, str))
    assert '"fabric-monitor": "' in literal


def test_unmeasured_queues_or_no_run_at_all_page_and_recover(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    (alarm,) = [
        a["Properties"]
        for logical_id, a in of_type(template, "AWS::CloudWatch::Alarm").items()
        if logical_id.startswith("BrokerMetricsUnmeasured")
    ]
    assert (alarm["Namespace"], alarm["MetricName"]) == (
        "MessagingFabric/Broker",
        "QueuesUnmeasured",
    )
    assert alarm["Dimensions"] == [{"Name": "Environment", "Value": env.stage.stage_name}]
    # Minimum: it pages when no run in five minutes measured every queue, not on one run that
    # missed a queue declared seconds before (no statistics sampled yet).
    assert (alarm["Statistic"], alarm["Period"], alarm["EvaluationPeriods"]) == ("Minimum", 300, 1)
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (1, "GreaterThanOrEqualToThreshold")
    # No data means no run measured anything: the dead-letter alarms are blind.
    assert alarm["TreatMissingData"] == "breaching"
    ((topic_id, _),) = [
        (k, t)
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{env.stage.stage_name}-alarms"
    ]
    assert alarm["AlarmActions"] == [{"Ref": topic_id}]
    assert alarm["OKActions"] == [{"Ref": topic_id}]
    assert "docs/runbook.md" in alarm["AlarmDescription"]
