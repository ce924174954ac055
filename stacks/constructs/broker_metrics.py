"""The broker metrics function: every minute, the depth of the broker's dead-letter and
overflow queues, read from the management API, as the metrics the dead-letter alarms read."""

from __future__ import annotations

import json

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_kms as kms
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from constructs import Construct

from fabric import broker_depth
from stacks.constructs.function import FabricFunction, FunctionPlatform, paging_alarm


def broker_metrics_function_name(env_name: str) -> str:
    """``fabric-<env>-broker-metrics``: named, so operators find its logs and can invoke it."""
    return f"fabric-{env_name}-broker-metrics"


class BrokerMetrics(Construct):
    """``lambdas/broker_metrics`` on a one-minute schedule.

    It reads the management API only (``platform`` carries the security group for that port),
    as ``fabric-monitor``, a broker user that can list the vhost's queues and nothing else
    (fabric.topology); the monitor's secret is the only one it may read. It publishes through
    its log (Embedded Metric Format): no CloudWatch permission, no monitoring endpoint.

    Alarms on ``alarm_topic``, notifying on ALARM and on OK:

    - ``BrokerMetricsErrors``: a run failed (management API or Secrets Manager unreachable).
    - ``BrokerMetricsUnmeasured``: in five minutes no run measured every queue, or no run
      published at all (missing data is breaching). While it is in ALARM the broker
      dead-letter alarms see no data and hold their state.

    One run at a time, no retries: a run's reading is stale a minute later, when the next one
    comes; a failed event goes straight to the function's async DLQ (alarmed there too).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        platform: FunctionPlatform,
        management_url: str,
        vhost: str,
        monitor_secret: secretsmanager.ISecret,
        secrets_key: kms.IKey,
        queues: list[str],
        alarm_topic: sns.ITopic,
    ) -> None:
        super().__init__(scope, construct_id)
        self.function = FabricFunction(
            self,
            "Measure",
            platform=platform,
            code_dir="lambdas/broker_metrics",
            function_name=broker_metrics_function_name(env_name),
            description=(
                f"Messaging Fabric {env_name}: publishes the depth of the broker's dead-letter "
                "queues"
            ),
            environment={
                "FABRIC_ENV": env_name,
                "MANAGEMENT_URL": management_url,
                "MONITOR_SECRET_ARN": monitor_secret.secret_arn,
                "RABBITMQ_VHOST": vhost,
                "BROKER_DEPTH_QUEUES": json.dumps(queues),
            },
            reserved_concurrency=1,
            # One API call of at most 10 s, tried three times at most (ManagementClient), and a
            # secret read on a cold start.
            timeout=Duration.minutes(1),
            memory_size=256,
        )
        function = self.function.function
        function.configure_async_invoke(retry_attempts=0)
        self.function.allow_secret_read(monitor_secret, secrets_key)
        events.Rule(
            self,
            "EveryMinute",
            description=f"Messaging Fabric {env_name}: measure the broker's dead-letter queues",
            schedule=events.Schedule.rate(Duration.minutes(1)),
            targets=[targets.LambdaFunction(function, retry_attempts=0)],
        )
        self.errors_alarm = self.function.errors_alarm(
            self,
            alarm_topic,
            description=(
                "The broker metrics function failed: it could not read the queue depths from "
                "the broker's management API (or the monitor's secret). Until it runs again the "
                "BrokerDlqDepth and BrokerOverflowDepth alarms see no data, and "
                "BrokerMetricsUnmeasured fires. Read its logs; see docs/runbook.md (broker "
                "metrics)."
            ),
        )
        unmeasured = cloudwatch.Metric(
            namespace=broker_depth.NAMESPACE,
            metric_name=broker_depth.QUEUES_UNMEASURED,
            dimensions_map={broker_depth.ENVIRONMENT_DIMENSION: env_name},
            statistic="Maximum",
            period=Duration.minutes(5),
        )
        self.unmeasured_alarm = paging_alarm(
            self,
            "Unmeasured",
            unmeasured,
            topic=alarm_topic,
            # No data: no run reached the broker in five minutes (failed, throttled, not
            # scheduled), and the dead-letter alarms are blind. Say so.
            missing=cloudwatch.TreatMissingData.BREACHING,
            description=(
                "The depth of the broker's dead-letter or overflow queues was not measured in "
                "the last five minutes: the broker metrics function did not run or failed, or a "
                "queue is missing (deleted by hand) or has no statistics. BrokerDlqDepth and "
                "BrokerOverflowDepth cannot fire meanwhile. See docs/runbook.md (broker "
                "metrics)."
            ),
        )
