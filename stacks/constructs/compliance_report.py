"""The compliance report function: a daily schedule, on-demand invokes, the compliance topic."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from constructs import Construct

from fabric import metrics
from fabric.compliance_run import report_function_name
from stacks.constructs.audit_writer import SIGNING_ALGORITHM, signing_environment
from stacks.constructs.fallback import deny_without_tls
from stacks.constructs.function import FabricFunction, FunctionPlatform
from stacks.nag import acknowledge, wildcard_resource_finding

# 02:30 UTC (09:30 in Jakarta): the period is the previous UTC day. By then the records of its
# last hour have reached the writer (fabric.compliance_run.LATE_ARRIVAL, 1 hour) and the hourly
# checkpoint that seals them exists (rate(1 hour) fires once in every hour, at some minute).
SCHEDULE = events.Schedule.cron(minute="30", hour="2")
# One scheduled run and one on-demand run at the same time.
_CONCURRENCY = 2
# The whole period is read and verified in one invocation; a period that does not fit stops
# with ANSWER_MARGIN_S left and says to report it in parts (fabric.compliance_run.PeriodTooLong).
_TIMEOUT = Duration.minutes(15)
# A day of a million records is about 0.5 GB of objects held for the verifier, plus the
# decoded batch in hand; memory also buys CPU (about 2.3 vCPUs at 4 GB).
_MEMORY_MB = 4096
_HOUR = Duration.hours(1)
# ComplianceReportMissing: hours without a report. The daily run ends some minutes after 02:30,
# or up to an hour later after Lambda's two retries: 24 hours and 2 of margin.
_REPORT_MISSING_AFTER = 26
# TrailNotVerified: each report's verdict, one datapoint. Two reports seldom end within five
# minutes of each other; when they do, NOT VERIFIED wins (Maximum).
_VERDICT_PERIOD = Duration.minutes(5)


def compliance_topic_name(env_name: str) -> str:
    """``fabric-<env>-compliance``: the topic compliance officers subscribe to."""
    return f"fabric-{env_name}-compliance"


class ComplianceReport(Construct):
    """``lambdas/compliance_report``: the compliance report of a period of the audit trail.

    Triggers: an EventBridge rule every day at 02:30 UTC (the function reports the UTC day
    before the event's time), and direct invokes (``runbook.py report``) with ``{"date"}`` or
    ``{"start", "end"}``. It writes JSON, HTML and CSV to the reports bucket under
    ``compliance/<env>/`` (SSE-KMS with the audit key) and publishes a summary to the SNS topic
    ``fabric-<env>-compliance`` (the topics key, TLS only). Subscriptions are not managed here:
    compliance officers subscribe (e-mail or HTTPS) by hand or through their own stack, and may
    filter on the ``verified`` message attribute.

    Grants, each on its exact resource: on the audit bucket ``s3:ListBucket`` and
    ``s3:ListBucketVersions`` (delete markers) for the writers' prefixes under ``audit/`` and
    ``checkpoints/`` only, ``s3:GetObject`` and
    ``s3:GetObjectRetention`` on those prefixes' objects (nothing that writes, deletes or
    changes a lock); the audit key through S3 with the audit bucket as encryption context to
    decrypt, and with the reports bucket as context to encrypt; ``s3:PutObject`` under
    ``compliance/<env>/`` of the reports bucket; ``kms:Verify`` with ECDSA_SHA_256 on the
    signing key; ``sns:Publish`` on its topic and the topics key through SNS for that topic.

    Alarms on the on-call topic: ``ComplianceReportErrors`` (the function failed),
    ``TrailNotVerified`` (the latest report found the trail not verified; a report that verifies
    clears it) and ``ComplianceReportMissing`` (no report was written for 26 hours, whatever the
    cause: also an event EventBridge could not deliver, for which the rule has no DLQ of its
    own).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str,
        platform: FunctionPlatform,
        writers: Sequence[str],
        audit_bucket_name: str,
        reports_bucket_name: str,
        audit_key: kms.IKey,
        signing_keys: Sequence[kms.IKey],
        topics_key: kms.IKey,
        alarm_topic: sns.ITopic,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        self._env_name = env_name
        # By name (explicit Fn::GetStackOutput from the stateful stack), so the object ARNs
        # under each bucket are known here and their wildcards can be acknowledged exactly.
        audit = s3.Bucket.from_bucket_name(self, "AuditBucket", audit_bucket_name)
        reports = s3.Bucket.from_bucket_name(self, "ReportsBucket", reports_bucket_name)
        self.topic = sns.Topic(
            self,
            "Topic",
            topic_name=compliance_topic_name(env_name),
            display_name=f"Messaging Fabric {env_name} compliance",
            master_key=topics_key,
        )
        deny_without_tls(self.topic)  # every action, not only Publish (enforce_ssl's)
        self.topic.apply_removal_policy(removal_policy)
        self.function = FabricFunction(
            self,
            "ComplianceReport",
            platform=platform,
            code_dir="lambdas/compliance_report",
            function_name=report_function_name(env_name),
            description=(
                f"Messaging Fabric {env_name}: reports a period of the audit trail for compliance"
            ),
            environment={
                "FABRIC_ENV": env_name,
                "AUDIT_BUCKET": audit.bucket_name,
                "AUDIT_WRITERS": ",".join(writers),
                **signing_environment(signing_keys),
                "REPORTS_BUCKET": reports.bucket_name,
                "REPORTS_KEY_ARN": audit_key.key_arn,
                "COMPLIANCE_TOPIC_ARN": self.topic.topic_arn,
            },
            reserved_concurrency=_CONCURRENCY,
            timeout=_TIMEOUT,
            memory_size=_MEMORY_MB,
        )
        self._grant(
            writers=writers,
            audit=audit,
            reports=reports,
            audit_key=audit_key,
            signing_keys=signing_keys,
            topics_key=topics_key,
        )
        function = self.function.function
        # EventBridge invokes asynchronously: Lambda retries a failed run twice, then the event
        # goes to the function's async DLQ (FunctionDlqDepth).
        self.schedule = events.Rule(
            self,
            "Daily",
            rule_name=f"fabric-{env_name}-compliance-report",
            description=f"Messaging Fabric {env_name}: the compliance report of the previous day",
            schedule=SCHEDULE,
            targets=[targets.LambdaFunction(function, retry_attempts=2)],
        )
        self.alarms = {
            "ComplianceReportErrors": self._alarm(
                "Errors",
                function.metric_errors(statistic="Sum", period=Duration.minutes(5)),
                alarm_topic,
                description=(
                    "The compliance report function failed: the trail could not be read or the "
                    "report not stored or published. Read its logs (docs/runbook.md: report)."
                ),
            ),
            # The latest report's verdict (0 or 1). No data keeps the state, so only a report
            # changes it: a clean re-run clears the alarm at once, NOT VERIFIED stays until one.
            "TrailNotVerified": self._alarm(
                "TrailNotVerified",
                self._metric(metrics.TRAIL_NOT_VERIFIED, "Maximum", _VERDICT_PERIOD),
                alarm_topic,
                missing=cloudwatch.TreatMissingData.IGNORE,
                description=(
                    "The latest compliance report found the audit trail NOT VERIFIED: a record, "
                    "object or checkpoint is not what was written. The report and the compliance "
                    "topic name the first bad place; run `runbook.py verify` (docs/runbook.md). "
                    "The next report of any period sets the state again (the next day's clean "
                    "report clears it): act on this notification, not on the alarm's state."
                ),
            ),
            # No report for _REPORT_MISSING_AFTER hours in a row: the day between two daily runs
            # and their jitter (one day-long period flapped when a run ended later than the last).
            "ComplianceReportMissing": self._alarm(
                "Missing",
                self._metric(metrics.COMPLIANCE_REPORTS, "Sum", _HOUR),
                alarm_topic,
                comparison=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
                missing=cloudwatch.TreatMissingData.BREACHING,
                periods=_REPORT_MISSING_AFTER,
                description=(
                    f"No compliance report was written in the last {_REPORT_MISSING_AFTER} "
                    "hours: the daily run (02:30 UTC) did not happen or failed. Run "
                    "`runbook.py report` for the missing day."
                ),
            ),
        }

    def _metric(self, name: str, statistic: str, period: Duration) -> cloudwatch.Metric:
        return cloudwatch.Metric(
            namespace=metrics.NAMESPACE,
            metric_name=name,
            dimensions_map={metrics.DIMENSION: self._env_name},
            statistic=statistic,
            period=period,
        )

    def _alarm(
        self,
        name: str,
        metric: cloudwatch.IMetric,
        topic: sns.ITopic,
        *,
        description: str,
        comparison: cloudwatch.ComparisonOperator = (
            cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD
        ),
        missing: cloudwatch.TreatMissingData = cloudwatch.TreatMissingData.NOT_BREACHING,
        periods: int = 1,
    ) -> cloudwatch.Alarm:
        """An alarm on ``periods`` periods of ``metric``, every one of them breaching."""
        alarm = cloudwatch.Alarm(
            self,
            name,
            metric=metric,
            threshold=1,
            comparison_operator=comparison,
            evaluation_periods=periods,
            datapoints_to_alarm=periods if periods > 1 else None,
            treat_missing_data=missing,
            alarm_description=description,
        )
        alarm.add_alarm_action(actions.SnsAction(topic))
        alarm.add_ok_action(actions.SnsAction(topic))
        return alarm

    def _grant(
        self,
        *,
        writers: Sequence[str],
        audit: s3.IBucket,
        reports: s3.IBucket,
        audit_key: kms.IKey,
        signing_keys: Sequence[kms.IKey],
        topics_key: kms.IKey,
    ) -> None:
        """Read only on the writers' trails, write only under compliance/<env>/, verify only."""
        region = Stack.of(self).region
        prefixes = [f"{root}/{writer}/" for writer in writers for root in ("audit", "checkpoints")]
        trail = [audit.arn_for_objects(f"{prefix}*") for prefix in prefixes]
        written = reports.arn_for_objects(f"compliance/{self._env_name}/*")

        def via_s3(bucket: s3.IBucket) -> dict[str, dict[str, str]]:
            # Bucket keys: S3 asks KMS in the caller's name, with the bucket's ARN as context.
            return {
                "StringEquals": {
                    "kms:ViaService": f"s3.{region}.amazonaws.com",
                    "kms:EncryptionContext:aws:s3:arn": bucket.bucket_arn,
                }
            }

        self.function.allow(
            (
                (
                    "ListTheTrail",
                    # ListBucketVersions: the report names delete markers, which hide a locked
                    # record from a plain listing (fabric.compliance_run).
                    ["s3:ListBucket", "s3:ListBucketVersions"],
                    [audit.bucket_arn],
                    {"StringLike": {"s3:prefix": [f"{prefix}*" for prefix in prefixes]}},
                ),
                # GetObjectRetention: S3 returns an object's lock headers only to a caller that
                # holds it (fabric.adapters.compliance_storage.S3TrailStore).
                ("ReadTheTrail", ["s3:GetObject", "s3:GetObjectRetention"], trail, None),
                ("AuditKeyToRead", ["kms:Decrypt"], [audit_key.key_arn], via_s3(audit)),
                ("WriteReports", ["s3:PutObject"], [written], None),
                (
                    "AuditKeyToWriteReports",
                    ["kms:GenerateDataKey"],
                    [audit_key.key_arn],
                    via_s3(reports),
                ),
                (
                    "VerifyCheckpoints",
                    ["kms:Verify"],
                    [key.key_arn for key in signing_keys],
                    {"StringEquals": {"kms:SigningAlgorithm": SIGNING_ALGORITHM}},
                ),
                ("PublishSummaries", ["sns:Publish"], [self.topic.topic_arn], None),
                (
                    "TopicsKeyThroughSns",
                    ["kms:GenerateDataKey", "kms:Decrypt"],
                    [topics_key.key_arn],
                    # Through SNS and for this topic only (SNS's encryption context names it).
                    {
                        "StringEquals": {
                            "kms:ViaService": f"sns.{region}.amazonaws.com",
                            "kms:EncryptionContext:aws:sns:topicArn": self.topic.topic_arn,
                        }
                    },
                ),
            )
        )
        for resource in trail:
            acknowledge(
                self.function.role,
                wildcard_resource_finding(self, resource),
                "The report reads the audit objects and checkpoints of one writer, named by "
                "date and sequence number at write time; read only, one prefix per writer.",
            )
        acknowledge(
            self.function.role,
            wildcard_resource_finding(self, written),
            "Report files are new keys named by environment and period at run time; PutObject "
            "is scoped to this environment's compliance/ prefix of the reports bucket.",
        )
