"""The topics and queues keys usable only through their service, and data keys of the messages
key only for restricted payloads of their environment.

moto does not evaluate key policies or IAM conditions, so ``_applies`` does, for the few
condition operators these statements use, with IAM's rules: keys and operators are ANDed, a
key's values ORed; a negated operator counts a key the request lacks as differing (true);
``ForAllValues`` is true for a key the request lacks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from fnmatch import fnmatchcase
from typing import Any

import boto3
import pytest
from moto import mock_aws

from fabric.adapters.esdk import EsdkCipher
from fabric.adapters.memory import MemoryAuditSink, MemoryTransport
from fabric.router import Router
from fabric.routing import default_routing_table
from tests.infra.conftest import Assembly, Synthesized
from tests.infra.test_functions import fabric_functions, of_type, router, services
from tests.infra.test_keys import _keys_by_alias
from tests.infra.test_redrive import listed, statements

CRYPTO = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*"]
ADMINISTRATION = [
    "kms:PutKeyPolicy",
    "kms:ScheduleKeyDeletion",
    "kms:DisableKey",
    "kms:CreateGrant",
    "kms:DescribeKey",
]
RESTRICTED_KEYS = ["fabric:source", "fabric:classification", "fabric:environment"]

# (operator, does a key the request lacks match, does a request value match a policy value)
_OPERATORS: dict[str, tuple[bool, Any]] = {
    "StringEquals": (False, lambda actual, wanted: actual in wanted),
    "StringNotEquals": (True, lambda actual, wanted: actual not in wanted),
}


def _applies(statement: dict[str, Any], action: str, request: dict[str, Any]) -> bool:
    """Whether ``statement`` applies to ``action`` with the request context ``request``."""
    if not any(fnmatchcase(action, pattern) for pattern in listed(statement["Action"])):
        return False
    for operator, keys in statement.get("Condition", {}).items():
        for key, value in keys.items():
            wanted = listed(value)
            present = key in request
            if operator == "Null":
                matched = present is (wanted == ["false"])
            elif operator == "ForAllValues:StringEquals":
                matched = all(v in wanted for v in listed(request.get(key, [])))
            else:
                if_absent, compare = _OPERATORS[operator]  # KeyError: an operator to add here
                matched = compare(request[key], wanted) if present else if_absent
            if not matched:
                return False
    return True


def _deny(env: Synthesized, purpose: str) -> dict[str, Any]:
    statement: dict[str, Any]
    (statement,) = (
        s
        for s in _keys_by_alias(env)[purpose]["Properties"]["KeyPolicy"]["Statement"]
        if s["Effect"] == "Deny"
    )
    return statement


def _allowed_services(env: Synthesized, purpose: str) -> set[str]:
    return {
        service
        for s in _keys_by_alias(env)[purpose]["Properties"]["KeyPolicy"]["Statement"]
        if s["Effect"] == "Allow"
        for service in listed(s["Principal"].get("Service", []))
    }


def test_the_topics_and_queues_keys_deny_cryptography_outside_their_service(
    env: Synthesized,
) -> None:
    for purpose, sid, service, direct in (
        (
            "topics",
            "DenyUseExceptThroughSns",
            "sns",
            ["cloudwatch.amazonaws.com", "events.amazonaws.com"],
        ),
        ("queues", "DenyUseExceptThroughSqs", "sqs", ["events.amazonaws.com", "sns.amazonaws.com"]),
    ):
        assert _deny(env, purpose) == {
            "Sid": sid,
            "Effect": "Deny",
            "Principal": {"AWS": "*"},
            "Action": CRYPTO,
            "Resource": "*",
            "Condition": {
                "StringNotEquals": {
                    "kms:ViaService": f"{service}.{env.region}.amazonaws.com",
                    "aws:PrincipalServiceName": direct,
                }
            },
        }, purpose
        # Exactly the service principals the key's own statements admit: one missing here
        # would be denied what its statement allows, one too many would be exempt for nothing.
        assert set(direct) == _allowed_services(env, purpose), purpose


def test_key_administration_is_never_denied(env: Synthesized) -> None:
    """No deny of any key can lock the account out of its keys' administration."""
    for logical_id, key in env.resources("AWS::KMS::Key").items():
        for statement in key["Properties"]["KeyPolicy"]["Statement"]:
            if statement["Effect"] == "Deny":
                for action in ADMINISTRATION:
                    assert not _applies(statement, action, {}), (logical_id, action)


def test_every_legitimate_caller_of_the_topics_and_queues_keys_is_still_admitted(
    env: Synthesized,
) -> None:
    """Each path that reaches these keys, as the request context KMS evaluates."""
    via_sns = {"kms:ViaService": f"sns.{env.region}.amazonaws.com"}
    via_sqs = {"kms:ViaService": f"sqs.{env.region}.amazonaws.com"}
    admitted = {
        "topics": [
            via_sns,  # the router and the compliance report publishing to their topics
            {"aws:PrincipalServiceName": "cloudwatch.amazonaws.com"},  # alarms to on-call
            {**via_sns, "aws:PrincipalServiceName": "cloudwatch.amazonaws.com"},
            {"aws:PrincipalServiceName": "events.amazonaws.com"},  # the key-state rule to on-call
        ],
        "queues": [
            # Lambda's pollers (the function's role), a function's async DLQ, the router's
            # audit batches, the drain, the redrive, producers.
            via_sqs,
            {"aws:PrincipalServiceName": "sns.amazonaws.com"},  # fallback deliveries, sub DLQs
            {"aws:PrincipalServiceName": "events.amazonaws.com"},  # checkpoint dead letters
            {**via_sqs, "aws:PrincipalServiceName": "sns.amazonaws.com"},
        ],
    }
    refused = {
        "topics": [
            {},  # a role of the account calling KMS itself
            via_sqs,
            {"aws:PrincipalServiceName": "sns.amazonaws.com"},
        ],
        "queues": [{}, via_sns, {"aws:PrincipalServiceName": "cloudwatch.amazonaws.com"}],
    }
    for purpose in ("topics", "queues"):
        deny = _deny(env, purpose)
        for action in ("kms:Decrypt", "kms:GenerateDataKey", "kms:Encrypt", "kms:ReEncryptFrom"):
            for request in admitted[purpose]:
                assert not _applies(deny, action, request), (purpose, action, request)
            for request in refused[purpose]:
                assert _applies(deny, action, request), (purpose, action, request)


def _kms_statements(template: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
        for policy in of_type(template, kind).values():
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
                if any(a.startswith("kms:") for a in listed(statement["Action"])):
                    yield statement
    for role in of_type(template, "AWS::IAM::Role").values():
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                if any(a.startswith("kms:") for a in listed(statement["Action"])):
                    yield statement


def _is_messages_key(resource: Any, env: Synthesized) -> bool:
    """Whether ``resource`` (of either stack) is the messages key's ARN."""
    (messages,) = (
        logical_id
        for logical_id, key in env.resources("AWS::KMS::Key").items()
        if key["Properties"]["Description"].endswith("restricted payloads")
    )
    arn = {"Fn::GetAtt": [messages, "Arn"]}
    if isinstance(resource, dict) and "Fn::GetStackOutput" in resource:
        output = resource["Fn::GetStackOutput"]["OutputName"]
        return bool(env.json["Outputs"][output]["Value"] == arn)
    return bool(resource == arn)


def _router_statement(env: Synthesized, assembly: Assembly) -> dict[str, Any]:
    template = services(env, assembly)
    _, function = router(template)
    (statement,) = (
        s
        for s in statements(template, function)
        if s.get("Sid") == "MessagesKeyForRestrictedPayloads"
    )
    return statement


def test_the_router_gets_data_keys_only_for_restricted_payloads_of_its_environment(
    env: Synthesized, assembly: Assembly
) -> None:
    statement = _router_statement(env, assembly)
    assert statement["Action"] == "kms:GenerateDataKey"
    assert _is_messages_key(statement["Resource"], env)
    assert statement["Condition"] == {
        "StringEquals": {
            "kms:EncryptionContext:fabric:classification": "restricted",
            "kms:EncryptionContext:fabric:environment": env.stage.stage_name,
        },
        "Null": {"kms:EncryptionContext:fabric:source": "false"},
        "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": RESTRICTED_KEYS},
    }


def test_no_statement_grants_the_messages_key_without_the_restricted_context(
    env: Synthesized, assembly: Assembly
) -> None:
    """Not in either stack, and no kms statement on every key (which would include it)."""
    granted = 0
    for template in (services(env, assembly), env.json):
        for statement in _kms_statements(template):
            resources = listed(statement["Resource"])
            assert "*" not in resources, statement
            if any(_is_messages_key(r, env) for r in resources):
                granted += 1
                assert statement["Condition"] == _router_statement(env, assembly)["Condition"]
    assert granted == 1


REGION = "ap-southeast-3"


@pytest.fixture
def kms(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's KMS, with fake credentials so nothing can reach a real account."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield boto3.client("kms", region_name=REGION)


def _data_key_requests(kms: Any, environment: str) -> list[dict[str, Any]]:
    """The request context of every ``GenerateDataKey`` the router sends to KMS while routing
    one restricted message, with the ``FABRIC_ENV`` ``environment``."""
    seen: list[dict[str, str]] = []

    def client() -> Any:
        made = boto3.client("kms", region_name=REGION)
        made.meta.events.register(
            "provide-client-params.kms.GenerateDataKey",
            lambda params, **_: seen.append(dict(params.get("EncryptionContext", {}))),
        )
        return made

    key_arn = kms.create_key(Description="fabric messages")["KeyMetadata"]["Arn"]
    transport = MemoryTransport()
    result = Router(
        table=default_routing_table(),
        transports=[transport],
        cipher=EsdkCipher(key_arn, client_factory=client),
        audit=MemoryAuditSink(),
        environment=environment,
    ).route(
        [
            {
                "message_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
                "topic": "child-safety.incident.reported",
                "priority": "emergency",
                "classification": "restricted",
                "payload": {"child": "CANARY-child-name-Siti-Rahayu"},
            }
        ],
        source="community",
    )
    assert result.accepted == 1
    assert b"CANARY" not in transport.published[0].body  # sealed, so KMS was asked
    return [
        {
            **{f"kms:EncryptionContext:{k}": v for k, v in context.items()},
            "kms:EncryptionContextKeys": list(context),
        }
        for context in seen
    ]


def test_the_context_the_router_sends_to_kms_satisfies_its_synthesized_condition(
    env: Synthesized, assembly: Assembly, kms: Any
) -> None:
    """The router, as deployed (its ``FABRIC_ENV`` from the template), sealing a restricted
    payload through the Encryption SDK: every data-key request it makes is admitted."""
    statement = _router_statement(env, assembly)
    _, function = router(services(env, assembly))
    environment = function["Properties"]["Environment"]["Variables"]["FABRIC_ENV"]
    (request,) = _data_key_requests(kms, environment)
    assert _applies(statement, "kms:GenerateDataKey", request), request
    # Not a condition that admits anything: another environment's router, or the whole
    # context with the message id (a plain SDK's request), is refused.
    (other,) = _data_key_requests(kms, f"{environment}-other")
    assert not _applies(statement, "kms:GenerateDataKey", other)
    with_id = {
        **request,
        "kms:EncryptionContext:fabric:message_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "kms:EncryptionContextKeys": [*request["kms:EncryptionContextKeys"], "fabric:message_id"],
    }
    assert not _applies(statement, "kms:GenerateDataKey", with_id)


def test_whoever_may_use_the_topics_key_may_only_for_the_topics_it_publishes_to(
    env: Synthesized, assembly: Assembly
) -> None:
    """The router and the compliance report: SNS names the topic in its encryption context."""
    template = services(env, assembly)
    users = 0
    for function in fabric_functions(template).values():
        granted = statements(template, function)
        on_topics_key = [s for s in granted if "KeysTopics" in json.dumps(s["Resource"])]
        if not on_topics_key:
            continue
        users += 1
        (publish,) = (s for s in granted if listed(s["Action"]) == ["sns:Publish"])
        for statement in on_topics_key:
            condition = statement["Condition"]["StringEquals"]
            assert condition["kms:ViaService"] == f"sns.{env.region}.amazonaws.com"
            named = listed(condition["kms:EncryptionContext:aws:sns:topicArn"])
            assert sorted(map(json.dumps, named)) == sorted(
                map(json.dumps, listed(publish["Resource"]))
            )
    assert users == 2


def test_the_secrets_key_decrypts_only_the_secrets_a_function_may_read(
    env: Synthesized, assembly: Assembly
) -> None:
    """Secrets Manager names the secret in its encryption context (``SecretARN``)."""
    template = services(env, assembly)
    readers = 0
    for logical_id, function in fabric_functions(template).items():
        granted = statements(template, function)
        readable = {
            json.dumps(resource)
            for s in granted
            if "secretsmanager:GetSecretValue" in listed(s["Action"])
            for resource in listed(s["Resource"])
        }
        on_secrets_key = [s for s in granted if "KeysSecrets" in json.dumps(s["Resource"])]
        readers += bool(on_secrets_key)
        for statement in on_secrets_key:
            condition = statement["Condition"]["StringEquals"]
            assert condition["kms:ViaService"] == f"secretsmanager.{env.region}.amazonaws.com"
            named = listed(condition["kms:EncryptionContext:SecretARN"])
            assert {json.dumps(secret) for secret in named} <= readable | _written(granted), (
                logical_id,
                statement,
            )
    # router, drain, redrive, replay, audit writer, topology, rotation, broker metrics
    assert readers == 8


def _written(granted: list[dict[str, Any]]) -> set[str]:
    """The secrets the rotation writes new versions of (it encrypts them with the key)."""
    return {
        json.dumps(resource)
        for s in granted
        if "secretsmanager:PutSecretValue" in listed(s["Action"])
        for resource in listed(s["Resource"])
    }
