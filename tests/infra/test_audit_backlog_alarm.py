"""The audit backlog alarm: a fabric.audit that nothing takes from pages, on the depth the broker
metrics function measures; and the rotation alarm says who a stopped rotation locks out."""

from __future__ import annotations

import json
from typing import Any

from fabric.topology import AUDIT_QUEUE
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.test_broker_metrics_infra import broker_metrics
from tests.infra.test_functions import of_type, services


def alarm_topic(template: dict[str, Any], env: Synthesized) -> str:
    ((topic_id, _),) = [
        (k, t)
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{env.stage.stage_name}-alarms"
    ]
    return topic_id


def alarm_named(template: dict[str, Any], name: str) -> dict[str, Any]:
    (alarm,) = [
        a["Properties"]
        for logical_id, a in of_type(template, "AWS::CloudWatch::Alarm").items()
        if logical_id.startswith(name)
    ]
    return dict(alarm)


def test_a_stuck_audit_queue_on_the_broker_pages_and_recovers(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    alarm = alarm_named(template, "BrokerMetricsAuditBacklog")
    assert (alarm["Namespace"], alarm["MetricName"]) == ("MessagingFabric/Broker", "QueueDepth")
    assert sorted(alarm["Dimensions"], key=lambda d: d["Name"]) == [
        {"Name": "Environment", "Value": env.stage.stage_name},
        {"Name": "Queue", "Value": AUDIT_QUEUE},
    ]
    # Every run for 15 minutes saw at least 500 batches: five full writer invocations behind.
    assert (alarm["Statistic"], alarm["Period"], alarm["EvaluationPeriods"]) == ("Minimum", 900, 1)
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (
        500,
        "GreaterThanOrEqualToThreshold",
    )
    # Not measured is not empty (BrokerMetricsUnmeasured says so): the state stays.
    assert alarm["TreatMissingData"] == "ignore"
    topic_id = alarm_topic(template, env)
    assert alarm["AlarmActions"] == [{"Ref": topic_id}]
    assert alarm["OKActions"] == [{"Ref": topic_id}]
    assert "docs/runbook.md" in alarm["AlarmDescription"]


def test_the_broker_metrics_function_measures_the_audit_queue_it_alarms_on(
    env: Synthesized, assembly: Assembly
) -> None:
    """Without fabric.audit in the function's list the backlog alarm would never see data."""
    _, function = broker_metrics(services(env, assembly), env)
    measured = json.loads(function["Properties"]["Environment"]["Variables"]["BROKER_DEPTH_QUEUES"])
    assert AUDIT_QUEUE in measured
    assert len(measured) == len(set(measured))  # the function refuses a list with repeats


def test_the_rotation_alarm_names_the_clients_a_stopped_rotation_locks_out(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    (function_id,) = [
        k
        for k, f in of_type(template, "AWS::Lambda::Function").items()
        if "rotates the RabbitMQ users' passwords" in f["Properties"]["Description"]
    ]
    (alarm,) = [
        a["Properties"]
        for a in of_type(template, "AWS::CloudWatch::Alarm").values()
        if a["Properties"].get("MetricName") == "Errors"
        and a["Properties"]["Dimensions"][0]["Value"] == {"Ref": function_id}
    ]
    description = alarm["AlarmDescription"]
    assert "AWSCURRENT" in description
    assert "Amazon MQ event sources" in description
    assert "rotate-secret" in description
    assert "'A failed rotation'" in description
