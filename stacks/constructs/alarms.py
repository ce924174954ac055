"""Failover alarms: the fallback path is in use, its queues are not draining, or both are down."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fabric import metrics
from stacks.config import AlarmsConfig


class FailoverAlarms(Construct):
    """Three alarms on an encrypted on-call topic (subscribe the paging system to ``topic``).

    - ``FallbackActive``: at least one message was stored on SNS/SQS in the last minute, so
      RabbitMQ could not take it (router metric ``AcceptedByFallback``).
    - ``FallbackQueueAge``: the oldest message in any fallback queue is older than the
      environment's threshold, so the drain is not bringing messages back.
    - ``NothingStored``: producers were refused with ``unavailable`` because neither path could
      store their messages (router metric ``RejectedUnavailable``).

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
            enforce_ssl=True,
        )
        # The topics key's policy lets this account's CloudWatch alarms encrypt (see Keys).
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
    ) -> cloudwatch.Alarm:
        alarm = cloudwatch.Alarm(
            self,
            name,
            metric=metric,
            threshold=threshold,
            comparison_operator=comparison,
            evaluation_periods=1,
            # No traffic, no fallback: missing data is the healthy state.
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            alarm_description=description,
        )
        alarm.add_alarm_action(actions.SnsAction(self.topic))
        alarm.add_ok_action(actions.SnsAction(self.topic))
        return alarm
