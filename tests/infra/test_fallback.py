"""The SNS/SQS fallback path: encrypted, TLS-only, filtered per stakeholder, with DLQs."""

from __future__ import annotations

import json

from fabric.stakeholders import STAKEHOLDERS
from tests.infra.conftest import Assembly, Synthesized

FLOWS = ("fallback", "emergency")


def _queues_by_name(env: Synthesized) -> dict[str, tuple[str, dict]]:
    """The fallback path's queues (named fabric-<env>-fallback-... / -emergency-...)."""
    prefixes = tuple(f"fabric-{env.stage.stage_name}-{flow}-" for flow in FLOWS)
    return {
        q["Properties"]["QueueName"]: (logical_id, q)
        for logical_id, q in env.resources("AWS::SQS::Queue").items()
        if q["Properties"].get("QueueName", "").startswith(prefixes)
    }


def test_each_group_has_a_fallback_and_an_emergency_queue_each_with_its_dlqs(
    env: Synthesized,
) -> None:
    name = env.stage.stage_name
    queues = _queues_by_name(env)
    expected = {
        f"fabric-{name}-{flow}-{group.value}{suffix}"
        for flow in FLOWS
        for group in STAKEHOLDERS
        for suffix in ("", "-dlq", "-sub-dlq")
    }
    assert set(queues) == expected
    for flow in FLOWS:
        for group in STAKEHOLDERS:
            base = f"fabric-{name}-{flow}-{group.value}"
            _, queue = queues[base]
            dlq_id, _ = queues[f"{base}-dlq"]
            redrive = queue["Properties"]["RedrivePolicy"]
            assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": [dlq_id, "Arn"]}
            assert redrive["maxReceiveCount"] > 1


def test_queues_are_kms_encrypted_and_refuse_plain_http(env: Synthesized) -> None:
    queue_ids = set(env.resources("AWS::SQS::Queue"))
    protected = set()
    for policy in env.resources("AWS::SQS::QueuePolicy").values():
        statements = policy["Properties"]["PolicyDocument"]["Statement"]
        if any(
            s["Effect"] == "Deny"
            and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
            for s in statements
        ):
            protected.update(q["Ref"] for q in policy["Properties"]["Queues"])
    assert protected == queue_ids
    for queue in env.resources("AWS::SQS::Queue").values():
        assert "KmsMasterKeyId" in queue["Properties"]


def test_dead_letter_queues_accept_only_their_own_source(env: Synthesized) -> None:
    for name, (_, queue) in _queues_by_name(env).items():
        policy = queue["Properties"].get("RedriveAllowPolicy")
        if name.endswith("-sub-dlq"):
            assert policy == {"redrivePermission": "denyAll"}
        elif name.endswith("-dlq"):
            assert policy["redrivePermission"] == "byQueue"
            account = env.stage.stateful.account
            source = f"arn:aws:sqs:{env.region}:{account}:{name.removesuffix('-dlq')}"
            assert policy["sourceQueueArns"] == [source]


def test_subscriptions_filter_on_audience_and_have_their_own_dlq(env: Synthesized) -> None:
    queues = {logical_id: q for _, (logical_id, q) in _queues_by_name(env).items()}
    names = {logical_id: q["Properties"]["QueueName"] for logical_id, q in queues.items()}
    topics = {
        logical_id: t["Properties"]["TopicName"]
        for logical_id, t in env.resources("AWS::SNS::Topic").items()
    }
    seen = set()
    for sub in env.resources("AWS::SNS::Subscription").values():
        props = sub["Properties"]
        queue_name = names[props["Endpoint"]["Fn::GetAtt"][0]]
        topic_name = topics[props["TopicArn"]["Ref"]]
        flow, group = queue_name.split("-")[-2:]
        assert topic_name.endswith(f"-{flow}")
        assert props["Protocol"] == "sqs"
        assert props["RawMessageDelivery"] is True
        assert props["FilterPolicy"] == {"audience": [group]}
        dlq_id = props["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
        assert names[dlq_id] == f"{queue_name}-sub-dlq"
        seen.add((flow, group))
    assert seen == {(flow, g.value) for flow in FLOWS for g in STAKEHOLDERS}


def test_topics_are_encrypted_and_refuse_plain_http(env: Synthesized) -> None:
    topics = env.resources("AWS::SNS::Topic")
    assert {t["Properties"]["TopicName"] for t in topics.values()} == {
        f"fabric-{env.stage.stage_name}-{flow}" for flow in FLOWS
    }
    for policy in env.resources("AWS::SNS::TopicPolicy").values():
        statements = policy["Properties"]["PolicyDocument"]["Statement"]
        assert any(
            s["Effect"] == "Deny" and "aws:SecureTransport" in json.dumps(s) for s in statements
        )


def test_dev_queues_may_be_destroyed_but_prod_queues_are_retained(assembly: Assembly) -> None:
    policies = {
        name: {q["DeletionPolicy"] for q in env.resources("AWS::SQS::Queue").values()}
        for name, env in assembly.envs.items()
    }
    assert policies == {"dev": {"Delete"}, "staging": {"Retain"}, "prod": {"Retain"}}
