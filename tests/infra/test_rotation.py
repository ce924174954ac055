"""The broker users' passwords rotate automatically; the rotation function's reach is narrow."""

from __future__ import annotations

import json
from typing import Any

from tests.infra.conftest import Assembly, Synthesized
from tests.infra.test_functions import fabric_functions, of_type, services


def rotation_function(template: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    (item,) = (
        (k, v)
        for k, v in fabric_functions(template).items()
        if "rotates the RabbitMQ users' passwords" in v["Properties"]["Description"]
    )
    return item


def user_secrets(env: Synthesized) -> dict[str, str]:
    """Logical id -> description of every broker secret in the stateful stack."""
    return {
        logical_id: secret["Properties"]["Description"]
        for logical_id, secret in env.resources("AWS::SecretsManager::Secret").items()
        if "RabbitMQ" in secret["Properties"].get("Description", "")
    }


def secret_named_by(reference: Any, secrets: dict[str, str]) -> str:
    """The stateful secret a cross-stack reference names (by its output's name)."""
    output = reference["Fn::GetStackOutput"]["OutputName"]
    (logical_id,) = (k for k in secrets if f"Ref{k}" in output)
    return logical_id


def role_statements(template: dict[str, Any], function: dict[str, Any]) -> list[dict[str, Any]]:
    role = function["Properties"]["Role"]["Fn::GetAtt"][0]
    return [
        statement
        for policy in of_type(template, "AWS::IAM::Policy").values()
        if {"Ref": role} in policy["Properties"]["Roles"]
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]


def test_every_broker_users_secret_rotates_every_30_days_and_the_admins_does_not(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    function_id, _ = rotation_function(template)
    (topology_id,) = of_type(template, "Custom::FabricTopology")
    secrets = user_secrets(env)
    schedules = of_type(template, "AWS::SecretsManager::RotationSchedule").values()

    rotated = sorted(secret_named_by(s["Properties"]["SecretId"], secrets) for s in schedules)

    users = sorted(k for k, description in secrets.items() if "RabbitMQ user " in description)
    assert rotated == users
    # fabric-platform, -redrive, -audit-reader, one per stakeholder group, fabric-monitor
    assert len(users) == 9
    assert not [k for k in rotated if "administrator" in secrets[k]]
    for schedule in schedules:
        properties = schedule["Properties"]
        assert properties["RotationLambdaARN"] == {"Fn::GetAtt": [function_id, "Arn"]}
        assert properties["RotationRules"] == {"ScheduleExpression": "rate(30 days)"}
        assert properties["RotateImmediatelyOnUpdate"] is False
        assert topology_id in schedule["DependsOn"]  # the users exist before a rotation


def test_the_rotation_function_may_change_the_users_secrets_and_only_read_the_admins(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    _, function = rotation_function(template)
    secrets = user_secrets(env)
    statements = role_statements(template, function)

    writes = [s for s in statements if "secretsmanager:PutSecretValue" in s["Action"]]
    (write,) = writes
    assert sorted(write["Action"]) == [
        "secretsmanager:DescribeSecret",
        "secretsmanager:GetSecretValue",
        "secretsmanager:PutSecretValue",
        "secretsmanager:UpdateSecretVersionStage",
    ]
    written = {secret_named_by(ref, secrets) for ref in write["Resource"]}
    assert written == {k for k, d in secrets.items() if "RabbitMQ user " in d}
    reads = [s for s in statements if s not in writes and "secretsmanager:" in json.dumps(s)]
    (read,) = reads
    assert "administrator" in secrets[secret_named_by(read["Resource"], secrets)]
    assert sorted(read["Action"]) == [
        "secretsmanager:DescribeSecret",
        "secretsmanager:GetSecretValue",
    ]
    secrets_key = [s for s in statements if "KeysSecrets" in json.dumps(s["Resource"])]
    assert secrets_key
    assert all("secretsmanager." in json.dumps(s["Condition"]) for s in secrets_key)
    (new_versions,) = [s for s in secrets_key if "kms:GenerateDataKey" in s["Action"]]
    encrypts_for = new_versions["Condition"]["StringEquals"]["kms:EncryptionContext:SecretARN"]
    assert {secret_named_by(ref, secrets) for ref in encrypts_for} == written
    for statement in statements:
        actions = statement["Action"]
        actions = actions if isinstance(actions, list) else [actions]
        assert "secretsmanager:GetRandomPassword" not in actions  # passwords come from the OS
        if statement["Resource"] == "*":
            assert all(a.startswith(("xray:", "ec2:")) for a in actions), statement


def test_only_secrets_manager_of_this_account_may_invoke_the_rotation_function(
    env: Synthesized, assembly: Assembly
) -> None:
    template = services(env, assembly)
    function_id, _ = rotation_function(template)
    permissions = [
        p["Properties"]
        for p in of_type(template, "AWS::Lambda::Permission").values()
        if p["Properties"]["FunctionName"] == {"Fn::GetAtt": [function_id, "Arn"]}
    ]

    assert permissions == [
        {
            "Action": "lambda:InvokeFunction",
            "FunctionName": {"Fn::GetAtt": [function_id, "Arn"]},
            "Principal": "secretsmanager.amazonaws.com",
            "SourceAccount": env.stage.services.account,
        }
    ]
