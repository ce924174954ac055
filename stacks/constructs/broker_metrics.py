"""The broker metrics function: every minute, the depth of the broker's dead-letter and
overflow queues and of its audit queue, read from the management API, as the metrics the
dead-letter alarms and the audit backlog alarm read."""

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
from fabric.topology import AUDIT_QUEUE
from stacks.constructs.function import FabricFunction, FunctionPlatform, paging_alarm

# When fabric.audit is a backlog. The audit writer's event source hands it up to 99 batches an
# invocation, collected for at most 5 s, one invocation at a time (Lambda runs one for a RabbitMQ
# event source): a once-a-minute sample of a healthy queue shows the batch being written and
# what came in meanwhile, a couple of hundred at most. 500 is five full invocations behind, and
# the alarm takes the Minimum over 15 minutes: it pages when no run in that time saw fewer, so a
# burst the writer works off (a replay, a drain) stays quiet, while a writer that takes nothing
# (the broker refuses its event source's login, the mapping is disabled) pages 15 minutes after
# the queue reached 500: at one audit batch a second, about 23 minutes after it stopped.
AUDIT_BACKLOG_THRESHOLD = 500
AUDIT_BACKLOG_PERIOD = Duration.minutes(15)


def broker_metrics_function_name(env_name: str) -> str:
    """``fabric-<env>-broker-metrics``: named, so operators find its logs and can invoke it."""
    return f"fabric-{env_name}-broker-metrics"


class BrokerMetrics(Construct):
    """``lambdas/broker_metrics`` on a one-minute schedule.

    It measures ``queues`` (those the dead-letter alarms watch) and ``fabric.audit``. It reads
    the management API only (``platform`` carries the security group for that port), as
    ``fabric-monitor``, a broker user that can list the vhost's queues and nothing else
    (fabric.topology); the monitor's secret is the only one it may read. It publishes through
    its log (Embedded Metric Format): no CloudWatch permission, no monitoring endpoint.

    Alarms on ``alarm_topic``, notifying on ALARM and on OK:

    - ``BrokerMetricsErrors``: a run failed (management API or Secrets Manager unreachable).
    - ``BrokerMetricsUnmeasured``: in five minutes no run measured every queue (Minimum of
      ``QueuesUnmeasured``: one run that missed a queue just declared, whose statistics are not
      sampled yet, does not page), or no run published at all (missing data is breaching).
      While it is in ALARM the broker dead-letter alarms see no data and hold their state.
    - ``BrokerMetricsAuditBacklog``: ``fabric.audit`` held at least ``AUDIT_BACKLOG_THRESHOLD``
      messages in every run for 15 minutes: the audit writer's Amazon MQ event source is not
      taking them (say its login is refused: a rotation of ``fabric-audit-reader`` that stopped
      after setSecret) or the writer cannot keep up. Missing data keeps its state, as for the
      dead-letter alarms.

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
        measured = list(dict.fromkeys([*queues, AUDIT_QUEUE]))
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
                "BROKER_DEPTH_QUEUES": json.dumps(measured),
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
                "BrokerDlqDepth, BrokerOverflowDepth, BrokerUnroutedDepth and "
                "BrokerMetricsAuditBacklog alarms see no data, and BrokerMetricsUnmeasured fires. "
                "Read its logs; see docs/runbook.md (broker metrics)."
            ),
        )
        unmeasured = cloudwatch.Metric(
            namespace=broker_depth.NAMESPACE,
            metric_name=broker_depth.QUEUES_UNMEASURED,
            dimensions_map={broker_depth.ENVIRONMENT_DIMENSION: env_name},
            # A run that missed one queue (a queue declared seconds ago has no statistics yet)
            # is not blindness; every run in five minutes missing one is.
            statistic="Minimum",
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
                "No run in the last five minutes measured every one of the broker's dead-letter, "
                "overflow, unrouted and audit queues: the broker metrics function did not run or "
                "failed, or a queue is missing (deleted by hand) or has had no statistics for five "
                "minutes. BrokerDlqDepth, BrokerOverflowDepth, BrokerUnroutedDepth and "
                "BrokerMetricsAuditBacklog cannot fire meanwhile. See docs/runbook.md (broker "
                "metrics)."
            ),
        )
        audit_depth = cloudwatch.Metric(
            namespace=broker_depth.NAMESPACE,
            metric_name=broker_depth.QUEUE_DEPTH,
            dimensions_map={
                broker_depth.ENVIRONMENT_DIMENSION: env_name,
                broker_depth.QUEUE_DIMENSION: AUDIT_QUEUE,
            },
            statistic="Minimum",
            period=AUDIT_BACKLOG_PERIOD,
        )
        self.audit_backlog_alarm = paging_alarm(
            self,
            "AuditBacklog",
            audit_depth,
            topic=alarm_topic,
            threshold=AUDIT_BACKLOG_THRESHOLD,
            # Not measured is not empty: BrokerMetricsUnmeasured says so, this one keeps its state.
            missing=cloudwatch.TreatMissingData.IGNORE,
            description=(
                f"The broker's audit queue {AUDIT_QUEUE} held {AUDIT_BACKLOG_THRESHOLD} audit "
                "batches or more in every measurement for 15 minutes: the audit writer's Amazon "
                "MQ event source is not taking them (the broker refuses its login, e.g. a "
                "rotation of fabric-audit-reader's password stopped after setSecret; the mapping "
                "is disabled; the writer fails, AuditWriterErrors) or the writer cannot keep up. "
                "The batches wait in the queue, but the audit trail lacks them. See "
                "docs/runbook.md (broker metrics)."
            ),
        )
