"""On-call alarms: the fallback carries traffic, stops draining or fails; dead letters wait."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from fabric import metrics
from fabric.stakeholders import STAKEHOLDERS
from fabric.topology import AUDIT_QUEUE, OVERFLOW_QUEUE, UNROUTED_QUEUE, dead_letter_queue_name
from tests.conftest import ROOT
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.resolve import queue_key, render
from tests.infra.test_functions import fabric_functions, of_type, services

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
    # The on-call topic (the compliance report's topic is another: test_compliance_report_infra).
    ((topic_id, topic),) = [
        (k, t)
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{env.stage.stage_name}-alarms"
    ]
    assert "KmsMasterKeyId" in topic["Properties"]
    (policy,) = [
        p
        for p in of_type(template, "AWS::SNS::TopicPolicy").values()
        if p["Properties"]["Topics"] == [{"Ref": topic_id}]
    ]
    denied = [
        s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"
    ]
    assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for s in denied)
    # A topic policy replaces SNS's default one: CloudWatch must be allowed in it to publish
    # (and EventBridge, for the key-state rule only: tests/infra/test_key_state_alarm.py).
    allows = [
        s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"
    ]
    assert sorted(s["Principal"]["Service"] for s in allows) == [
        "cloudwatch.amazonaws.com",
        "events.amazonaws.com",
    ]
    (allowed,) = [s for s in allows if s["Principal"] == {"Service": "cloudwatch.amazonaws.com"}]
    assert allowed["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    assert allowed["Action"] == "sns:Publish"
    assert allowed["Resource"] == {"Ref": topic_id}
    assert allowed["Condition"]["StringEquals"] == {"aws:SourceAccount": env.stage.services.account}
    assert ":alarm:*" in json.dumps(allowed["Condition"]["ArnLike"]["aws:SourceArn"])
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


def dead_letter_alarms(env: Synthesized, assembly: Assembly) -> dict[str, dict[str, Any]]:
    return {
        logical_id: alarm["Properties"]
        for logical_id, alarm in of_type(services(env, assembly), "AWS::CloudWatch::Alarm").items()
        if logical_id.startswith("DeadLetterAlarms")
    }


def watched_metrics(alarm: dict[str, Any]) -> list[dict[str, Any]]:
    queries = alarm.get("Metrics", [])
    return [q["MetricStat"]["Metric"] for q in queries if "MetricStat" in q]


def dimension(metric: dict[str, Any], name: str) -> Any:
    (value,) = [d["Value"] for d in metric["Dimensions"] if d["Name"] == name]
    return value


def _dead_letter_queues(template: dict[str, Any]) -> set[tuple[str, str]]:
    """The dead-letter queues of ``template`` (named ``*-dlq``, or the target of a queue's or a
    subscription's redrive policy or of a function's DeadLetterConfig), as ``queue_key`` names
    them: by queue name, or by logical id where the queue has no name."""
    queues = of_type(template, "AWS::SQS::Queue")
    found = {
        logical_id
        for logical_id, queue in queues.items()
        if str(queue["Properties"].get("QueueName", "")).endswith("-dlq")
    }
    targets = [
        q["Properties"].get("RedrivePolicy", {}).get("deadLetterTargetArn") for q in queues.values()
    ]
    targets += [
        s["Properties"].get("RedrivePolicy", {}).get("deadLetterTargetArn")
        for s in of_type(template, "AWS::SNS::Subscription").values()
    ]
    targets += [
        f["Properties"].get("DeadLetterConfig", {}).get("TargetArn")
        for f in of_type(template, "AWS::Lambda::Function").values()
    ]
    for target in targets:
        if (
            isinstance(target, dict)
            and "Fn::GetAtt" in target
            and target["Fn::GetAtt"][0] in queues
        ):
            found.add(target["Fn::GetAtt"][0])
    keys = set()
    for logical_id in found:
        name = queues[logical_id]["Properties"].get("QueueName")
        keys.add(("name", name) if isinstance(name, str) else ("services", logical_id))
    return keys


def test_every_dead_letter_queue_is_watched_by_a_depth_alarm(
    env: Synthesized, assembly: Assembly
) -> None:
    """A DLQ added without an alarm fails here: the set of DLQs in both templates must equal
    the set of queues the alarms watch."""
    template = services(env, assembly)
    stateful = env.json
    in_stateful = _dead_letter_queues(stateful)
    # The stateful stack names every queue (alarms in the other stack name them literally).
    assert all(kind == "name" for kind, _ in in_stateful)
    dead_letter_queues = in_stateful | _dead_letter_queues(template)
    watched = {
        queue_key(dimension(metric, "QueueName"), services=template, stateful=stateful)
        for alarm in dead_letter_alarms(env, assembly).values()
        for metric in watched_metrics(alarm)
        if metric["Namespace"] == "AWS/SQS"
    }
    # 10 fallback DLQs, 10 subscription DLQs, 5 ingest DLQs, the audit DLQ, and every fabric
    # function's async DLQ.
    assert len(dead_letter_queues) == 26 + len(fabric_functions(template))
    assert dead_letter_queues == watched
    for alarm in dead_letter_alarms(env, assembly).values():
        for metric in watched_metrics(alarm):
            if metric["Namespace"] == "AWS/SQS":
                assert metric["MetricName"] == "ApproximateNumberOfMessagesVisible"


def broker_metrics_function(template: dict[str, Any]) -> dict[str, Any]:
    (function,) = [
        f
        for f in of_type(template, "AWS::Lambda::Function").values()
        if str(f["Properties"].get("FunctionName", "")).endswith("-broker-metrics")
    ]
    return function


def test_the_ten_rabbitmq_dead_letter_queues_are_watched_on_the_fabrics_own_depth_metric(
    env: Synthesized, assembly: Assembly
) -> None:
    """On every engine version: Amazon MQ publishes no per-queue metrics for RabbitMQ 4, so the
    alarms read what the broker metrics function measures, and it measures what they watch."""
    name = env.stage.stage_name
    broker = [
        metric
        for logical_id, alarm in dead_letter_alarms(env, assembly).items()
        if logical_id.startswith("DeadLetterAlarmsBroker")
        for metric in watched_metrics(alarm)
    ]
    dead_letter_queues = {
        dead_letter_queue_name(group, emergency=emergency)
        for group in STAKEHOLDERS
        for emergency in (False, True)
    }
    assert {dimension(m, "Queue") for m in broker} == dead_letter_queues | {
        OVERFLOW_QUEUE,
        UNROUTED_QUEUE,
    }
    assert len(broker) == 12
    for metric in broker:
        assert (metric["Namespace"], metric["MetricName"]) == (
            "MessagingFabric/Broker",
            "QueueDepth",
        )
        assert dimension(metric, "Environment") == name
        assert len(metric["Dimensions"]) == 2
    variables = broker_metrics_function(services(env, assembly))["Properties"]["Environment"]
    measured = json.loads(variables["Variables"]["BROKER_DEPTH_QUEUES"])
    # And fabric.audit, for its backlog alarm (tests/infra/test_audit_backlog_alarm.py).
    assert sorted(measured) == sorted({dimension(m, "Queue") for m in broker} | {AUDIT_QUEUE})
    assert not any(
        "AWS/AmazonMQ" in json.dumps(alarm) for alarm in dead_letter_alarms(env, assembly).values()
    )


def test_a_dead_letter_alarm_fires_on_one_message_and_pages_and_recovers(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    ((topic_id, _),) = [
        (k, t)
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{env.stage.stage_name}-alarms"
    ]
    found = dead_letter_alarms(env, assembly)
    names = {logical_id.removeprefix("DeadLetterAlarms")[:-8] for logical_id in found}
    assert names == {
        "FallbackDlqDepth",
        "SubscriptionDlqDepth",
        "IngestDlqDepth",
        "AuditDlqDepth",
        "FunctionDlqDepth",
        "BrokerDlqDepth",
        "BrokerOverflowDepth",
        "BrokerUnroutedDepth",
    }
    for logical_id, alarm in found.items():
        broker = logical_id.startswith("DeadLetterAlarmsBroker")
        assert (alarm["Threshold"], alarm["EvaluationPeriods"]) == (1, 1), logical_id
        assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
        # No SQS data: an idle empty queue. No broker data: the broker metrics function did not
        # run (its own alarms say so), and nobody knows the depth: keep the state.
        assert alarm["TreatMissingData"] == ("ignore" if broker else "notBreaching"), logical_id
        assert alarm["AlarmActions"] == [{"Ref": topic_id}]
        assert alarm["OKActions"] == [{"Ref": topic_id}]
        assert "docs/runbook.md" in alarm["AlarmDescription"]
        # A CloudWatch alarm takes at most ten metrics.
        assert 1 <= len(watched_metrics(alarm)) <= 10, logical_id
        (expression,) = [q for q in alarm["Metrics"] if "Expression" in q]
        assert expression["Expression"].startswith("MAX(")
        periods = {q["MetricStat"]["Period"] for q in alarm["Metrics"] if "MetricStat" in q}
        stats = {q["MetricStat"]["Stat"] for q in alarm["Metrics"] if "MetricStat" in q}
        assert stats == {"Maximum"}
        # SQS publishes every minute; the broker metrics function measures once a minute, late
        # at times.
        assert periods == ({300} if broker else {60}), logical_id


def test_the_rabbitmq_overflow_queue_pages_when_it_holds_a_message(
    env: Synthesized, assembly: Assembly
) -> None:
    """A terminal queue's letter that reached its delivery limit waits in ``fabric.overflow``,
    which nothing reads: its depth alone tells anyone it is there."""
    name = env.stage.stage_name
    (alarm,) = [
        alarm
        for logical_id, alarm in dead_letter_alarms(env, assembly).items()
        if logical_id.startswith("DeadLetterAlarmsBrokerOverflowDepth")
    ]
    (metric,) = watched_metrics(alarm)
    assert (metric["Namespace"], metric["MetricName"]) == ("MessagingFabric/Broker", "QueueDepth")
    assert dimension(metric, "Queue") == OVERFLOW_QUEUE == "fabric.overflow"
    assert dimension(metric, "Environment") == name
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (
        1,
        "GreaterThanOrEqualToThreshold",
    )
    assert "overflow" in alarm["AlarmDescription"]


def test_the_unrouted_queue_pages_when_it_holds_a_message(
    env: Synthesized, assembly: Assembly
) -> None:
    """A message the router accepted and the routing table sends to no group waits in
    ``fabric.unrouted``, which no consumer reads: before, nothing measured it, and it waited
    there unseen."""
    (alarm,) = [
        alarm
        for logical_id, alarm in dead_letter_alarms(env, assembly).items()
        if logical_id.startswith("DeadLetterAlarmsBrokerUnroutedDepth")
    ]
    (metric,) = watched_metrics(alarm)
    assert (metric["Namespace"], metric["MetricName"]) == ("MessagingFabric/Broker", "QueueDepth")
    assert dimension(metric, "Queue") == UNROUTED_QUEUE == "fabric.unrouted"
    assert dimension(metric, "Environment") == env.stage.stage_name
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (
        1,
        "GreaterThanOrEqualToThreshold",
    )
    assert "fabric.unrouted" in alarm["AlarmDescription"]


def test_the_audit_dlq_has_an_alarm_of_its_own(env: Synthesized, assembly: Assembly) -> None:
    (alarm,) = [
        alarm
        for logical_id, alarm in dead_letter_alarms(env, assembly).items()
        if logical_id.startswith("DeadLetterAlarmsAuditDlqDepth")
    ]
    (metric,) = watched_metrics(alarm)
    assert (metric["Namespace"], metric["MetricName"]) == (
        "AWS/SQS",
        "ApproximateNumberOfMessagesVisible",
    )
    assert dimension(metric, "QueueName") == f"fabric-{env.stage.stage_name}-audit-dlq"
    assert "audit writer" in alarm["AlarmDescription"]


@pytest.mark.parametrize(
    ("name", "metric", "periods"),
    [
        ("AuditRecordsLost", metrics.AUDIT_RECORDS_LOST, 1),  # the router could not store them
        # A copy not for its queue's group: the drain runs every minute and meets such a copy
        # every other run (its visibility timeout is 120 s), so OK only after three quiet minutes.
        ("FallbackMisdelivered", metrics.DRAIN_MISDELIVERED, 3),
    ],
)
def test_a_lost_audit_record_or_a_misdelivered_fallback_copy_pages(
    env: Synthesized, assembly: Assembly, name: str, metric: str, periods: int
) -> None:
    template = services(env, assembly)
    (alarm,) = [
        a["Properties"]
        for logical_id, a in of_type(template, "AWS::CloudWatch::Alarm").items()
        if logical_id.startswith(f"FailoverAlarms{name}")
    ]
    # As the function's EMF line names it (fabric.adapters.emf): namespace, metric, dimension.
    assert (alarm["Namespace"], alarm["MetricName"]) == (metrics.NAMESPACE, metric)
    assert alarm["Dimensions"] == [{"Name": metrics.DIMENSION, "Value": env.stage.stage_name}]
    assert (alarm["Statistic"], alarm["Period"], alarm["Threshold"]) == ("Sum", 60, 1)
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert (alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"]) == (periods, 1)
    assert alarm["TreatMissingData"] == "notBreaching"
    ((topic_id, _topic),) = [
        (k, t)
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{env.stage.stage_name}-alarms"
    ]
    assert alarm["AlarmActions"] == [{"Ref": topic_id}]
    assert alarm["OKActions"] == [{"Ref": topic_id}]


def test_the_router_topology_drain_and_broker_metrics_failures_page_and_recover(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    ((topic_id, _topic),) = [
        (k, t)
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{env.stage.stage_name}-alarms"
    ]
    functions = of_type(template, "AWS::Lambda::Function")
    described = {
        "Router": "routes messages",
        "Topology": "applies the RabbitMQ topology",
        "Drain": "drains the fallback queues",
    }
    errors = {
        logical_id: a["Properties"]
        for logical_id, a in of_type(template, "AWS::CloudWatch::Alarm").items()
        if a["Properties"].get("MetricName") == "Errors"
    }
    for name, description in {
        **{f"FunctionErrors{k}": v for k, v in described.items()},
        "BrokerMetrics": "dead-letter queues",
    }.items():
        (alarm,) = [a for logical_id, a in errors.items() if logical_id.startswith(name + "Errors")]
        assert (alarm["Namespace"], alarm["Statistic"], alarm["Period"]) == (
            "AWS/Lambda",
            "Sum",
            300,
        )
        assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (
            1,
            "GreaterThanOrEqualToThreshold",
        )
        ((function_ref,),) = [[d["Value"] for d in alarm["Dimensions"]]]
        function = functions[function_ref["Ref"]]
        assert description in function["Properties"]["Description"], name
        assert alarm["AlarmActions"] == [{"Ref": topic_id}]
        assert alarm["OKActions"] == [{"Ref": topic_id}]
        assert "docs/runbook.md" in alarm["AlarmDescription"]
    # Every fabric function has its Errors alarm (the others' constructs raise theirs).
    alarmed = {a["Dimensions"][0]["Value"]["Ref"] for a in errors.values()}
    assert set(fabric_functions(template)) - alarmed == {
        logical_id
        for logical_id, f in fabric_functions(template).items()
        if "redrives dead letters" in f["Properties"]["Description"]
    }


def test_a_queue_only_an_event_source_reads_pages_once_its_oldest_message_waits_too_long(
    env: Synthesized, assembly: Assembly
) -> None:
    """A mapping that stops receiving (disabled, its role or key refused) fails nothing else,
    and SQS deletes what waits after 14 days: each queue an SQS event source reads has an age
    alarm, at three of its visibility timeouts, that pages and recovers."""
    template = services(env, assembly)
    stateful = env.json
    read: set[str] = set()
    for mapping in of_type(template, "AWS::Lambda::EventSourceMapping").values():
        props = mapping["Properties"]
        if "Queues" in props:
            continue  # the audit writer's Amazon MQ source: a RabbitMQ queue
        arn = props["EventSourceArn"]
        if isinstance(arn, dict) and "Fn::GetStackOutput" in arn:
            read.add(queue_key(arn, services=template, stateful=stateful)[1])
        else:
            read.add(render(arn).rsplit(":", 1)[-1])
    stage = env.stage.stage_name
    assert read == {f"fabric-{stage}-ingest-{g.value}" for g in STAKEHOLDERS} | {
        f"fabric-{stage}-audit"
    }
    visibility = {
        q["Properties"]["QueueName"]: q["Properties"]["VisibilityTimeout"]
        for q in env.resources("AWS::SQS::Queue").values()
        if q["Properties"]["QueueName"] in read
    }
    ((topic_id, _),) = [
        (k, t)
        for k, t in of_type(template, "AWS::SNS::Topic").items()
        if t["Properties"]["TopicName"] == f"fabric-{stage}-alarms"
    ]
    thresholds: dict[str, float] = {}
    for alarm in of_type(template, "AWS::CloudWatch::Alarm").values():
        props = alarm["Properties"]
        for metric in watched_metrics(props):
            if metric["MetricName"] != "ApproximateAgeOfOldestMessage":
                continue
            _, name = queue_key(
                dimension(metric, "QueueName"), services=template, stateful=stateful
            )
            if name not in read:
                continue
            thresholds[name] = props["Threshold"]
            assert props["ComparisonOperator"] == "GreaterThanThreshold"
            assert props["EvaluationPeriods"] == 1
            # An idle empty queue publishes nothing: no data is healthy.
            assert props["TreatMissingData"] == "notBreaching"
            assert props["AlarmActions"] == props["OKActions"] == [{"Ref": topic_id}]
            assert "docs/runbook.md" in props["AlarmDescription"]
            (expression,) = [q for q in props["Metrics"] if "Expression" in q]
            assert expression["Expression"].startswith("MAX(")
    assert thresholds == {name: 3 * visibility[name] for name in read}


# How the docs name an alarm: "the `X` alarm", "alarm `X`", or an alarm list's "- `X`: " and
# the metric it watches.
_DOCUMENTED_ALARM = re.compile(
    r"`([A-Z][A-Za-z0-9]+)` alarm|alarms? `([A-Z][A-Za-z0-9]+)`"
    r"|^\s*- `([A-Z][A-Za-z0-9]+)`: (?:`MessagingFabric/|`MAX`|the function's `Errors`)",
    re.MULTILINE,
)


def test_every_alarm_the_docs_name_can_be_found_by_that_name(
    env: Synthesized, assembly: Assembly
) -> None:
    # The runbook says to search the CloudWatch alarm list for the name the docs give: the
    # alarm's name holds its logical id, so each documented name must be part of one.
    logical_ids = [
        logical_id
        for template in (services(env, assembly), json.loads(env.template_path.read_text()))
        for logical_id in of_type(template, "AWS::CloudWatch::Alarm")
    ]
    documented = {
        name
        for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for match in _DOCUMENTED_ALARM.finditer(doc.read_text())
        for name in match.groups()
        if name
    }
    assert "ComplianceReportMissing" in documented  # the pattern reads the docs' lists
    assert not {n for n in documented if not any(n in i for i in logical_ids)}
