"""Audit trail storage: the Object Lock bucket, the reports bucket, and their access-log bucket."""

from __future__ import annotations

from typing import cast

from aws_cdk import Duration, RemovalPolicy
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
    versioning, SSE-KMS with a bucket key, TLS only, public access blocked, server access logs, and
    is retained when its stack is deleted. Its only lifecycle rule moves objects to Glacier
    Instant Retrieval; nothing expires objects (retention is enforced by Object Lock, and expiry
    is a decision for the retention runbook, never a lifecycle default).

    ``reports_bucket`` holds compliance reports with the same protections minus Object Lock.
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
        for bucket in (self.audit_bucket, self.reports_bucket):
            for rule in (
                "HIPAA.Security-S3BucketReplicationEnabled",
                "NIST.800.53.R5-S3BucketReplicationEnabled",
            ):
                acknowledge(bucket, rule, _NO_REPLICATION)
