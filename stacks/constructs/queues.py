"""SQS queues the fabric's way: KMS, TLS only, 14 days, and DLQs that admit only their source."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from aws_cdk import Duration, RemovalPolicy, Stack, Token
from aws_cdk import aws_iam as iam
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
    """``name`` and its DLQ ``<name>-dlq``, whose redrive-allow policy admits only ``name``
    and whose queue policy denies ``sqs:SendMessage`` to every principal but AWS services.

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
    # No account principal sends to a DLQ. SQS moves a message there itself, under the
    # redrive-allow policy (before that policy, any queue of the account could name any DLQ).
    # The redrive takes letters out and sends them to the source, never here. A message sent
    # here would go round its source's own sender check: the redrive would put it into the
    # source as a parked one (the audit queue's: a batch the writer takes as the platform's; a
    # fallback queue's: a message the drain hands the group). AWS service principals are left
    # out of the deny: SQS's own move must never be the one refused, whatever principal AWS
    # evaluates it as (this cannot be checked offline).
    dead_letter_queue.add_to_resource_policy(
        iam.PolicyStatement(
            sid="DenyAllSenders",
            effect=iam.Effect.DENY,
            principals=[iam.AnyPrincipal()],
            actions=["sqs:SendMessage"],
            resources=[dead_letter_queue.queue_arn],
            conditions={"Bool": {"aws:PrincipalIsAWSService": "false"}},
        )
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


def deny_other_senders(
    queue: sqs.Queue, *, roles: Sequence[str], topics: Sequence[str] = ()
) -> None:
    """Refuse ``sqs:SendMessage`` on ``queue`` to every principal but ``roles`` and ``topics``.

    ``roles`` are IAM role ARNs, matched as ``aws:PrincipalArn`` (the role behind any of its
    sessions); ``topics`` are SNS topic ARNs, whose deliveries SNS makes with the topic as
    ``aws:SourceArn``. The queue policy denies, so no identity policy of the account (an
    administrator's ``sqs:*`` included) and no other account can add a sender. The action also
    covers ``SendMessageBatch``. The senders need their own ``Allow`` (the roles an identity
    statement, the topics the subscription's queue policy statement).
    """
    if not roles and not topics:
        raise ValueError(f"{queue.node.path}: a queue needs at least one sender")
    # A request is denied only if every key differs: a topic's delivery is no role, but is
    # admitted. A key absent from the request counts as differing (negated operator).
    not_a_sender: dict[str, list[str]] = {}
    if roles:
        not_a_sender["aws:PrincipalArn"] = list(roles)
    if topics:
        not_a_sender["aws:SourceArn"] = list(topics)
    queue.add_to_resource_policy(
        iam.PolicyStatement(
            sid="DenySendExceptNamedSenders",
            effect=iam.Effect.DENY,
            principals=[iam.AnyPrincipal()],
            actions=["sqs:SendMessage"],
            resources=[queue.queue_arn],
            conditions={"ArnNotEquals": not_a_sender},
        )
    )


@dataclass(frozen=True)
class QueueAddress:
    """A named queue as any stack of its environment addresses it: name, ARN and URL."""

    name: str
    arn: str
    url: str


def physical_name(queue: sqs.IQueue) -> str:
    """The literal name ``queue`` was created with.

    Raises:
        ValueError: the queue has no literal name (CloudFormation names it at deploy time).
    """
    resource = queue.node.default_child
    name = cast(sqs.CfnQueue, resource).queue_name if resource is not None else None
    if name is None or Token.is_unresolved(name):
        raise ValueError(f"{queue.node.path} has no literal queue name")
    return name


def visibility_timeout_seconds(queue: sqs.IQueue) -> int:
    """The visibility timeout ``queue`` was created with, in seconds.

    Raises:
        ValueError: the queue sets none (SQS's default) or not a literal one.
    """
    resource = queue.node.default_child
    timeout = cast(sqs.CfnQueue, resource).visibility_timeout if resource is not None else None
    if not isinstance(timeout, int | float) or Token.is_unresolved(timeout):
        raise ValueError(f"{queue.node.path} has no literal visibility timeout")
    return int(timeout)


def address(scope: Construct, queue: sqs.IQueue) -> QueueAddress:
    """The ARN and URL of named ``queue``, built in ``scope``'s stack from its name.

    For another stack of the same account and region, this names the queue without a
    cross-stack output per attribute (a template holds at most 200 outputs) and renders the
    same values as the queue's own ``Arn`` and ``QueueUrl``.

    Raises:
        ValueError: the queue has no literal name.
    """
    name = physical_name(queue)
    stack = Stack.of(scope)
    return QueueAddress(
        name=name,
        arn=stack.format_arn(service="sqs", resource=name),
        url=f"https://sqs.{stack.region}.{stack.url_suffix}/{stack.account}/{name}",
    )
