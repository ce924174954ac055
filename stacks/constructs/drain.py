"""The drain function: every minute, fallback-queue messages go back into RabbitMQ."""

from __future__ import annotations

from aws_cdk import Duration, Stack
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_kms as kms
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from fabric.naming import (
    drain_function_name,
    fallback_queue_names,
    subscription_dead_letter_queue_name,
)
from stacks.constructs.audit_queue import audit_environment
from stacks.constructs.fallback import FallbackQueues
from stacks.constructs.function import FabricFunction, FunctionPlatform
from stacks.constructs.queues import QueueAddress, address, physical_name
from stacks.constructs.router import broker_environment

# Two at once are safe (SQS hides a message from the other while one moves it); more would only
# compete for the same broker.
_CONCURRENCY = 2


class Drain(Construct):
    """``lambdas/drain`` on a one-minute schedule; also invocable on demand (runbook).

    It may receive and delete on the fallback queues and their subscriptions' DLQs only (nothing
    on the queues key but its use through SQS), send its audit batches to the SQS
    audit queue (while the broker cannot take them), read the platform broker user's secret, and
    nothing else.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        platform: FunctionPlatform,
        broker_host: str,
        broker_secret: secretsmanager.ISecret,
        secrets_key: kms.IKey,
        queues: dict[tuple[str, str], FallbackQueues],
        audit_queue: QueueAddress,
    ) -> None:
        super().__init__(scope, construct_id)
        # The function derives the queues it drains from the environment name (fabric.settings:
        # each fallback queue, and its subscription's DLQ), so its environment holds one URL
        # prefix, not twenty URLs with their group and flow (3.5 KB of Lambda's 4 KB). They
        # must be these queues, each of its own group and flow.
        named = {
            key: (physical_name(q.queue), physical_name(q.subscription_dead_letter_queue))
            for key, q in queues.items()
        }
        derived = {
            (flow, group.value): (name, subscription_dead_letter_queue_name(name))
            for flow, group, name in fallback_queue_names(env_name)
        }
        if named != derived:
            raise ValueError(f"the drain derives the fallback queues {derived}, not {named}")
        stack = Stack.of(self)
        self.function = FabricFunction(
            self,
            "Drain",
            platform=platform,
            code_dir="lambdas/drain",
            # Named, so the runbook finds it: `python scripts/runbook.py drain --env <env>`.
            function_name=drain_function_name(env_name),
            # Named like the function: the audit queue's policy admits it as a sender.
            role_name=drain_function_name(env_name),
            description=f"Messaging Fabric {env_name}: drains the fallback queues into RabbitMQ",
            environment={
                **broker_environment(env_name, broker_host, broker_secret),
                # The same URLs as address() builds, without the names.
                "SQS_URL_PREFIX": f"https://sqs.{stack.region}.{stack.url_suffix}/{stack.account}/",
                "DRAIN_MAX_SECONDS": "240",
                **audit_environment(audit_queue),
            },
            reserved_concurrency=_CONCURRENCY,
            timeout=Duration.minutes(5),
            memory_size=512,
        )
        self.function.allow_secret_read(broker_secret, secrets_key)
        self.function.allow_send(audit_queue, sid="AuditBatches")
        # What the drain calls (fabric.adapters.sqs: ReceiveMessage, DeleteMessageBatch), on the
        # fallback queues by their literal-name ARNs. Not grant_consume_messages: it adds
        # kms:Decrypt on the queues key without a condition, where the function's managed policy
        # already allows the key through SQS only (OwnDeadLetterQueueKey).
        self.function.allow(
            [
                (
                    "DrainFallbackQueues",
                    ["sqs:ReceiveMessage", "sqs:DeleteMessage"],
                    [
                        address(self, queue).arn
                        for q in queues.values()
                        for queue in (q.queue, q.subscription_dead_letter_queue)
                    ],
                    None,
                )
            ]
        )
        events.Rule(
            self,
            "EveryMinute",
            description=f"Messaging Fabric {env_name}: drain the fallback queues",
            schedule=events.Schedule.rate(Duration.minutes(1)),
            targets=[targets.LambdaFunction(self.function.function, retry_attempts=0)],
        )
