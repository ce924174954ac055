"""Automatic rotation of the broker users' passwords: a Secrets Manager rotation function."""

from __future__ import annotations

import json

from aws_cdk import Duration, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from constructs import Construct, IDependable

from stacks.constructs.function import FabricFunction, FunctionPlatform

ROTATION_DAYS = 30


class PasswordRotation(Construct):
    """``lambdas/rotation`` and a rotation schedule on each of the fabric's broker users' secrets.

    Every ``ROTATION_DAYS`` days Secrets Manager runs the function's four steps on a secret: a new
    password into its pending version, onto the broker's user through the management API (as the
    administrator), checked against the broker's hash, then made current (``fabric.rotation``).
    The administrator's own secret is not rotated here (docs/runbook.md). The function gets the
    users' secrets by name (``USER_SECRET_ARNS``, as the topology function) and rotates only
    those, each for the user it is mapped to, never the user a secret's value names.

    A rotation that stops after setSecret leaves the broker with the pending password: clients
    that fall back to ``AWSPENDING`` (``SecretCredentials``) keep working, those that read only
    ``AWSCURRENT`` (Lambda's Amazon MQ event sources) are refused until it is finished. Its
    ``Errors`` alarm says so and points to the runbook.

    The schedules live in this stack, next to the function, and are created once the topology
    (which creates the users) is applied; a new schedule does not rotate at deploy time. The role
    may change only the users' secrets and only read the administrator's; Secrets Manager of this
    account only may invoke the function.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        platform: FunctionPlatform,
        management_url: str,
        admin_secret: secretsmanager.ISecret,
        user_secrets: dict[str, secretsmanager.ISecret],
        secrets_key: kms.IKey,
        topology: IDependable,
        alarm_topic: sns.ITopic,
    ) -> None:
        super().__init__(scope, construct_id)
        self.function = FabricFunction(
            self,
            "Rotate",
            platform=platform,
            code_dir="lambdas/rotation",
            description=f"Messaging Fabric {env_name}: rotates the RabbitMQ users' passwords",
            environment={
                "MANAGEMENT_URL": management_url,
                "ADMIN_SECRET_ARN": admin_secret.secret_arn,
                # Which secret is whose, as the topology function has it: the function rotates
                # only these secrets, each for its own user, whatever user a secret names.
                "USER_SECRET_ARNS": json.dumps(
                    {name: secret.secret_arn for name, secret in sorted(user_secrets.items())}
                ),
            },
            # One rotation step at a time per secret; the schedules may come due together.
            reserved_concurrency=len(user_secrets),
            timeout=Duration.minutes(1),
            memory_size=256,
        )
        function = self.function.function
        self.function.allow_secret_read(admin_secret, secrets_key)
        region = Stack.of(self).region
        arns = [secret.secret_arn for _name, secret in sorted(user_secrets.items())]
        self.function.allow(
            (
                (
                    "RotateUserSecrets",
                    [
                        "secretsmanager:DescribeSecret",
                        "secretsmanager:GetSecretValue",
                        "secretsmanager:PutSecretValue",
                        "secretsmanager:UpdateSecretVersionStage",
                    ],
                    arns,
                    None,
                ),
                (
                    "SecretsKeyForTheseSecrets",
                    ["kms:Decrypt", "kms:GenerateDataKey"],
                    [secrets_key.key_arn],
                    {
                        "StringEquals": {
                            "kms:ViaService": f"secretsmanager.{region}.amazonaws.com",
                            "kms:EncryptionContext:SecretARN": arns,
                        }
                    },
                ),
            )
        )
        function.add_permission(
            "SecretsManager",
            principal=iam.ServicePrincipal("secretsmanager.amazonaws.com"),
            source_account=Stack.of(self).account,
        )
        permission = function.node.find_child("SecretsManager")
        self.schedules: dict[str, secretsmanager.CfnRotationSchedule] = {}
        for name, secret in sorted(user_secrets.items()):
            schedule = secretsmanager.CfnRotationSchedule(
                self,
                f"{name}Schedule",
                secret_id=secret.secret_arn,
                rotation_lambda_arn=function.function_arn,
                rotation_rules=secretsmanager.CfnRotationSchedule.RotationRulesProperty(
                    schedule_expression=f"rate({ROTATION_DAYS} days)"
                ),
                rotate_immediately_on_update=False,
            )
            # Secrets Manager's invoke permission, the role's policy, and the users to rotate.
            schedule.node.add_dependency(permission, self.function.role, topology)
            self.schedules[name] = schedule
        self.errors_alarm = self.function.errors_alarm(
            self,
            alarm_topic,
            description=(
                "A broker password rotation step failed. Before setSecret nothing changed. After "
                "it the broker holds the pending password: the fabric's functions and consumer "
                "toolkits fall back to it and keep working, but every client that reads only "
                "the secret's AWSCURRENT version is refused until the rotation finishes: Lambda's "
                "Amazon MQ event sources (the audit writer's on fabric.audit for "
                "fabric-audit-reader, a stakeholder's for its group's user). Read the function's "
                "logs, fix the cause and finish the rotation now (rotate-secret): "
                "docs/runbook.md, 'A failed rotation'."
            ),
        )
