"""Lambda defaults in one place: every fabric function is built by ``FabricFunction``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from stacks.constructs.queues import QueueAddress
from stacks.nag import acknowledge, ignore_cfn_lint

# An identity-policy statement: (sid, actions, resources, conditions or None).
Statement = tuple[str, list[str], list[str], dict[str, Any] | None]

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = lambda_.Runtime.PYTHON_3_14
ARCHITECTURE = lambda_.Architecture.ARM_64
# Built by scripts/build_assets.py (pip --platform, no Docker) before any synth.
DEPS_LAYER_DIR = ROOT / "build" / "layers" / "deps"
FABRIC_LAYER_DIR = ROOT / "build" / "layers" / "fabric"


def router_role_name(env_name: str) -> str:
    """The router's execution role (the router function itself has a generated name)."""
    return f"fabric-{env_name}-router"


def role_arn(scope: Construct, role_name: str) -> str:
    """The ARN of IAM role ``role_name`` (path ``/``) in ``scope``'s account, from its name.

    The stateful stack names the functions' roles this way in its queue policies: a reference to
    a role of the services stack would make each stack depend on the other.
    """
    return Stack.of(scope).format_arn(
        service="iam", region="", resource="role", resource_name=role_name
    )


@dataclass(frozen=True)
class FunctionPlatform:
    """What every function shares: network, layers, keys for logs and queues, log retention.

    ``security_group`` is the function's one group, which decides the broker port it reaches
    (``FabricNetwork``: AMQPS, the management API, or none); the services stack gives each
    function a copy with its own.
    """

    vpc: ec2.IVpc
    subnets: ec2.SubnetSelection
    security_group: ec2.ISecurityGroup
    layers: tuple[lambda_.ILayerVersion, ...]
    logs_key: kms.IKey
    queues_key: kms.IKey
    log_retention: logs.RetentionDays
    removal_policy: RemovalPolicy


def build_layers(scope: Construct, env_name: str) -> tuple[lambda_.ILayerVersion, ...]:
    """The dependency layer and the fabric library layer, from the prebuilt directories.

    Raises:
        FileNotFoundError: the layers were not built (run ``make assets``).
    """
    for directory in (DEPS_LAYER_DIR, FABRIC_LAYER_DIR):
        if not (directory / "python").is_dir():
            raise FileNotFoundError(f"{directory} is missing: run `make assets` first")
    return tuple(
        lambda_.LayerVersion(
            scope,
            name,
            code=lambda_.Code.from_asset(str(directory)),
            compatible_runtimes=[RUNTIME],
            compatible_architectures=[ARCHITECTURE],
            description=f"Messaging Fabric {env_name}: {what}",
        )
        for name, directory, what in (
            (
                "DepsLayer",
                DEPS_LAYER_DIR,
                "pinned runtime dependencies (pika, Encryption SDK, Powertools)",
            ),
            ("FabricLayer", FABRIC_LAYER_DIR, "the fabric library"),
        )
    )


class FabricFunction(Construct):
    """A fabric Lambda function with the platform defaults.

    Python 3.14 on arm64; JSON logs into its own KMS-encrypted log group with the environment's
    retention; X-Ray tracing; inside the VPC's private subnets with the platform's security group;
    reserved concurrency; a KMS-encrypted dead-letter queue for failed asynchronous invocations;
    its own role (named ``role_name`` if given), whose
    only AWS-side permissions are the ENI actions Lambda needs in a VPC, writing to its own log
    group, and the queues key through SQS (for writing to its own DLQ, and to any queue of that
    key it may send to or consume, ``allow_send``). Everything else is granted by the stack
    that uses it.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        platform: FunctionPlatform,
        code_dir: str,
        description: str,
        environment: dict[str, str],
        reserved_concurrency: int,
        timeout: Duration,
        memory_size: int = 512,
        function_name: str | None = None,
        role_name: str | None = None,
    ) -> None:
        """``role_name`` names the execution role (default: a generated name).

        A named role can be referred to from the stateful stack by its ARN, built from the name
        (``role_arn``), as the queue policies that admit only named senders do; only those
        senders' roles are named (a renamed role is replaced on deploy).
        """
        super().__init__(scope, construct_id)
        self.log_group = logs.LogGroup(
            self,
            "Logs",
            encryption_key=platform.logs_key,
            retention=platform.log_retention,
            removal_policy=platform.removal_policy,
        )
        self.dead_letter_queue = sqs.Queue(
            self,
            "AsyncDlq",
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=platform.queues_key,
            enforce_ssl=True,
            retention_period=Duration.days(14),
            removal_policy=platform.removal_policy,
        )
        acknowledge(
            self.dead_letter_queue,
            "AwsSolutions-SQS3",
            "This queue is itself the dead-letter queue of a Lambda function's asynchronous "
            "invocations; the function's DeadLetterConfig points here, which cdk-nag does not see.",
        )
        self.role = iam.Role(
            self,
            "Role",
            role_name=role_name,
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"{description} (Lambda execution role)",
        )
        self.basics = iam.ManagedPolicy(
            self,
            "Basics",
            roles=[self.role],
            statements=[
                iam.PolicyStatement(
                    sid="OwnLogGroup",
                    actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                    resources=[self.log_group.log_group_arn],
                ),
                # Lambda writes a failed asynchronous event to the DLQ as this role; the DLQ is
                # SSE-KMS, so sending needs a data key of the queues key (CDK grants only
                # sqs:SendMessage). The same covers every other queue of the queues key that
                # the function may send to (allow_send).
                iam.PolicyStatement(
                    sid="OwnDeadLetterQueueKey",
                    actions=["kms:GenerateDataKey", "kms:Decrypt"],
                    resources=[platform.queues_key.key_arn],
                    conditions={
                        "StringEquals": {
                            "kms:ViaService": f"sqs.{Stack.of(self).region}.amazonaws.com"
                        }
                    },
                ),
                iam.PolicyStatement(
                    sid="VpcNetworkInterfaces",
                    actions=[
                        "ec2:CreateNetworkInterface",
                        "ec2:DescribeNetworkInterfaces",
                        "ec2:DeleteNetworkInterface",
                        "ec2:AssignPrivateIpAddresses",
                        "ec2:UnassignPrivateIpAddresses",
                    ],
                    resources=["*"],
                ),
            ],
        )
        # The ENI actions' wildcard, on the one policy that holds it (X-Ray's: below).
        acknowledge(
            self.basics,
            "AwsSolutions-IAM5[Resource::*]",
            "Only the EC2 network-interface actions Lambda needs to run a function in a VPC, as "
            "AWS's AWSLambdaVPCAccessExecutionRole grants them. DescribeNetworkInterfaces takes "
            "no resource; the other four could be scoped to the VPC's subnets, security groups "
            "and network interfaces, not done until a deploy can show Lambda's network "
            "interface management still works (a wrong scope fails every function's creation).",
        )
        for rule in ("HIPAA.Security-IAMNoInlinePolicy", "NIST.800.53.R5-IAMNoInlinePolicy"):
            acknowledge(
                self.role,
                rule,
                "The inline default policy holds only the grants of this one function, each "
                "scoped to the exact resource it uses (but X-Ray's two tracing actions, which "
                "take no resource); a managed policy per grant adds nothing.",
            )
        self.function = lambda_.Function(
            self,
            "Function",
            function_name=function_name,
            runtime=RUNTIME,
            architecture=ARCHITECTURE,
            handler="handler.handler",
            code=lambda_.Code.from_asset(str(ROOT / code_dir), exclude=["__pycache__"]),
            description=description,
            layers=list(platform.layers),
            environment=environment,
            role=self.role,
            vpc=platform.vpc,
            vpc_subnets=platform.subnets,
            security_groups=[platform.security_group],
            allow_public_subnet=False,
            reserved_concurrent_executions=reserved_concurrency,
            timeout=timeout,
            memory_size=memory_size,
            tracing=lambda_.Tracing.ACTIVE,
            logging_format=lambda_.LoggingFormat.JSON,
            log_group=self.log_group,
            dead_letter_queue=self.dead_letter_queue,
        )
        # Active tracing made CDK put X-Ray's two actions, on any resource, into the role's
        # default policy: acknowledged there, not on the function's other resources.
        acknowledge(
            self.role.node.find_child("DefaultPolicy"),
            "AwsSolutions-IAM5[Resource::*]",
            "Only X-Ray's PutTraceSegments and PutTelemetryRecords, which CDK grants for active "
            "tracing and which support no resource-level permissions.",
        )
        # CDK makes the function depend on its role next to a GetAtt of the role's ARN.
        ignore_cfn_lint(self.function.node.find_child("Resource"), "W3005")
        # Lambda checks, when it creates a function in a VPC, that the role may manage network
        # interfaces: those permissions are in Basics, which nothing else makes it wait for.
        self.function.node.add_dependency(self.basics)

    def allow(self, statements: Iterable[Statement]) -> None:
        """Add ``(sid, actions, resources, conditions)`` statements to the function's role."""
        for sid, allowed, resources, conditions in statements:
            self.role.add_to_principal_policy(
                iam.PolicyStatement(
                    sid=sid, actions=allowed, resources=resources, conditions=conditions
                )
            )

    def errors_alarm(
        self, scope: Construct, topic: sns.ITopic, *, description: str
    ) -> cloudwatch.Alarm:
        """``Errors`` in ``scope``: the function failed at least once in five minutes; alarm
        and OK to ``topic``."""
        return paging_alarm(
            scope,
            "Errors",
            self.function.metric_errors(statistic="Sum", period=Duration.minutes(5)),
            topic=topic,
            description=description,
        )

    def allow_send(self, queue: QueueAddress, *, sid: str) -> None:
        """Let the function send to ``queue``, a named queue encrypted with the queues key.

        ``sqs:SendMessage`` on that one queue, named by its literal-name address (no cross-stack
        output). The data key that sending to an SSE-KMS queue needs is already granted on the
        queues key, through SQS only (``OwnDeadLetterQueueKey``). A statement id of its own
        keeps the grant apart from others when CDK minimizes the policy.
        """
        self.role.add_to_principal_policy(
            iam.PolicyStatement(sid=sid, actions=["sqs:SendMessage"], resources=[queue.arn])
        )

    def allow_secret_read(self, secret: secretsmanager.ISecret, key: kms.IKey) -> None:
        """Let the function read ``secret``, encrypted with ``key``, through Secrets Manager,
        and use ``key`` for that secret only (``kms:EncryptionContext:SecretARN``).

        Written as identity-policy statements on the function's role: CDK's ``grant_read``
        would put the KMS part into the key's policy (a ViaService principal cannot carry an
        identity statement), and the key lives in the stateful stack, which must not refer back
        to the functions' stack.
        """
        self.role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"],
                resources=[secret.secret_arn],
            )
        )
        # For this secret only: Secrets Manager names it in its encryption context.
        self.role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["kms:Decrypt"],
                resources=[key.key_arn],
                conditions={
                    "StringEquals": {
                        "kms:ViaService": f"secretsmanager.{Stack.of(self).region}.amazonaws.com",
                        "kms:EncryptionContext:SecretARN": secret.secret_arn,
                    }
                },
            )
        )


def paging_alarm(
    scope: Construct,
    construct_id: str,
    metric: cloudwatch.IMetric,
    *,
    topic: sns.ITopic,
    description: str,
    threshold: float = 1,
    comparison: cloudwatch.ComparisonOperator = (
        cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD
    ),
    missing: cloudwatch.TreatMissingData = cloudwatch.TreatMissingData.NOT_BREACHING,
    periods: int = 1,
) -> cloudwatch.Alarm:
    """An alarm on ``metric`` that notifies ``topic`` on ALARM and on OK; missing data is
    healthy unless ``missing`` says otherwise. One breaching period of the last ``periods``
    raises it: it is OK again only after ``periods`` quiet ones."""
    alarm = cloudwatch.Alarm(
        scope,
        construct_id,
        metric=metric,
        threshold=threshold,
        comparison_operator=comparison,
        evaluation_periods=periods,
        datapoints_to_alarm=1,
        treat_missing_data=missing,
        alarm_description=description,
    )
    alarm.add_alarm_action(actions.SnsAction(topic))
    alarm.add_ok_action(actions.SnsAction(topic))
    return alarm
