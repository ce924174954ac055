"""Audit trail storage: the Object Lock bucket, the reports bucket, and their access-log bucket."""

from __future__ import annotations

from typing import cast

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from stacks.config import AuditConfig, LockMode
from stacks.nag import acknowledge

# Audit objects are read by the verifier and the compliance report, rarely after a quarter.
_ARCHIVE_AFTER = Duration.days(90)

_NO_REPLICATION = (
    "Data residency: the only AWS region in Indonesia is ap-southeast-3, so replicating child "
    "data to another region would move it out of the country. S3 already stores objects across "
    "three or more AZs of the region."
)


class AuditStorage(Construct):
    """S3 buckets of the audit trail.

    ``audit_bucket`` has Object Lock on by default retention (mode and period from config),
    versioning, SSE-KMS with a bucket key, TLS only, public access blocked, server access logs, a
    bucket policy that denies every principal ``s3:DeleteObject`` and ``s3:DeleteObjectVersion``
    on every key, and is retained when its stack is deleted. Its only lifecycle rule moves
    objects to Glacier Instant Retrieval; nothing expires objects (retention is enforced by
    Object Lock, and expiry is a decision for the retention runbook, never a lifecycle default).

    ``reports_bucket`` holds compliance reports with the same protections minus Object Lock
    (the policy denying deletes included), but retained only where ``removal_policy`` says so.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: AuditConfig,
        key: kms.IKey,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)

        # S3 server access logging cannot deliver to a bucket encrypted with SSE-KMS.
        self.access_logs_bucket = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            versioned=True,
            removal_policy=RemovalPolicy.RETAIN,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="archive-access-logs",
                    transitions=[
                        s3.Transition(
                            storage_class=s3.StorageClass.GLACIER_INSTANT_RETRIEVAL,
                            transition_after=_ARCHIVE_AFTER,
                        )
                    ],
                )
            ],
        )
        for rule, reason in (
            (
                "AwsSolutions-S1",
                "This bucket is the destination of the other buckets' server access logs; logging "
                "it to itself would log its own log deliveries without end.",
            ),
            (
                "HIPAA.Security-S3BucketLoggingEnabled",
                "Destination of server access logs; logging it to itself would loop.",
            ),
            (
                "NIST.800.53.R5-S3BucketLoggingEnabled",
                "Destination of server access logs; logging it to itself would loop.",
            ),
            (
                "HIPAA.Security-S3DefaultEncryptionKMS",
                "S3 server access log delivery only supports SSE-S3 destination buckets; the logs "
                "hold request metadata, never message bodies.",
            ),
            (
                "NIST.800.53.R5-S3DefaultEncryptionKMS",
                "S3 server access log delivery only supports SSE-S3 destination buckets; the logs "
                "hold request metadata, never message bodies.",
            ),
            ("HIPAA.Security-S3BucketReplicationEnabled", _NO_REPLICATION),
            ("NIST.800.53.R5-S3BucketReplicationEnabled", _NO_REPLICATION),
        ):
            acknowledge(self.access_logs_bucket, rule, reason)

        period = (
            Duration.days(config.lock_days)
            if config.lock_days is not None
            else Duration.days(config.retention_days)
        )
        retention = (
            s3.ObjectLockRetention.compliance(period)
            if config.lock_mode is LockMode.COMPLIANCE
            else s3.ObjectLockRetention.governance(period)
        )
        self.audit_bucket = s3.Bucket(
            self,
            "Audit",
            object_lock_enabled=True,
            object_lock_default_retention=retention,
            versioned=True,
            encryption=s3.BucketEncryption.KMS,
            encryption_key=key,
            bucket_key_enabled=True,
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            server_access_logs_bucket=self.access_logs_bucket,
            server_access_logs_prefix="audit/",
            removal_policy=RemovalPolicy.RETAIN,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="archive-audit-objects",
                    transitions=[
                        s3.Transition(
                            storage_class=s3.StorageClass.GLACIER_INSTANT_RETRIEVAL,
                            transition_after=_ARCHIVE_AFTER,
                        )
                    ],
                )
            ],
        )
        # Nothing of the fabric deletes from the trail, and these deny it to every principal,
        # the account's administrators too. Object Lock refuses to remove a locked version but
        # not a plain DeleteObject: that adds a delete marker, and the listings and reads of the
        # verifier, the report and replay no longer show the key although its version stays.
        # The records a writer wrote after its last checkpoint are named by no checkpoint, so
        # no checkpoint would miss them. DeleteObjectVersion removes a version without a trace:
        # a GOVERNANCE lock (dev, staging) gives way with s3:BypassGovernanceRetention, and any
        # lock once its retention ends; deleting trail data then is a decision made by changing
        # this policy in a reviewed deploy, never a standing permission. A PutObject over an
        # existing key stays allowed to the writer: its new version is listed and read in the
        # old one's place (a checkpoint's hash, or the listing after the last checkpoint, shows
        # it), and the writer puts a key again when it retries a write whose state update
        # failed (fabric.audit_writer), so S3's conditional writes (If-None-Match) would stop it.
        for sid, action in (
            ("DeleteMarkersWouldHideLockedAuditRecords", "s3:DeleteObject"),
            ("DeletingAnAuditVersionLeavesNoTrace", "s3:DeleteObjectVersion"),
        ):
            self.audit_bucket.add_to_resource_policy(
                iam.PolicyStatement(
                    sid=sid,
                    effect=iam.Effect.DENY,
                    principals=[iam.AnyPrincipal()],
                    actions=[action],
                    resources=[self.audit_bucket.arn_for_objects("*")],
                )
            )
        if config.lock_years is not None:
            # CDK renders any Duration as Days (7 years would become 2555 days, two leap days
            # short); Object Lock counts Years as calendar years.
            cfn_bucket = cast(s3.CfnBucket, self.audit_bucket.node.default_child)
            mode_path = "ObjectLockConfiguration.Rule.DefaultRetention"
            cfn_bucket.add_property_deletion_override(f"{mode_path}.Days")
            cfn_bucket.add_property_override(f"{mode_path}.Years", config.lock_years)

        self.reports_bucket = s3.Bucket(
            self,
            "Reports",
            versioned=True,
            encryption=s3.BucketEncryption.KMS,
            encryption_key=key,
            bucket_key_enabled=True,
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            server_access_logs_bucket=self.access_logs_bucket,
            server_access_logs_prefix="reports/",
            removal_policy=removal_policy,
        )
        # The reports are what an auditor is shown of each period, and nothing of the fabric
        # deletes one: a report run again writes a new version of the same keys
        # (fabric.compliance_run.report_keys), and no lifecycle rule expires them (a lifecycle
        # expiration would not be refused by these statements: S3 itself deletes). So where the
        # bucket is retained (staging, prod), nobody may delete a report or remove a version of
        # one, as for the audit bucket. A destroyed environment's (dev) stays one its owner can
        # empty: CloudFormation deletes only an empty bucket.
        denials = (
            (
                ("DeleteMarkersWouldHideComplianceReports", "s3:DeleteObject"),
                ("DeletingAReportVersionLeavesNoTrace", "s3:DeleteObjectVersion"),
            )
            if removal_policy == RemovalPolicy.RETAIN
            else ()
        )
        for sid, action in denials:
            self.reports_bucket.add_to_resource_policy(
                iam.PolicyStatement(
                    sid=sid,
                    effect=iam.Effect.DENY,
                    principals=[iam.AnyPrincipal()],
                    actions=[action],
                    resources=[self.reports_bucket.arn_for_objects("*")],
                )
            )
        for bucket in (self.audit_bucket, self.reports_bucket):
            for rule in (
                "HIPAA.Security-S3BucketReplicationEnabled",
                "NIST.800.53.R5-S3BucketReplicationEnabled",
            ):
                acknowledge(bucket, rule, _NO_REPLICATION)
