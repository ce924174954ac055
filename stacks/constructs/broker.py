"""Amazon MQ for RabbitMQ broker: private, logged, with its admin password in Secrets Manager."""

from __future__ import annotations

import json

from aws_cdk import Fn, RemovalPolicy, Stack
from aws_cdk import aws_amazonmq as amazonmq
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from fabric.rotation import EXCLUDED_PASSWORD_CHARACTERS, PASSWORD_LENGTH
from stacks.config import BrokerConfig, DeploymentMode
from stacks.nag import acknowledge, ignore_cfn_lint

ADMIN_USERNAME = "fabric-admin"

_ROTATION_RULES = (
    "AwsSolutions-SMG4",
    "HIPAA.Security-SecretsManagerRotationEnabled",
    "NIST.800.53.R5-SecretsManagerRotationEnabled",
)
_ADMIN_ROTATION_REASON = (
    "The broker administrator is the identity the rotation function and the topology function "
    "log in as to change every other user; rotating it with that same function could lock the "
    "fabric out of its own broker if a rotation stopped half-way. It is rotated by the runbook's "
    "procedure 'Rotating the broker administrator' (docs/runbook.md)."
)
_USER_ROTATION_REASON = (
    "Rotated automatically every 30 days by the rotation schedule on this secret in the "
    "services stack (stacks/constructs/rotation.py, next to its function), which cdk-nag does "
    "not see from this stack; tests/infra/test_rotation.py checks that every user's secret has "
    "one."
)


def user_secret(
    scope: Construct,
    construct_id: str,
    *,
    username: str,
    description: str,
    key: kms.IKey,
    removal_policy: RemovalPolicy,
    rotation: str,
) -> secretsmanager.Secret:
    """A generated ``{"username", "password"}`` secret for one RabbitMQ user, under ``key``;
    ``rotation`` says how it is rotated, for the gates' rotation rules."""
    secret = secretsmanager.Secret(
        scope,
        construct_id,
        description=description,
        encryption_key=key,
        removal_policy=removal_policy,
        generate_secret_string=secretsmanager.SecretStringGenerator(
            secret_string_template=json.dumps({"username": username}),
            generate_string_key="password",
            password_length=PASSWORD_LENGTH,
            exclude_characters=EXCLUDED_PASSWORD_CHARACTERS,
        ),
    )
    for rule in _ROTATION_RULES:
        acknowledge(secret, rule, rotation)
    return secret


class Broker(Construct):
    """The RabbitMQ broker of one environment.

    Not publicly accessible, in the given private subnets (one for SINGLE_INSTANCE, one per AZ for
    CLUSTER_MULTI_AZ), behind ``security_group``; general logs on, with the retention of the
    environment set on the log group Amazon MQ creates; automatic minor version upgrades in the
    configured maintenance window. The admin password is generated in Secrets Manager, encrypted
    with the secrets key, and reaches CloudFormation only as a dynamic reference.

    Amazon MQ for RabbitMQ encrypts its storage with an AWS-owned key; it cannot use a customer
    key, which is why restricted payloads are also encrypted at message level.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        config: BrokerConfig,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        security_group: ec2.ISecurityGroup,
        secrets_key: kms.IKey,
        log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)

        self.admin_secret = user_secret(
            self,
            "AdminSecret",
            username=ADMIN_USERNAME,
            description=f"Messaging Fabric {env_name}: RabbitMQ broker administrator",
            key=secrets_key,
            removal_policy=removal_policy,
            rotation=_ADMIN_ROTATION_REASON,
        )

        all_subnets = vpc.select_subnets(
            subnet_type=subnets.subnet_type, one_per_az=True
        ).subnet_ids
        subnet_ids = (
            all_subnets
            if config.deployment_mode is DeploymentMode.CLUSTER_MULTI_AZ
            else all_subnets[:1]
        )
        window = config.maintenance_window
        # Literal, so any stack (and an operator) can name it: `fabric-<env>`.
        self.broker_name = f"fabric-{env_name}"
        self.broker = amazonmq.CfnBroker(
            self,
            "Broker",
            broker_name=self.broker_name,
            engine_type="RABBITMQ",
            engine_version=config.engine_version,
            host_instance_type=config.instance_type,
            deployment_mode=config.deployment_mode.value,
            publicly_accessible=False,
            auto_minor_version_upgrade=True,
            subnet_ids=subnet_ids,
            security_groups=[security_group.security_group_id],
            logs=amazonmq.CfnBroker.LogListProperty(general=True),
            maintenance_window_start_time=amazonmq.CfnBroker.MaintenanceWindowProperty(
                day_of_week=window.day_of_week,
                time_of_day=window.time_of_day,
                time_zone=window.time_zone,
            ),
            users=[
                amazonmq.CfnBroker.UserProperty(
                    username=ADMIN_USERNAME,
                    password=self.admin_secret.secret_value_from_json("password").unsafe_unwrap(),
                )
            ],
        )
        self.broker.apply_removal_policy(removal_policy)

        # Amazon MQ creates the general log group itself, named after the broker id that exists
        # only once the broker does; LogRetention sets the retention on that group.
        self.log_group_name = Fn.join("", ["/aws/amazonmq/broker/", self.broker.ref, "/general"])
        logs.LogRetention(
            self,
            "GeneralLogRetention",
            log_group_name=self.log_group_name,
            retention=log_retention,
        )
        self._acknowledge_log_retention_provider()

        # Amazon MQ names every RabbitMQ endpoint after the broker id: AMQPS on
        # <id>.mq.<region>.amazonaws.com:5671 and the console and management API on https://<same>
        # (for a cluster, the load balancer in front of the nodes). Built from the id, a plain
        # string, because the endpoint attributes are lists, which cannot cross stacks.
        self.host = Fn.join("", [self.broker.ref, ".mq.", Stack.of(self).region, ".amazonaws.com"])
        self.amqp_endpoint = Fn.join("", ["amqps://", self.host, ":5671"])
        self.management_url = Fn.join("", ["https://", self.host])
        self.broker_arn = self.broker.attr_arn
        self.broker_id = self.broker.ref

    def _acknowledge_log_retention_provider(self) -> None:
        """Acknowledge the findings on CDK's LogRetention provider (one per stack)."""
        stack = Stack.of(self)
        provider = next(
            child for child in stack.node.children if child.node.id.startswith("LogRetention")
        )
        why = (
            "CDK's LogRetention provider runs only at deploy time, invoked by CloudFormation, to "
            "set the retention of the broker's general log group, whose name contains the broker "
            "id and so cannot be created or scoped in advance."
        )
        # Each on the resource it is about: the managed policy on the role, the wildcard and the
        # inline policy on the role's default policy.
        role = provider.node.find_child("ServiceRole")
        policy = role.node.find_child("DefaultPolicy").node.find_child("Resource")
        acknowledge(
            role.node.find_child("Resource"),
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AWSLambdaBasicExecutionRole]",
            why,
        )
        for rule in (
            "AwsSolutions-IAM5[Resource::*]",
            "HIPAA.Security-IAMNoInlinePolicy",
            "NIST.800.53.R5-IAMNoInlinePolicy",
        ):
            acknowledge(policy, rule, why)
        # CDK adds a DependsOn on the role next to a GetAtt of it; cfn-lint calls that redundant.
        ignore_cfn_lint(provider.node.find_child("Resource"), "W3005")


class BrokerUsers(Construct):
    """One generated secret per RabbitMQ user the topology creates (``{"username", "password"}``).

    The topology custom resource reads them to create the users through the management API; each
    function reads only the secret of the user it connects as; the services stack's
    ``PasswordRotation`` rotates them.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        usernames: list[str],
        secrets_key: kms.IKey,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        self.secrets: dict[str, secretsmanager.Secret] = {}
        for username in usernames:
            self.secrets[username] = user_secret(
                self,
                username,
                username=username,
                description=f"Messaging Fabric {env_name}: RabbitMQ user {username}",
                key=secrets_key,
                removal_policy=removal_policy,
                rotation=_USER_ROTATION_REASON,
            )
