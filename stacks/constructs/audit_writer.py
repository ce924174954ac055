"""The audit writer function: audit batches into the Object Lock bucket, an hourly checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fabric import metrics
from fabric.audit_writer import MAX_BATCHES_PER_WRITE
from fabric.topology import AUDIT_QUEUE
from stacks.constructs.audit_queue import WRITER_TIMEOUT
from stacks.constructs.function import FabricFunction, FunctionPlatform, paging_alarm
from stacks.constructs.queues import QueueAddress
from stacks.constructs.router import VIRTUAL_HOST
from stacks.nag import acknowledge, wildcard_resource_finding

# One writer per chain. The writer's chain state (the last sequence number and hash) is one
# item of the idempotency table, advanced by a conditional write on its version; a second
# instance would chain after the same state, lose the conditional write, and fail its batch with
# ChainConflict over and over. Amazon MQ's RabbitMQ event source runs one instance at a time
# anyway; the SQS event source and the hourly checkpoint take turns with it (throttled, retried).
_CONCURRENCY = 1
# The SQS event source's maximum concurrency: the lowest Lambda accepts (it cannot be 1). AWS
# advises a maximum at or below the reserved concurrency, so that the pollers stop receiving
# batches the function cannot take; without one they scale to five or more batches in flight,
# all but one throttled, and every receive counts towards the queue's maxReceiveCount (which
# stacks/constructs/audit_queue.py sets to a day's worth for the throttles that remain).
_QUEUE_MAX_CONCURRENCY = 2
_MEMORY_MB = 1024
# Up to 99 audit batches per invocation from RabbitMQ, collected for at most 5 seconds: one
# object in the bucket per invocation, so bigger batches mean fewer, larger objects. 99, not the
# event source's 100: the writer saves its chain and a mark per batch in one DynamoDB
# transaction of at most 100 actions (fabric.audit_writer.MAX_BATCHES_PER_WRITE).
_BROKER_BATCH_SIZE = MAX_BATCHES_PER_WRITE
_BROKER_BATCHING_WINDOW_SECONDS = 5
_QUEUE_BATCH_SIZE = 10
# Where the writer puts objects (fabric.audit_writer.object_key, its archive twin, and
# checkpoint_key).
OBJECT_PREFIXES = ("audit/", "archive/", "checkpoints/")
# The items the writer reads and writes (fabric.adapters.audit_storage.DynamoDbChainStore).
CHAIN_ITEM_PREFIX = "audit-chain#"
BATCH_ITEM_PREFIX = "audit-batch#"
# fabric.adapters.kms_signer.ALGORITHM: the signing key is ECC_NIST_P256, SIGN_VERIFY.
SIGNING_ALGORITHM = "ECDSA_SHA_256"


def signing_environment(signing_keys: Sequence[kms.IKey]) -> dict[str, str]:
    """A verifier's variables (``fabric.settings``) for ``signing_keys``, oldest first:
    ``SIGNING_KEY_ARN`` the current key, ``RETIRED_SIGNING_KEY_ARNS`` the ones before it."""
    *retired, current = signing_keys
    variables = {"SIGNING_KEY_ARN": current.key_arn}
    if retired:
        variables["RETIRED_SIGNING_KEY_ARNS"] = ",".join(key.key_arn for key in retired)
    return variables


def audit_writer_name(env_name: str) -> str:
    """``fabric-<env>-audit-writer``: the function, and the chain it writes (AUDIT_WRITER_NAME)."""
    return f"fabric-{env_name}-audit-writer"


def checkpoint_rule_name(env_name: str) -> str:
    """``fabric-<env>-audit-checkpoint``: the hourly rule. Named, so the queues key's policy can
    let EventBridge write this one rule's undeliverable events to the writer's SSE-KMS DLQ."""
    return f"fabric-{env_name}-audit-checkpoint"


class AuditWriter(Construct):
    """``lambdas/audit_writer``: the only writer of the audit trail.

    Triggers: the RabbitMQ audit queue ``fabric.audit`` (Amazon MQ event source, as the
    audit reader ``fabric-audit-reader``, which may read that queue and nothing else), the SQS
    audit queue ``fabric-<env>-audit`` (batches sent while the broker was down; all or nothing,
    like the broker's: the function writes an event's batches as one object or raises, so the
    event comes back whole; it never reports single items, although the event source has
    ReportBatchItemFailures on), and an hourly EventBridge rule with ``{"checkpoint": true}``
    that seals the objects written since the last checkpoint with the asymmetric signing key.

    Reserved concurrency 1: one writer per chain. The chain state is one item advanced by a
    conditional write; two instances at once would conflict on it, and the loser's batch would
    fail and be retried until it gave up. The SQS event source has the lowest maximum
    concurrency Lambda allows (2), so its pollers hold few batches the one instance cannot take.

    Grants, each on its exact resource: ``s3:PutObject`` and ``s3:GetObject`` (for HeadObject's
    checksum of a key a conditional write found taken) under ``audit/``, ``archive/`` and
    ``checkpoints/`` of the audit bucket (nothing that sets or bypasses retention, puts a legal
    hold, deletes, or changes the Object Lock configuration; retention comes from the bucket's
    default), the audit
    key through S3 for that bucket only, ``kms:Sign``/``kms:Verify`` with ECDSA_SHA_256 on the
    signing key only, the chain and batch-mark items of the idempotency table (``GetItem``,
    ``BatchGetItem``, ``PutItem``, the last one also for the Puts of ``TransactWriteItems``), the
    tables key through DynamoDB, consuming the SQS audit queue, and what the Amazon MQ event
    source needs (the broker's description, the audit reader's secret, the ENIs in the
    broker's VPC). Errors alarm as ``AuditWriterErrors``, refused audit batches as
    ``AuditWriterBatchesRefused``; failed asynchronous invocations (the checkpoint) land in the
    function's async DLQ, with ``FunctionDlqDepth``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        platform: FunctionPlatform,
        broker_arn: str,
        broker_secret: secretsmanager.ISecret,
        secrets_key: kms.IKey,
        audit_queue: QueueAddress,
        bucket_name: str,
        bucket_key: kms.IKey,
        table: dynamodb.ITable,
        table_key: kms.IKey,
        signing_key: kms.IKey,
        alarm_topic: sns.ITopic,
    ) -> None:
        super().__init__(scope, construct_id)
        name = audit_writer_name(env_name)
        # By name (an explicit Fn::GetStackOutput from the stateful stack), so the object ARNs
        # under the bucket are known here and their wildcard can be acknowledged exactly.
        bucket = s3.Bucket.from_bucket_name(self, "AuditBucket", bucket_name)
        self.function = FabricFunction(
            self,
            "AuditWriter",
            platform=platform,
            code_dir="lambdas/audit_writer",
            function_name=name,
            # Named like the function: the signing key retired last admits only this role.
            role_name=name,
            description=(
                f"Messaging Fabric {env_name}: writes audit batches to the Object Lock bucket"
            ),
            environment={
                "FABRIC_ENV": env_name,
                "AUDIT_BUCKET": bucket.bucket_name,
                "IDEMPOTENCY_TABLE": table.table_name,
                "SIGNING_KEY_ARN": signing_key.key_arn,
                "AUDIT_WRITER_NAME": name,
            },
            reserved_concurrency=_CONCURRENCY,
            timeout=WRITER_TIMEOUT,
            memory_size=_MEMORY_MB,
        )
        function = self.function.function
        self._grant_trail(
            name=name,
            bucket=bucket,
            bucket_key=bucket_key,
            table=table,
            table_key=table_key,
            signing_key=signing_key,
        )
        self._broker_source(broker_arn, broker_secret, secrets_key)

        # The SQS audit queue by its literal-name ARN (no cross-stack output). Its data key is
        # the queues key, already usable through SQS by every function (OwnDeadLetterQueueKey).
        queue = sqs.Queue.from_queue_arn(self, "AuditQueue", audit_queue.arn)
        function.add_event_source(
            event_sources.SqsEventSource(
                queue,
                batch_size=_QUEUE_BATCH_SIZE,
                report_batch_item_failures=True,
                max_concurrency=_QUEUE_MAX_CONCURRENCY,
            )
        )

        # EventBridge invokes asynchronously; Lambda's own retries and the function's async DLQ
        # cover a failed checkpoint, the target's retries and the same DLQ an undelivered one.
        self.checkpoint_rule = events.Rule(
            self,
            "Checkpoint",
            rule_name=checkpoint_rule_name(env_name),
            description=f"Messaging Fabric {env_name}: hourly audit checkpoint",
            schedule=events.Schedule.rate(Duration.hours(1)),
            targets=[
                targets.LambdaFunction(
                    function,
                    event=events.RuleTargetInput.from_object({"checkpoint": True}),
                    retry_attempts=2,
                    dead_letter_queue=self.function.dead_letter_queue,
                )
            ],
        )

        self.errors_alarm = self.function.errors_alarm(
            self,
            alarm_topic,
            description=(
                "The audit writer failed: audit batches are waiting on the RabbitMQ or SQS audit "
                "queue, or a checkpoint was not sealed. Read the writer's logs (docs/runbook.md)."
            ),
        )
        self.refused_alarm = self._refused_alarm(env_name, alarm_topic)

    def _refused_alarm(self, env_name: str, alarm_topic: sns.ITopic) -> cloudwatch.Alarm:
        """``BatchesRefused``: the writer stored an audit batch as a ``refused-batch`` or
        ``unreadable-batch`` record. Nobody else learns of it: the broker confirmed the batch,
        so its sender counts it stored, and only the compliance report shows its copies
        undelivered."""
        # Written only when a batch is refused: no data is the healthy state.
        return paging_alarm(
            self,
            "BatchesRefused",
            cloudwatch.Metric(
                namespace=metrics.NAMESPACE,
                metric_name=metrics.AUDIT_BATCHES_REFUSED,
                dimensions_map={metrics.DIMENSION: env_name},
                statistic="Sum",
                period=Duration.minutes(5),
            ),
            topic=alarm_topic,
            description=(
                "The audit writer refused an audit batch (a consumer's record outside the "
                "toolkit's set or format, a platform event from a stakeholder user, a body that "
                "is not an audit batch): the trail holds one refused-batch or unreadable-batch "
                "record instead of its records. Read the writer's log ('audit batch ... written "
                "as') and docs/runbook.md."
            ),
        )

    def _grant_trail(
        self,
        *,
        name: str,
        bucket: s3.IBucket,
        bucket_key: kms.IKey,
        table: dynamodb.ITable,
        table_key: kms.IKey,
        signing_key: kms.IKey,
    ) -> None:
        """The audit bucket (write only), its key, the signing key, the chain's table items."""
        region = Stack.of(self).region
        objects = [bucket.arn_for_objects(f"{prefix}*") for prefix in OBJECT_PREFIXES]
        self.function.allow(
            (
                ("WriteAuditObjects", ["s3:PutObject"], objects, None),
                # HeadObject of a key a conditional write met taken after the client's own
                # retry: the checksum of the object it holds tells the writer's own (its first
                # attempt stored it, its answer lost) from the trail's (fabric.adapters.
                # audit_storage.S3ObjectStore.create). S3 allows HeadObject by s3:GetObject.
                ("CompareTakenKeys", ["s3:GetObject"], objects, None),
                # SSE-KMS with a bucket key: S3 asks for a data key of the audit key in the
                # writer's name, with the bucket's ARN as encryption context. The same key also
                # encrypts the reports bucket, which this condition leaves out.
                (
                    "AuditKeyThroughS3",
                    ["kms:GenerateDataKey", "kms:Decrypt"],
                    [bucket_key.key_arn],
                    {
                        "StringEquals": {
                            "kms:ViaService": f"s3.{region}.amazonaws.com",
                            "kms:EncryptionContext:aws:s3:arn": bucket.bucket_arn,
                        }
                    },
                ),
                (
                    "SignCheckpoints",
                    ["kms:Sign", "kms:Verify"],
                    [signing_key.key_arn],
                    {"StringEquals": {"kms:SigningAlgorithm": SIGNING_ALGORITHM}},
                ),
                # TransactWriteItems is authorised per action: each Put as dynamodb:PutItem (a
                # ConditionCheck action would need ConditionCheckItem; the writer uses none). Only
                # this writer's chain item and the batch marks, never a consumer's or the ledger's.
                (
                    "ChainItems",
                    ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:PutItem"],
                    [table.table_arn],
                    {
                        "ForAllValues:StringLike": {
                            "dynamodb:LeadingKeys": [
                                f"{CHAIN_ITEM_PREFIX}{name}",
                                f"{BATCH_ITEM_PREFIX}*",
                            ]
                        }
                    },
                ),
                (
                    "TableKeyThroughDynamoDb",
                    ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"],
                    [table_key.key_arn],
                    # DynamoDB names the table in its encryption context: this one only.
                    {
                        "StringEquals": {
                            "kms:ViaService": f"dynamodb.{region}.amazonaws.com",
                            "kms:EncryptionContext:aws:dynamodb:tableName": table.table_name,
                        }
                    },
                ),
            )
        )
        for resource in objects:
            acknowledge(
                self.function.role,
                wildcard_resource_finding(self, resource),
                "Audit objects, their archived bodies and checkpoints are new keys named at "
                "write time by writer, date and sequence number; PutObject is scoped to their "
                "prefixes, and the bucket's Object Lock default retention applies to every "
                "version.",
            )

    def _broker_source(
        self, broker_arn: str, broker_secret: secretsmanager.ISecret, secrets_key: kms.IKey
    ) -> None:
        """The Amazon MQ event source on ``fabric.audit``, and what its pollers do as the role.

        Lambda's pollers describe the broker to find its subnets and security groups, create
        (or reuse) ENIs there, and log in to RabbitMQ with the audit reader's secret; all of it
        with the function's execution role, checked when the mapping is created.
        """
        self.function.allow_secret_read(broker_secret, secrets_key)
        polling = iam.ManagedPolicy(
            self,
            "BrokerPolling",
            description="Amazon MQ event source of the audit writer: the broker and its VPC",
            roles=[self.function.role],
            statements=[
                iam.PolicyStatement(
                    sid="DescribeTheBroker", actions=["mq:DescribeBroker"], resources=[broker_arn]
                ),
                # ec2:Create/Describe/DeleteNetworkInterface are in FabricFunction's Basics.
                iam.PolicyStatement(
                    sid="BrokerNetwork",
                    actions=[
                        "ec2:DescribeSecurityGroups",
                        "ec2:DescribeSubnets",
                        "ec2:DescribeVpcs",
                    ],
                    resources=["*"],
                ),
            ],
        )
        acknowledge(
            polling,
            "AwsSolutions-IAM5[Resource::*]",
            "Only EC2 DescribeSecurityGroups, DescribeSubnets and DescribeVpcs, which support no "
            "resource-level permissions; Lambda's Amazon MQ pollers read the broker's network "
            "with them before they place their ENIs in its subnets.",
        )
        self.broker_mapping = lambda_.CfnEventSourceMapping(
            self,
            "AuditQueueOnBroker",
            function_name=self.function.function.function_name,
            event_source_arn=broker_arn,
            queues=[AUDIT_QUEUE],
            batch_size=_BROKER_BATCH_SIZE,
            maximum_batching_window_in_seconds=_BROKER_BATCHING_WINDOW_SECONDS,
            source_access_configurations=[
                lambda_.CfnEventSourceMapping.SourceAccessConfigurationProperty(
                    type="BASIC_AUTH", uri=broker_secret.secret_arn
                ),
                lambda_.CfnEventSourceMapping.SourceAccessConfigurationProperty(
                    type="VIRTUAL_HOST", uri=VIRTUAL_HOST
                ),
            ],
        )
        # Lambda checks the role's permissions when it creates the mapping.
        self.broker_mapping.node.add_dependency(polling, self.function.role, self.function.basics)
