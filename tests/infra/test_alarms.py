"""Failover alarms: on-call hears when the fallback carries traffic, stops draining, or fails."""

from __future__ import annotations

import json
from typing import Any

from fabric import metrics
from tests.conftest import ROOT
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.test_functions import of_type, services

CONTEXT = json.loads((ROOT / "cdk.json").read_text())["context"]["environments"]


def alarms(env: Synthesized, assembly: Assembly) -> dict[str, dict[str, Any]]:
    found = of_type(services(env, assembly), "AWS::CloudWatch::Alarm")
    return {
        name: props
        for name in ("FallbackActive", "FallbackQueueAge", "NothingStored")
        for logical_id, alarm in found.items()
        if logical_id.startswith(f"FailoverAlarms{name}")
        for props in [alarm["Properties"]]
    }


def test_router_metrics_raise_the_fallback_and_nothing_stored_alarms(
    env: Synthesized, assembly: Assembly
) -> None:
    found = alarms(env, assembly)
    expected = {
        "FallbackActive": metrics.ACCEPTED_BY_FALLBACK,
        "NothingStored": metrics.REJECTED_UNAVAILABLE,
    }
    for name, metric in expected.items():
        alarm = found[name]
        assert (alarm["Namespace"], alarm["MetricName"]) == (metrics.NAMESPACE, metric)
        assert alarm["Dimensions"] == [{"Name": metrics.DIMENSION, "Value": env.stage.stage_name}]
        assert (alarm["Statistic"], alarm["Period"], alarm["Threshold"]) == ("Sum", 60, 1)
        assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
        assert alarm["TreatMissingData"] == "notBreaching"


def test_the_queue_age_alarm_watches_every_fallback_queue_at_the_environments_threshold(
    env: Synthesized, assembly: Assembly
) -> None:
    alarm = alarms(env, assembly)["FallbackQueueAge"]
    threshold = CONTEXT[env.stage.stage_name]["alarms"]["fallback_queue_age_seconds"]
    assert alarm["Threshold"] == threshold
    watched = [query["MetricStat"]["Metric"] for query in alarm["Metrics"] if "MetricStat" in query]
    assert {m["MetricName"] for m in watched} == {"ApproximateAgeOfOldestMessage"}
    queues = {json.dumps(m["Dimensions"], sort_keys=True) for m in watched}
    assert len(queues) == 10  # five groups on the fallback and on the emergency topic
    (expression,) = [q for q in alarm["Metrics"] if "Expression" in q]
    assert expression["Expression"].startswith("MAX(")
    assert expression["ReturnData"] is True


def test_every_alarm_pages_and_recovers_on_an_encrypted_tls_only_topic(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    (topic_id, topic), *others = of_type(template, "AWS::SNS::Topic").items()
    assert not others
    assert topic["Properties"]["TopicName"] == f"fabric-{env.stage.stage_name}-alarms"
    assert "KmsMasterKeyId" in topic["Properties"]
    (policy,) = of_type(template, "AWS::SNS::TopicPolicy").values()
    denied = [
        s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"
    ]
    assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for s in denied)
    for alarm in alarms(env, assembly).values():
        assert alarm["AlarmActions"] == [{"Ref": topic_id}]
        assert alarm["OKActions"] == [{"Ref": topic_id}]


def test_only_this_accounts_alarms_may_use_the_topics_key(env: Synthesized) -> None:
    keys = env.resources("AWS::KMS::Key")
    statements = [
        s
        for key in keys.values()
        for s in key["Properties"]["KeyPolicy"]["Statement"]
        if s.get("Principal") == {"Service": "cloudwatch.amazonaws.com"}
    ]
    (statement,) = statements
    assert statement["Action"] == ["kms:Decrypt", "kms:GenerateDataKey*"]
    assert statement["Condition"]["StringEquals"] == {
        "aws:SourceAccount": CONTEXT[env.stage.stage_name]["account"]
    }
    assert "aws:SourceArn" in statement["Condition"]["ArnLike"]
