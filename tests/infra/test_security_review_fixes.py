"""The security review's fixes, as the templates deploy them: only the audit writer signs with
the current signing key; the rotation function knows whose each secret is; the fallback topics
admit only their own queues' subscriptions; the broker's log retention provider may change its
log group only."""

from __future__ import annotations

import json
from typing import Any

from tests.infra.conftest import Assembly, Synthesized
from tests.infra.resolve import render
from tests.infra.test_functions import fabric_functions, of_type, services
from tests.infra.test_keys import _keys_by_alias
from tests.infra.test_redrive import listed

FLOWS = ("fallback", "emergency")


# --- the current audit signing key -----------------------------------------------------------


def test_only_the_audit_writers_role_may_sign_with_the_current_signing_key(
    env: Synthesized, assembly: Assembly
) -> None:
    name = env.stage.stage_name
    policy = _keys_by_alias(env)["audit-signing"]["Properties"]["KeyPolicy"]["Statement"]
    (deny,) = [s for s in policy if s["Effect"] == "Deny"]
    writer = deny.pop("Condition")
    assert deny == {
        "Sid": "OnlyTheAuditWriterSigns",
        "Effect": "Deny",
        "Principal": {"AWS": "*"},
        "Action": "kms:Sign",
        "Resource": "*",
    }
    (exception,) = listed(writer.pop("ArnNotEquals").pop("aws:PrincipalArn"))
    assert writer == {}  # no other exception, and no other condition
    assert render(exception) == (
        f"arn:aws:iam::{env.stage.stateful.account}:role/fabric-{name}-audit-writer"
    )
    # That is the role the audit writer runs as.
    roles = {
        logical_id: role["Properties"].get("RoleName")
        for logical_id, role in of_type(services(env, assembly), "AWS::IAM::Role").items()
    }
    (writer_function,) = [
        f
        for f in fabric_functions(services(env, assembly)).values()
        if "writes audit batches" in f["Properties"]["Description"]
    ]
    assert roles[writer_function["Properties"]["Role"]["Fn::GetAtt"][0]] == (
        f"fabric-{name}-audit-writer"
    )
    # The account keeps the key's administration (the deny names kms:Sign only), and the
    # verifiers their kms:Verify.
    assert {
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{env.stage.stateful.account}:root"},
        "Action": "kms:*",
        "Resource": "*",
    } in policy


# --- the rotation function --------------------------------------------------------------------


def _function(template: dict[str, Any], description: str) -> dict[str, Any]:
    (function,) = [
        f
        for f in fabric_functions(template).values()
        if description in f["Properties"]["Description"]
    ]
    return function


def test_the_rotation_function_knows_each_users_secret_as_the_topology_function_does(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    rotation = _function(template, "rotates the RabbitMQ users' passwords")
    topology = _function(template, "applies the RabbitMQ topology")
    mapping = rotation["Properties"]["Environment"]["Variables"]["USER_SECRET_ARNS"]
    assert mapping == topology["Properties"]["Environment"]["Variables"]["USER_SECRET_ARNS"]
    # Every secret it has a schedule on is in it, and nothing else.
    schedules = of_type(template, "AWS::SecretsManager::RotationSchedule").values()
    scheduled = {json.dumps(s["Properties"]["SecretId"], sort_keys=True) for s in schedules}
    assert scheduled
    assert {json.dumps(arn, sort_keys=True) for arn in _joined_values(mapping)} == scheduled


def _joined_values(mapping: Any) -> list[Any]:
    """The ARNs of ``{"Fn::Join": ["", ['{"user": "', <arn>, '", ...']]}``: every other part."""
    (separator, parts) = mapping["Fn::Join"]
    assert separator == ""
    return [part for part in parts if not isinstance(part, str)]


# --- the fallback topics ----------------------------------------------------------------------


def _denied(statement: dict[str, Any], request: dict[str, str]) -> bool:
    """Whether the deny ``statement`` (StringNotEquals conditions only) applies to a
    Subscribe with the request context ``request``."""
    assert statement["Effect"] == "Deny"
    assert statement["Action"] == "sns:Subscribe"
    ((operator, keys),) = statement["Condition"].items()
    assert operator == "StringNotEquals"
    return all(request.get(key) not in listed(value) for key, value in keys.items())


def test_the_fallback_topics_admit_only_their_own_queues_subscriptions(env: Synthesized) -> None:
    name, account = env.stage.stage_name, env.stage.stateful.account
    queue_names = {
        logical_id: q["Properties"]["QueueName"]
        for logical_id, q in env.resources("AWS::SQS::Queue").items()
    }
    topics = {
        t["Properties"]["TopicName"]: logical_id
        for logical_id, t in env.resources("AWS::SNS::Topic").items()
    }
    for flow in FLOWS:
        topic = topics[f"fabric-{name}-{flow}"]
        (policy,) = [
            p
            for p in env.resources("AWS::SNS::TopicPolicy").values()
            if p["Properties"]["Topics"] == [{"Ref": topic}]
        ]
        denies = [
            s
            for s in policy["Properties"]["PolicyDocument"]["Statement"]
            if s["Effect"] == "Deny" and s["Action"] == "sns:Subscribe"
        ]
        assert {s["Sid"] for s in denies} == {
            "DenySubscribeExceptSqs",
            "DenySubscribeExceptOwnQueues",
        }

        def admitted(protocol: str, endpoint: str, denies: list[dict[str, Any]] = denies) -> bool:
            request = {"sns:Protocol": protocol, "sns:Endpoint": endpoint}
            return not any(_denied(s, request) for s in denies)

        # The stack's own subscriptions (CloudFormation's deploying role is denied like anyone).
        own = [
            (s["Properties"]["Protocol"], s["Properties"]["Endpoint"]["Fn::GetAtt"][0])
            for s in env.resources("AWS::SNS::Subscription").values()
            if s["Properties"]["TopicArn"] == {"Ref": topic}
        ]
        assert len(own) == 5
        for protocol, queue in own:
            endpoint = f"arn:aws:sqs:{env.region}:{account}:{queue_names[queue]}"
            assert admitted(protocol, endpoint), (flow, endpoint)
        # Nothing else: another protocol, another queue of the account (the other topic's, a
        # DLQ), a queue of another account.
        other = "emergency" if flow == "fallback" else "fallback"
        ours = f"arn:aws:sqs:{env.region}:{account}:fabric-{name}-{flow}-media"
        for protocol, endpoint in (
            ("https", "https://collector.example/fabric"),
            ("email", "someone@example.com"),
            ("lambda", f"arn:aws:lambda:{env.region}:{account}:function:reader"),
            ("https", ours),
            ("sqs", f"arn:aws:sqs:{env.region}:{account}:fabric-{name}-{other}-media"),
            ("sqs", f"{ours}-dlq"),
            ("sqs", f"arn:aws:sqs:{env.region}:999999999999:fabric-{name}-{flow}-media"),
        ):
            assert not admitted(protocol, endpoint), (flow, protocol, endpoint)


# --- the broker's log retention ---------------------------------------------------------------


def test_the_log_retention_provider_may_change_only_the_brokers_log_group_and_its_own(
    env: Synthesized,
) -> None:
    resources = env.json["Resources"]
    (retention,) = env.resources("Custom::LogRetention").values()
    provider = retention["Properties"]["ServiceToken"]["Fn::GetAtt"][0]
    role_id = resources[provider]["Properties"]["Role"]["Fn::GetAtt"][0]
    role = resources[role_id]["Properties"]
    assert "ManagedPolicyArns" not in role  # no AWSLambdaBasicExecutionRole (logs:* on "*")
    assert "Policies" not in role
    attached = {
        k: r
        for k, r in resources.items()
        if r["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy")
        and {"Ref": role_id} in r["Properties"].get("Roles", [])
    }
    (policy_id,) = attached
    # In place before the provider function exists, as CDK's own was: a policy created seconds
    # before the handler ran (IAM is eventually consistent) could fail a fresh deploy.
    assert policy_id in resources[provider]["DependsOn"]
    assert "AWS::AmazonMQ::Broker" not in json.dumps(attached[policy_id])

    stack_name = env.stage.stateful.stack_name
    prefix = f"arn:aws:logs:{env.region}:{env.stage.stateful.account}:log-group:"
    groups = {
        f"{prefix}/aws/amazonmq/broker/*/general": [
            "logs:CreateLogGroup",
            "logs:PutRetentionPolicy",
        ],
        f"{prefix}/aws/lambda/{stack_name}-LogRetention*": [
            "logs:CreateLogGroup",
            "logs:CreateLogStream",
            "logs:PutLogEvents",
            "logs:PutRetentionPolicy",
        ],
    }
    granted: dict[str, list[str]] = {}
    for statement in attached[policy_id]["Properties"]["PolicyDocument"]["Statement"]:
        assert statement["Effect"] == "Allow"
        for resource in listed(statement["Resource"]):
            arn = _with_refs(resource)
            granted.setdefault(arn.removesuffix(":*"), []).extend(listed(statement["Action"]))
            assert arn.removesuffix(":*") in groups, arn
    assert {arn: sorted(set(actions)) for arn, actions in granted.items()} == groups


def _with_refs(value: Any) -> str:
    """``value`` rendered, a resource's ``Ref`` as ``{<logical id>}``."""
    if isinstance(value, dict) and "Ref" in value:
        return f"{{{value['Ref']}}}"
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return str(separator).join(_with_refs(part) for part in parts)
    return render(value)


def test_the_fallback_subscriptions_wait_for_their_topics_policy(env: Synthesized) -> None:
    # The policy admits only the topic's own queues: a new queue's subscription made before
    # the policy names it would be refused, and the deploy rolled back.
    policies = {
        json.dumps(p["Properties"]["Topics"][0]): logical_id
        for logical_id, p in env.resources("AWS::SNS::TopicPolicy").items()
    }
    subscriptions = env.resources("AWS::SNS::Subscription")
    assert len(subscriptions) == 10
    for logical_id, subscription in subscriptions.items():
        policy = policies[json.dumps(subscription["Properties"]["TopicArn"])]
        assert policy in subscription.get("DependsOn", []), logical_id
