"""On-call alarms: the fallback in use, not draining or both paths down; dead letters waiting;
event source queues not read; functions failing."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fabric import broker_depth, metrics
from stacks.config import AlarmsConfig
from stacks.constructs.fallback import deny_without_tls
from stacks.constructs.function import FabricFunction, paging_alarm
from stacks.constructs.keys import alarms_of_this_account
from stacks.constructs.queues import physical_name, visibility_timeout_seconds


class FailoverAlarms(Construct):
    """Alarms on an encrypted on-call topic (subscribe the paging system to ``topic``).

    - ``FallbackActive``: at least one message was stored on SNS/SQS in the last minute, so
      RabbitMQ could not take it (router metric ``AcceptedByFallback``).
    - ``FallbackQueueAge``: the oldest message in any fallback queue is older than the
      environment's threshold, so the drain is not bringing messages back.
    - ``NothingStored``: producers were refused with ``unavailable`` because neither path could
      store their messages (router metric ``RejectedUnavailable``).
    - ``AuditRecordsLost``: an audit batch could not be stored on any path, so the trail is
      missing records (router metric ``AuditRecordsLost``).
    - ``FallbackMisdelivered``: the drain found a copy in a group's fallback queue that was not
      published for that group (drain metric ``DrainMisdelivered``): a subscription lost or
      changed its filter. The copy was not moved.

    Each alarm also notifies when it returns to OK, so on-call sees the recovery.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        config: AlarmsConfig,
        fallback_queues: list[sqs.IQueue],
        topics_key: kms.IKey,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        if len(fallback_queues) > 10:
            raise ValueError("a CloudWatch alarm takes at most ten metrics")
        self.topic = sns.Topic(
            self,
            "Topic",
            topic_name=f"fabric-{env_name}-alarms",
            display_name=f"Messaging Fabric {env_name} alarms",
            master_key=topics_key,
        )
        deny_without_tls(self.topic)
        # The topic's policy (deny_without_tls makes one) replaces SNS's default policy, so it must
        # allow CloudWatch itself: alarms publish as cloudwatch.amazonaws.com, which no IAM
        # grant covers. This account's alarms only. The topics key's policy lets them encrypt
        # (see Keys).
        self.topic.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowCloudWatchAlarmsOfThisAccount",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["sns:Publish"],
                resources=[self.topic.topic_arn],
                conditions=alarms_of_this_account(Stack.of(self)),
            )
        )
        self.topic.apply_removal_policy(removal_policy)

        def router_sum(name: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace=metrics.NAMESPACE,
                metric_name=name,
                dimensions_map={metrics.DIMENSION: env_name},
                statistic="Sum",
                period=Duration.minutes(1),
            )

        # At most ten metrics per alarm: one MAX expression covers the ten fallback queues.
        ages = {
            f"q{index}": queue.metric_approximate_age_of_oldest_message(
                statistic="Maximum", period=Duration.minutes(1)
            )
            for index, queue in enumerate(fallback_queues)
        }
        oldest = cloudwatch.MathExpression(
            expression=f"MAX([{', '.join(ages)}])",
            using_metrics=ages,
            label="oldest fallback message (s)",
            period=Duration.minutes(1),
        )
        self.alarms = {
            "FallbackActive": self._alarm(
                "FallbackActive",
                router_sum(metrics.ACCEPTED_BY_FALLBACK),
                threshold=1,
                description=(
                    "RabbitMQ could not take messages; they were stored on the SNS/SQS fallback "
                    "path and the drain will move them back. Check the broker (runbook: failover)."
                ),
            ),
            "FallbackQueueAge": self._alarm(
                "FallbackQueueAge",
                oldest,
                threshold=config.fallback_queue_age_seconds,
                comparison=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                description=(
                    f"A fallback message is older than {config.fallback_queue_age_seconds} s: "
                    "the broker is still unavailable or the drain is failing (runbook: drain)."
                ),
            ),
            "NothingStored": self._alarm(
                "NothingStored",
                router_sum(metrics.REJECTED_UNAVAILABLE),
                threshold=1,
                description=(
                    "Producers were refused because neither RabbitMQ nor SNS/SQS could store "
                    "their messages; they must retry. Page immediately."
                ),
            ),
        }
        # Any audit record no path could store: the trail is missing it (DESIGN §7).
        self.alarms["AuditRecordsLost"] = self._alarm(
            "AuditRecordsLost",
            router_sum(metrics.AUDIT_RECORDS_LOST),
            threshold=1,
            description=(
                "Audit records could not be stored on any path (neither the RabbitMQ audit "
                "exchange nor the SQS audit queue took them): the audit trail is missing them. "
                "Page immediately; check the broker and the audit queue, and the router's log "
                "('audit batch of N record(s) could not be stored')."
            ),
        )

        # SNS has no IAM condition on a subscription's filter policy: the drain checks each
        # copy's audience instead, and pages on one that was not for its queue's group.
        # Runs come every minute, such a copy comes back every visibility timeout (120 s):
        # three quiet minutes, not one, before it is OK again, or it would flap every minute.
        self.alarms["FallbackMisdelivered"] = self._alarm(
            "FallbackMisdelivered",
            router_sum(metrics.DRAIN_MISDELIVERED),
            threshold=1,
            periods=3,
            description=(
                "The drain found messages in a group's fallback queue that were not published "
                "for that group, and did not move them: a fallback subscription lost or changed "
                "its filter policy. Page immediately (child data may be exposed to the wrong "
                "stakeholder); runbook: FallbackMisdelivered."
            ),
        )

    def _alarm(
        self,
        name: str,
        metric: cloudwatch.IMetric,
        *,
        threshold: float,
        description: str,
        comparison: cloudwatch.ComparisonOperator = (
            cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD
        ),
        periods: int = 1,
    ) -> cloudwatch.Alarm:
        # No traffic, no fallback: missing data is the healthy state.
        return paging_alarm(
            self,
            name,
            metric,
            topic=self.topic,
            description=description,
            threshold=threshold,
            comparison=comparison,
            periods=periods,
        )


# A CloudWatch alarm evaluates at most ten metrics (metric math included).
_MAX_METRICS_PER_ALARM = 10
SQS_DEPTH_METRIC = "ApproximateNumberOfMessagesVisible"


class DeadLetterAlarms(Construct):
    """An alarm per kind of dead-letter queue: it fires when any of them holds a message.

    On the on-call topic of ``FailoverAlarms`` (``topic``), notifying on ALARM and on OK. A
    group of more than ten queues is split into alarms ``<Name>1``, ``<Name>2``… of ten each.

    - ``FallbackDlqDepth``: a fallback or emergency queue parked a message after 10 failed
      drains (``ApproximateNumberOfMessagesVisible``, Maximum, 1 min).
    - ``SubscriptionDlqDepth``: SNS could not deliver a fallback message to its queue.
    - ``IngestDlqDepth``: the router gave up on an SQS ingest message after 20 receives (both
      transports down, its call's audit records lost every time, or the router throttled on
      every receive because HTTPS and direct invokes held its whole reserved concurrency).
    - ``AuditDlqDepth``: the audit writer could not write, for a day (48 receives, throttled ones
      included), an audit batch that was sent to the SQS audit queue while the broker was down.
    - ``FunctionDlqDepth``: a function's asynchronous invocation failed all its attempts.
    - ``BrokerDlqDepth``: a RabbitMQ work queue dead-lettered a message (consumer gave up, or
      the delivery limit was reached): ``MessagingFabric/Broker`` ``QueueDepth`` (the broker
      metrics function's, every minute, on every engine version: Amazon MQ has no per-queue
      metrics for RabbitMQ 4), Maximum over 5 minutes, so that a run that comes late or fails
      once does not flap a DLQ that holds messages to OK.
    - ``BrokerOverflowDepth``: a RabbitMQ terminal queue (a DLQ, ``fabric.unrouted``,
      ``fabric.audit``) handed a message back up to its delivery limit, and the broker
      dead-lettered it into ``fabric.overflow``, where it waits until the redrive of
      ``fabric.overflow`` moves it back (same metric and period).
    - ``BrokerUnroutedDepth``: the router accepted a message that the routing table sends to
      no group (for example a topic matched only by a header route whose headers did not
      match), so it waits in ``fabric.unrouted``, which no consumer reads (same metric and
      period).

    Missing SQS data counts as empty: SQS publishes no metrics for an idle empty queue. Missing
    broker data keeps the alarm's state: the broker metrics function publishes every queue
    every minute, so silence means it failed, which its own alarms report
    (``BrokerMetricsErrors``, ``BrokerMetricsUnmeasured``); an empty DLQ must not read as
    healthy, nor one that holds letters as recovered, because nobody measured it.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        topic: sns.ITopic,
        fallback_dlqs: list[str],
        subscription_dlqs: list[str],
        ingest_dlqs: list[str],
        audit_dlqs: list[str],
        function_dlqs: list[str],
        env_name: str,
        broker_dlqs: list[str],
        broker_overflow_queues: list[str],
        broker_unrouted_queues: list[str],
    ) -> None:
        """Queue arguments are queue names (SQS) or RabbitMQ queue names (``broker_dlqs``,
        ``broker_overflow_queues``, ``broker_unrouted_queues``: the broker metrics function
        must measure them)."""
        super().__init__(scope, construct_id)
        self.topic = topic
        self.alarms: dict[str, cloudwatch.Alarm] = {}
        then = "First: find the cause, then see docs/runbook.md (redrive)."
        sqs_groups = (
            (
                "FallbackDlqDepth",
                fallback_dlqs,
                "A fallback-path message could not be drained into RabbitMQ 10 times and was "
                "parked in its DLQ. " + then,
            ),
            (
                "SubscriptionDlqDepth",
                subscription_dlqs,
                "SNS could not deliver a fallback message to its SQS queue (queue policy or key "
                "problem); it is in the subscription DLQ, already accepted. Fix the policy or "
                "key: the drain moves it into its group's work queue on its next run "
                "(docs/runbook.md).",
            ),
            (
                "IngestDlqDepth",
                ingest_dlqs,
                "The router gave up on an SQS ingest message after 20 receives, an hour: both "
                "paths down; its call's audit records could not be stored (then it may have been "
                "delivered already, and a redrive sends it again); or every receive was "
                "throttled, HTTPS and direct invokes holding the router's whole reserved "
                "concurrency (its Throttles metric). " + then,
            ),
            (
                "AuditDlqDepth",
                audit_dlqs,
                "An audit batch sent to the SQS audit queue while RabbitMQ was down could not be "
                "written by the audit writer for a day (48 receives) and was parked in its DLQ. "
                "Check the audit writer's logs, then see docs/runbook.md (redrive).",
            ),
            (
                "FunctionDlqDepth",
                function_dlqs,
                "A fabric function's asynchronous invocation failed every attempt; its event is "
                "in the function's DLQ. Read the function's logs (docs/runbook.md).",
            ),
        )
        for name, queues, description in sqs_groups:
            self._depth_alarms(
                name,
                [
                    cloudwatch.Metric(
                        namespace="AWS/SQS",
                        metric_name=SQS_DEPTH_METRIC,
                        dimensions_map={"QueueName": queue},
                        statistic="Maximum",
                        period=Duration.minutes(1),
                    )
                    for queue in queues
                ],
                description,
                missing=cloudwatch.TreatMissingData.NOT_BREACHING,
            )

        def broker_depths(queues: list[str]) -> list[cloudwatch.Metric]:
            return [
                cloudwatch.Metric(
                    namespace=broker_depth.NAMESPACE,
                    metric_name=broker_depth.QUEUE_DEPTH,
                    dimensions_map={
                        broker_depth.ENVIRONMENT_DIMENSION: env_name,
                        broker_depth.QUEUE_DIMENSION: queue,
                    },
                    statistic="Maximum",
                    period=Duration.minutes(5),
                )
                for queue in queues
            ]

        self._depth_alarms(
            "BrokerDlqDepth",
            broker_depths(broker_dlqs),
            "A RabbitMQ work queue dead-lettered a message: a consumer gave up on it, or it "
            "reached the delivery limit. " + then,
            missing=cloudwatch.TreatMissingData.IGNORE,
        )
        self._depth_alarms(
            "BrokerOverflowDepth",
            broker_depths(broker_overflow_queues),
            "A message was handed back by redrive runs, an audit writer or an operator until it "
            "reached the delivery limit of its RabbitMQ DLQ, unrouted or audit queue, and the "
            "broker moved it to the overflow queue. Nothing is lost, but it waits for an "
            "operator: redrive fabric.overflow to move it back to the queue it came from "
            "(docs/runbook.md, docs/dead-letters.md, overflow).",
            missing=cloudwatch.TreatMissingData.IGNORE,
        )
        self._depth_alarms(
            "BrokerUnroutedDepth",
            broker_depths(broker_unrouted_queues),
            "The router accepted a message that the routing table sends to no group, and it "
            "waits in fabric.unrouted, which no consumer reads: no stakeholder has it. Find why "
            "nothing routed it, fix the routing table or the producer, then see docs/runbook.md "
            "(BrokerUnroutedDepth).",
            missing=cloudwatch.TreatMissingData.IGNORE,
        )

    def _depth_alarms(
        self,
        name: str,
        depths: list[cloudwatch.Metric],
        description: str,
        *,
        missing: cloudwatch.TreatMissingData,
    ) -> None:
        if not depths:
            return
        chunks = [
            depths[start : start + _MAX_METRICS_PER_ALARM]
            for start in range(0, len(depths), _MAX_METRICS_PER_ALARM)
        ]
        for index, chunk in enumerate(chunks, start=1):
            alarm_id = name if len(chunks) == 1 else f"{name}{index}"
            metrics_by_id = {f"q{i}": metric for i, metric in enumerate(chunk)}
            deepest = cloudwatch.MathExpression(
                expression=f"MAX([{', '.join(metrics_by_id)}])",
                using_metrics=metrics_by_id,
                label="messages in the deepest dead-letter queue",
                period=chunk[0].period,
            )
            self.alarms[alarm_id] = paging_alarm(
                self,
                alarm_id,
                deepest,
                topic=self.topic,
                description=description,
                missing=missing,
            )


class FunctionErrorAlarms(Construct):
    """An ``Errors`` alarm (``FabricFunction.errors_alarm``: Sum over 5 minutes ≥ 1) on
    ``topic`` for each of ``functions``, by name: ``<construct id><name>Errors``.

    For the functions whose constructs raise no such alarm themselves (the router, the
    topology, the drain); the others (audit writer, replay, compliance report, rotation, broker
    metrics) have theirs next to their function.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        topic: sns.ITopic,
        functions: dict[str, tuple[FabricFunction, str]],
    ) -> None:
        """``functions``: name -> (function, what its failure means and what to do)."""
        super().__init__(scope, construct_id)
        self.alarms = {
            name: function.errors_alarm(Construct(self, name), topic, description=description)
            for name, (function, description) in functions.items()
        }


# How many of a queue's visibility timeouts its oldest message may wait before the alarm pages.
_AGE_IN_VISIBILITY_TIMEOUTS = 3


class EventSourceQueueAgeAlarms(Construct):
    """Alarms on the age of the oldest message in the queues that only Lambda event source
    mappings read: if a mapping stops receiving (disabled, its role or the queues key refused),
    nothing else fails, and SQS deletes the messages after 14 days.

    - ``IngestQueueAge``: ``MAX`` over the ingest queues' ``ApproximateAgeOfOldestMessage``
      (Maximum, 1 min) is above three visibility timeouts (the router's mappings).
    - ``AuditQueueAge``: the same for the SQS audit queue (the audit writer's mapping), with its
      own, longer, visibility timeout.

    On ``topic``, ALARM and OK; missing data counts as healthy (SQS publishes nothing for an idle
    empty queue). SQS leaves out of the metric a message received three times or more: one the
    router keeps failing ages towards its DLQ and its alarm instead.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        topic: sns.ITopic,
        ingest_queues: list[sqs.IQueue],
        audit_queue: sqs.IQueue,
    ) -> None:
        """The queues are the stateful stack's, named by their literal names (no cross-stack
        output per queue)."""
        super().__init__(scope, construct_id)
        self.topic = topic
        ingest = self._threshold(ingest_queues)
        audit = self._threshold([audit_queue])
        self.alarms = {
            "IngestQueueAge": self._age_alarm(
                "IngestQueueAge",
                ingest_queues,
                ingest,
                f"An SQS ingest message has waited more than {ingest} s (three visibility "
                "timeouts): the router's event source mappings are not taking them (a mapping "
                "disabled or failing, the router's role or the queues key refused), or the "
                "router cannot run (throttled), or a backlog is larger than the capped mappings "
                "clear. SQS deletes them after 14 days. Check the "
                "mappings' state and the router's logs (docs/runbook.md).",
            ),
            "AuditQueueAge": self._age_alarm(
                "AuditQueueAge",
                [audit_queue],
                audit,
                f"An audit batch has waited in the SQS audit queue more than {audit} s (three "
                "visibility timeouts): the audit writer's SQS event source is not taking it (a "
                "mapping disabled or failing, the writer's role or the queues key refused), or "
                "the writer cannot keep up. The trail lacks its records until it is written, "
                "and SQS deletes it after 14 days. Check the mapping and the writer's logs "
                "(docs/runbook.md).",
            ),
        }

    @staticmethod
    def _threshold(queues: list[sqs.IQueue]) -> int:
        timeouts = {visibility_timeout_seconds(queue) for queue in queues}
        if len(timeouts) != 1:
            raise ValueError("the queues of one age alarm need one visibility timeout")
        return _AGE_IN_VISIBILITY_TIMEOUTS * timeouts.pop()

    def _age_alarm(
        self, name: str, queues: list[sqs.IQueue], threshold: int, description: str
    ) -> cloudwatch.Alarm:
        if len(queues) > _MAX_METRICS_PER_ALARM:
            raise ValueError("a CloudWatch alarm takes at most ten metrics")
        ages = {
            f"q{index}": cloudwatch.Metric(
                namespace="AWS/SQS",
                metric_name="ApproximateAgeOfOldestMessage",
                dimensions_map={"QueueName": physical_name(queue)},
                statistic="Maximum",
                period=Duration.minutes(1),
            )
            for index, queue in enumerate(queues)
        }
        oldest = cloudwatch.MathExpression(
            expression=f"MAX([{', '.join(ages)}])",
            using_metrics=ages,
            label="oldest message (s)",
            period=Duration.minutes(1),
        )
        return paging_alarm(
            self,
            name,
            oldest,
            topic=self.topic,
            description=description,
            threshold=threshold,
            comparison=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        )
