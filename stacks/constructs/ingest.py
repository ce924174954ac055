"""SQS ingest: one queue per stakeholder group, whose identity the router takes from the queue."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fabric.naming import redrive_function_name
from fabric.stakeholders import STAKEHOLDERS, Stakeholder
from stacks.constructs.function import role_arn
from stacks.constructs.queues import deny_other_senders, queue_with_dlq

# Messages that stay `unavailable` (both transports down) are retried this many times, spaced by
# the visibility timeout (an hour in all), before they are parked in the DLQ. SQS also counts a
# receive whose invocation Lambda throttled. The router's mappings have a maximum concurrency
# within its reserved concurrency (RouterConfig), so their pollers take no batch they may not
# run; what still throttles them is HTTPS and direct invokes holding the whole reserved
# concurrency, and for 20 receives that is an hour-long overload (IngestDlqDepth says so).
_MAX_RECEIVE_COUNT = 20
# Six times the router's timeout, as AWS recommends for Lambda event sources.
_VISIBILITY_TIMEOUT = Duration.seconds(180)


class IngestQueues(Construct):
    """``fabric-<env>-ingest-<group>`` queues, each with a DLQ that admits only its source.

    A producer needs ``sqs:SendMessage`` on its group's queue only, and the queues key through
    SQS (docs/infrastructure.md, "Ingest queues"); the router reads the group from the queue a
    record came from, never from the message body. So a queue's policy denies sending to every
    principal but its group's ``producers`` (the role ARNs of ``cdk.json``, the same that may
    invoke the group's router alias) and the redrive (which puts dead letters back): any
    other sender would speak as that group. The DLQs
    (``dead_letter_queues``, ``fabric-<env>-ingest-<group>-dlq``) are kept for the redrive and
    the dead-letter alarms.
    """

    prefix_template = "fabric-{env}-ingest-"

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        key: kms.IKey,
        removal_policy: RemovalPolicy,
        producers: Mapping[str, Sequence[str]],
    ) -> None:
        super().__init__(scope, construct_id)
        self.prefix = self.prefix_template.format(env=env_name)
        self.queues: dict[Stakeholder, sqs.Queue] = {}
        self.dead_letter_queues: dict[Stakeholder, sqs.Queue] = {}
        for group in STAKEHOLDERS:
            self.queues[group], self.dead_letter_queues[group] = queue_with_dlq(
                self,
                group.value.capitalize(),
                name=f"{self.prefix}{group.value}",
                key=key,
                removal_policy=removal_policy,
                max_receive_count=_MAX_RECEIVE_COUNT,
                visibility_timeout=_VISIBILITY_TIMEOUT,
            )
            deny_other_senders(
                self.queues[group],
                roles=[
                    *producers.get(group.value, ()),
                    role_arn(self, redrive_function_name(env_name)),
                ],
            )
