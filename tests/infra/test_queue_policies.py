"""Who may send to the fabric's queues, TLS on every topic action, and KMS only through the
service that holds the data.

The audit, ingest and fallback queues deny ``sqs:SendMessage`` to every principal but their
named senders. The queues live in the stateful stack, the senders' roles in the services stack,
so the queue policies name the roles by ARN: these tests check the names against the roles that
hold a send grant, both ways.
"""

from __future__ import annotations

import json
from typing import Any

from aws_cdk import App, RemovalPolicy, Stack
from aws_cdk import aws_kms as kms
from aws_cdk.assertions import Template

from fabric.naming import audit_queue_name, fallback_queue_name, redrive_function_name
from fabric.stakeholders import STAKEHOLDERS
from stacks.constructs.fallback import TOPIC_POLICY_ACTIONS
from stacks.constructs.ingest import IngestQueues
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.resolve import Unresolved, render
from tests.infra.test_functions import CONTEXT, fabric_functions, of_type, router, services
from tests.infra.test_redrive import listed, statements

FLOWS = ("fallback", "emergency")
SID = "DenySendExceptNamedSenders"


def _role_arn(env: Synthesized, name: str) -> str:
    return f"arn:aws:iam::{env.stage.stateful.account}:role/{name}"


def _queue_arn(env: Synthesized, name: str) -> str:
    return f"arn:aws:sqs:{env.region}:{env.stage.stateful.account}:{name}"


def _queue_statements(template: dict[str, Any], name: str) -> list[dict[str, Any]]:
    (queue_id,) = [
        k
        for k, q in of_type(template, "AWS::SQS::Queue").items()
        if q["Properties"].get("QueueName") == name
    ]
    (policy,) = [
        p
        for p in of_type(template, "AWS::SQS::QueuePolicy").values()
        if p["Properties"]["Queues"] == [{"Ref": queue_id}]
    ]
    return policy["Properties"]["PolicyDocument"]["Statement"]  # type: ignore[no-any-return]


def _senders(template: dict[str, Any], name: str) -> tuple[set[str], list[Any]]:
    """The role ARNs a queue admits as senders (rendered), and the topic ARNs it admits."""
    (deny,) = [s for s in _queue_statements(template, name) if s.get("Sid") == SID]
    assert deny["Effect"] == "Deny"
    assert deny["Principal"] == {"AWS": "*"}
    assert deny["Action"] == "sqs:SendMessage"
    assert set(deny["Condition"]) == {"ArnNotEquals"}
    condition = deny["Condition"]["ArnNotEquals"]
    roles = {render(arn) for arn in listed(condition.get("aws:PrincipalArn", []))}
    return roles, listed(condition.get("aws:SourceArn", []))


def _protected(env: Synthesized) -> list[str]:
    stage = env.stage.stage_name
    return [
        audit_queue_name(stage),
        *(f"fabric-{stage}-ingest-{g.value}" for g in STAKEHOLDERS),
        *(fallback_queue_name(stage, flow, g) for flow in FLOWS for g in STAKEHOLDERS),
        *(f"{fallback_queue_name(stage, flow, g)}-sub-dlq" for flow in FLOWS for g in STAKEHOLDERS),
    ]


def test_the_audit_queue_admits_only_the_functions_that_emit_audit_batches(
    env: Synthesized,
) -> None:
    roles, topics = _senders(env.json, audit_queue_name(env.stage.stage_name))
    stage = env.stage.stage_name
    assert roles == {
        _role_arn(env, f"fabric-{stage}-{which}")
        for which in ("router", "drain", "redrive", "replay")
    }
    assert topics == []


def test_an_ingest_queue_admits_only_its_groups_producers_and_the_redrive(
    env: Synthesized,
) -> None:
    producers = CONTEXT[env.stage.stage_name].get("producers", {})
    redrive = _role_arn(env, redrive_function_name(env.stage.stage_name))
    for group in STAKEHOLDERS:
        roles, topics = _senders(env.json, f"fabric-{env.stage.stage_name}-ingest-{group.value}")
        assert roles == {*producers.get(group.value, []), redrive}
        assert topics == []


def test_the_producers_of_cdk_json_are_their_groups_senders() -> None:
    # cdk.json names no producer yet: a stack of its own, with one.
    stack = Stack(App(), "Ingest", env={"account": "111111111111", "region": "ap-southeast-3"})
    producer = "arn:aws:iam::444444444444:role/government-producer"
    IngestQueues(
        stack,
        "Ingest",
        env_name="dev",
        key=kms.Key(stack, "Key"),
        removal_policy=RemovalPolicy.DESTROY,
        producers={"government": (producer,)},
    )
    template = Template.from_stack(stack).to_json()
    redrive = "arn:aws:iam::111111111111:role/fabric-dev-redrive"
    roles, _ = _senders(template, "fabric-dev-ingest-government")
    assert roles == {producer, redrive}
    roles, _ = _senders(template, "fabric-dev-ingest-media")
    assert roles == {redrive}


def test_a_fallback_queue_admits_only_its_topic_and_the_redrive(env: Synthesized) -> None:
    topics = {
        t["Properties"]["TopicName"]: logical_id
        for logical_id, t in env.resources("AWS::SNS::Topic").items()
    }
    redrive = _role_arn(env, redrive_function_name(env.stage.stage_name))
    for flow in FLOWS:
        topic = {"Ref": topics[f"fabric-{env.stage.stage_name}-{flow}"]}
        for group in STAKEHOLDERS:
            name = fallback_queue_name(env.stage.stage_name, flow, group)
            roles, sources = _senders(env.json, name)
            assert roles == {redrive}
            assert sources == [topic]
            # Its subscription's DLQ: only the topic's dead letters.
            assert _senders(env.json, f"{name}-sub-dlq") == (set(), [topic])
            for queue in (name, f"{name}-sub-dlq"):
                # The topic's deliveries are still allowed, for that topic only.
                (allowed,) = [
                    s for s in _queue_statements(env.json, queue) if s["Effect"] == "Allow"
                ]
                assert allowed["Principal"] == {"Service": "sns.amazonaws.com"}
                assert allowed["Condition"] == {"ArnEquals": {"aws:SourceArn": topic}}


def test_no_principal_may_send_to_a_queues_own_dlq(env: Synthesized) -> None:
    # SQS itself moves a message into a DLQ (no SendMessage); the redrive sends the letters to
    # the source. A message sent to a DLQ would be redriven into its source as a parked one,
    # around the source's own sender check: into the audit queue as a platform batch, into a
    # fallback queue as a group's traffic.
    stage = env.stage.stage_name
    sources = [
        audit_queue_name(stage),
        *(f"fabric-{stage}-ingest-{g.value}" for g in STAKEHOLDERS),
        *(fallback_queue_name(stage, flow, g) for flow in FLOWS for g in STAKEHOLDERS),
    ]
    for source in sources:
        (deny,) = [
            s
            for s in _queue_statements(env.json, f"{source}-dlq")
            if s.get("Sid") == "DenyAllSenders"
        ]
        assert (deny["Effect"], deny["Principal"], deny["Action"]) == (
            "Deny",
            {"AWS": "*"},
            "sqs:SendMessage",
        )
        # Only account principals: SQS's own move into the DLQ is never the one refused.
        assert deny["Condition"] == {"Bool": {"aws:PrincipalIsAWSService": "false"}}
        # SQS's move stays governed by the redrive-allow policy: only the source may use it.
        (dlq,) = [
            q["Properties"]
            for q in env.resources("AWS::SQS::Queue").values()
            if q["Properties"].get("QueueName") == f"{source}-dlq"
        ]
        assert dlq["RedriveAllowPolicy"]["redrivePermission"] == "byQueue"
        assert [render(arn) for arn in dlq["RedriveAllowPolicy"]["sourceQueueArns"]] == [
            _queue_arn(env, source)
        ]


def test_every_role_that_may_send_to_a_protected_queue_is_admitted_by_it(
    env: Synthesized, assembly: Assembly
) -> None:
    """Both ways: a send grant the queue policy does not admit would fail at run time, and an
    admitted name without its role is a stale entry."""
    template = services(env, assembly)
    roles = of_type(template, "AWS::IAM::Role")
    named = {
        logical_id: _role_arn(env, role["Properties"]["RoleName"])
        for logical_id, role in roles.items()
        if isinstance(role["Properties"].get("RoleName"), str)
    }
    granted: dict[str, set[str]] = {}
    for function in fabric_functions(template).values():
        role_id = function["Properties"]["Role"]["Fn::GetAtt"][0]
        for statement in statements(template, function):
            actions = listed(statement["Action"])
            if statement["Effect"] != "Allow" or not {"sqs:SendMessage", "sqs:*", "*"} & {*actions}:
                continue
            for resource in listed(statement["Resource"]):
                try:
                    arn = render(resource)
                except Unresolved:
                    # Only Lambda's own async DLQ, of this stack.
                    assert "AsyncDlq" in json.dumps(resource), (role_id, resource)
                    continue
                granted.setdefault(arn, set()).add(role_id)
    stateful_roles = {arn for name in _protected(env) for arn in _senders(env.json, name)[0]}
    for name in _protected(env):
        admitted, _ = _senders(env.json, name)
        for role_id in granted.get(_queue_arn(env, name), set()):
            assert role_id in named, f"{role_id} may send to {name} but has no literal name"
            assert named[role_id] in admitted, (name, named[role_id])
    producers = {
        arn for group in CONTEXT[env.stage.stage_name]["producers"].values() for arn in group
    }
    assert stateful_roles - producers <= set(named.values())


def test_only_the_router_may_publish_to_the_fallback_topics(env: Synthesized) -> None:
    # What a fallback topic delivers, the drain hands to the groups as their traffic: an open
    # topic would bypass its queues' sender rules.
    router_role = _role_arn(env, f"fabric-{env.stage.stage_name}-router")
    for flow in FLOWS:
        ((logical_id, _),) = [
            (k, t)
            for k, t in env.resources("AWS::SNS::Topic").items()
            if t["Properties"]["TopicName"] == f"fabric-{env.stage.stage_name}-{flow}"
        ]
        (policy,) = [
            p
            for p in env.resources("AWS::SNS::TopicPolicy").values()
            if p["Properties"]["Topics"] == [{"Ref": logical_id}]
        ]
        (deny,) = [
            s
            for s in policy["Properties"]["PolicyDocument"]["Statement"]
            if s.get("Sid") == "DenyPublishExceptNamedPublishers"
        ]
        assert (deny["Effect"], deny["Principal"], deny["Action"]) == (
            "Deny",
            {"AWS": "*"},
            "sns:Publish",
        )
        assert deny["Resource"] == {"Ref": logical_id}
        admitted = deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"]
        assert {render(arn) for arn in listed(admitted)} == {router_role}


def test_the_fabric_topics_refuse_every_action_without_tls(
    env: Synthesized, assembly: Assembly
) -> None:
    alarms_topic = f"fabric-{env.stage.stage_name}-alarms"
    for template, names in (
        (env.json, {f"fabric-{env.stage.stage_name}-{flow}" for flow in FLOWS}),
        (services(env, assembly), {alarms_topic}),
    ):
        topics = {
            logical_id: t["Properties"]["TopicName"]
            for logical_id, t in of_type(template, "AWS::SNS::Topic").items()
            if t["Properties"]["TopicName"] in names
        }
        assert set(topics.values()) == names
        for logical_id in topics:
            (policy,) = [
                p
                for p in of_type(template, "AWS::SNS::TopicPolicy").values()
                if p["Properties"]["Topics"] == [{"Ref": logical_id}]
            ]
            document = policy["Properties"]["PolicyDocument"]["Statement"]
            (deny,) = [s for s in document if s.get("Sid") == "DenyWithoutTls"]
            assert deny["Effect"] == "Deny"
            assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
            assert deny["Principal"] in ("*", {"AWS": "*"})
            assert deny["Resource"] == {"Ref": logical_id}
            assert set(deny["Action"]) == set(TOPIC_POLICY_ACTIONS)
            # SNS refuses a topic policy that names an action it does not list.
            for statement in document:
                assert set(listed(statement["Action"])) <= set(TOPIC_POLICY_ACTIONS), statement


def test_the_router_and_drain_use_the_queues_and_topics_keys_only_through_their_service(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    _, routing = router(template)
    (drain,) = [
        f
        for f in fabric_functions(template).values()
        if "drains the fallback" in f["Properties"]["Description"]
    ]
    for function, keys in ((routing, ("KeysQueues", "KeysTopics")), (drain, ("KeysQueues",))):
        for statement in statements(template, function):
            resource = json.dumps(statement["Resource"])
            if not any(key in resource for key in keys):
                continue
            service = "sns" if "KeysTopics" in resource else "sqs"
            condition = statement.get("Condition", {}).get("StringEquals", {})
            assert condition.get("kms:ViaService") == f"{service}.{env.region}.amazonaws.com", (
                statement
            )
    # The topics key, for the two fallback topics' encryption context only.
    (topics_key,) = [
        s for s in statements(template, routing) if "KeysTopics" in json.dumps(s["Resource"])
    ]
    assert sorted(topics_key["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey"]
    context = topics_key["Condition"]["StringEquals"]["kms:EncryptionContext:aws:sns:topicArn"]
    (publish,) = [s for s in statements(template, routing) if s["Action"] == "sns:Publish"]
    assert sorted(map(json.dumps, context)) == sorted(map(json.dumps, publish["Resource"]))
    assert len(context) == 2


def test_the_router_consumes_the_ingest_queues_by_their_arns(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    router_id, routing = router(template)
    ingest = {
        _queue_arn(env, f"fabric-{env.stage.stage_name}-ingest-{g.value}") for g in STAKEHOLDERS
    }
    mappings = [
        m
        for m in of_type(template, "AWS::Lambda::EventSourceMapping").values()
        if m["Properties"]["FunctionName"] == {"Ref": router_id}
    ]
    assert len(mappings) == len(STAKEHOLDERS)
    for mapping in mappings:
        # The stateful stack's queues (as before, so the deployed mappings are kept).
        assert "Ingest" in json.dumps(mapping["Properties"]["EventSourceArn"])
        assert mapping["Properties"]["BatchSize"] == 10
        assert mapping["Properties"]["MaximumBatchingWindowInSeconds"] == 1
    (consume,) = [s for s in statements(template, routing) if s.get("Sid") == "ConsumeIngest"]
    assert {render(r) for r in consume["Resource"]} == ingest
    assert "sqs:ReceiveMessage" in consume["Action"]
