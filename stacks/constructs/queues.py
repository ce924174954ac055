"""SQS queues the fabric's way: KMS, TLS only, 14 days, and DLQs that admit only their source."""

from __future__ import annotations

from typing import Any

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sqs as sqs
from constructs import Construct

# SQS keeps a message at most 14 days: the longest anything may wait for an operator.
RETENTION = Duration.days(14)


def encrypted_queue(
    scope: Construct,
    construct_id: str,
    *,
    name: str,
    key: kms.IKey,
    removal_policy: RemovalPolicy,
    **options: Any,
) -> sqs.Queue:
    """A named queue encrypted with ``key``, refusing plain HTTP, keeping messages 14 days."""
    return sqs.Queue(
        scope,
        construct_id,
        queue_name=name,
        encryption=sqs.QueueEncryption.KMS,
        encryption_master_key=key,
        data_key_reuse=Duration.minutes(5),
        enforce_ssl=True,
        retention_period=RETENTION,
        removal_policy=removal_policy,
        **options,
    )


def queue_with_dlq(
    scope: Construct,
    construct_id: str,
    *,
    name: str,
    key: kms.IKey,
    removal_policy: RemovalPolicy,
    max_receive_count: int,
    visibility_timeout: Duration,
) -> tuple[sqs.Queue, sqs.Queue]:
    """``name`` and its DLQ ``<name>-dlq``, whose redrive-allow policy admits only ``name``.

    The DLQ names its source by ARN (built from the name), since a reference to the source
    queue would make a dependency cycle with the source's redrive policy.
    """
    source_arn = Stack.of(scope).format_arn(service="sqs", resource=name)
    dead_letter_queue = encrypted_queue(
        scope,
        f"{construct_id}Dlq",
        name=f"{name}-dlq",
        key=key,
        removal_policy=removal_policy,
        redrive_allow_policy=sqs.RedriveAllowPolicy(
            redrive_permission=sqs.RedrivePermission.BY_QUEUE,
            source_queues=[sqs.Queue.from_queue_arn(scope, f"{construct_id}Source", source_arn)],
        ),
    )
    queue = encrypted_queue(
        scope,
        construct_id,
        name=name,
        key=key,
        removal_policy=removal_policy,
        visibility_timeout=visibility_timeout,
        dead_letter_queue=sqs.DeadLetterQueue(
            queue=dead_letter_queue, max_receive_count=max_receive_count
        ),
    )
    return queue, dead_letter_queue
