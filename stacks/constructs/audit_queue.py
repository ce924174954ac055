"""The SQS audit queue: where audit batches go while RabbitMQ's audit exchange cannot take them."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_kms as kms
from constructs import Construct

from fabric.naming import (
    audit_queue_name,
    drain_function_name,
    redrive_function_name,
    replay_function_name,
)
from stacks.constructs.function import role_arn, router_role_name
from stacks.constructs.queues import QueueAddress, deny_other_senders, queue_with_dlq

# The audit writer's timeout (stacks/constructs/audit_writer.py); this queue is its SQS event
# source, so its visibility timeout derives from it.
WRITER_TIMEOUT = Duration.minutes(5)
# Six times the writer's timeout, as AWS recommends for an SQS event source: Lambda refuses a
# mapping whose queue hides a message for less than the function's timeout, and the writer runs
# one instance at a time (reserved concurrency 1), so a batch its poller received may wait while
# the broker's batches or the checkpoint hold that instance, without being handed out again.
_VISIBILITY_TIMEOUT = Duration.seconds(6 * WRITER_TIMEOUT.to_seconds())
# Receives of one batch before it is parked in the DLQ: a day's worth at one receive per
# visibility timeout (48). SQS counts every receive, also one whose invocation Lambda throttled
# until the visibility timeout ran out: with one writer instance, which the broker's batches and
# the checkpoint also hold, ten receives (5 hours) could park valid batches that the writer
# never failed. A batch it does fail alarms at once (AuditWriterErrors); after a day it is set
# aside with 13 of its 14 days left in the DLQ for the operator.
_MAX_RECEIVE_COUNT = int(Duration.days(1).to_seconds() // _VISIBILITY_TIMEOUT.to_seconds())
# The variable the fabric's functions read the queue from (fabric.settings, optional there).
AUDIT_QUEUE_URL = "AUDIT_QUEUE_URL"


def audit_sender_roles(env_name: str) -> tuple[str, ...]:
    """The roles that send audit batches here: router, drain, redrive (its ``redriven``
    records, and audit batches it puts back from the DLQ) and replay (``replayed`` records).
    The drain's, redrive's and replay's roles are named like their functions; the router's
    (whose function has a generated name) is named apart."""
    return (
        router_role_name(env_name),
        drain_function_name(env_name),
        redrive_function_name(env_name),
        replay_function_name(env_name),
    )


class AuditQueue(Construct):
    """``fabric-<env>-audit`` (``fabric.naming.audit_queue_name``) and its DLQ ``...-dlq``.

    The router, the drain and the redrive emit audit batches to RabbitMQ's audit exchange; while
    the broker cannot take them they send them here instead, so no audit record is lost in an
    outage. The audit writer reads this queue as well as the RabbitMQ audit queue (deduplicating
    by the batch's message id). After a day of receives (48) a batch is parked in the DLQ, whose
    redrive-allow policy admits only this queue; the redrive puts it back once the writer is
    fixed. KMS (queues key), TLS only, 14 days, like every fabric queue. Its policy denies
    ``sqs:SendMessage`` to every principal but the roles of ``audit_sender_roles``: a forged
    audit batch would enter the trail as the audit writer's.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        key: kms.IKey,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        self.queue, self.dead_letter_queue = queue_with_dlq(
            self,
            "Audit",
            name=audit_queue_name(env_name),
            key=key,
            removal_policy=removal_policy,
            max_receive_count=_MAX_RECEIVE_COUNT,
            visibility_timeout=_VISIBILITY_TIMEOUT,
        )
        deny_other_senders(
            self.queue, roles=[role_arn(self, name) for name in audit_sender_roles(env_name)]
        )


def audit_environment(queue: QueueAddress) -> dict[str, str]:
    """How a fabric function finds the audit queue: its URL (built from the literal name)."""
    return {AUDIT_QUEUE_URL: queue.url}
