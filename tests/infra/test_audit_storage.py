"""The audit bucket is locked per environment, encrypted, TLS-only, private, logged and retained."""

from __future__ import annotations

from typing import Any

import pytest

from tests.infra.conftest import Assembly, Synthesized

EXPECTED_LOCK = {
    "dev": {"Mode": "GOVERNANCE", "Days": 1},
    "staging": {"Mode": "GOVERNANCE", "Days": 90},
    "prod": {"Mode": "COMPLIANCE", "Years": 7},
}


def _audit_bucket(env: Synthesized) -> tuple[str, dict[str, Any]]:
    (item,) = (
        (logical_id, bucket)
        for logical_id, bucket in env.resources("AWS::S3::Bucket").items()
        if bucket["Properties"].get("ObjectLockEnabled")
    )
    return item


def _bucket(env: Synthesized, prefix: str) -> tuple[str, dict[str, Any]]:
    (item,) = (
        (logical_id, bucket)
        for logical_id, bucket in env.resources("AWS::S3::Bucket").items()
        if logical_id.startswith(prefix)
    )
    return item


def test_object_lock_mode_and_period_follow_the_environment(assembly: Assembly) -> None:
    for name, env in assembly.envs.items():
        _, bucket = _audit_bucket(env)
        lock = bucket["Properties"]["ObjectLockConfiguration"]
        assert lock["ObjectLockEnabled"] == "Enabled"
        assert lock["Rule"]["DefaultRetention"] == EXPECTED_LOCK[name], name


def test_audit_bucket_is_versioned_encrypted_with_the_audit_key_and_retained(
    env: Synthesized,
) -> None:
    _, bucket = _audit_bucket(env)
    props = bucket["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["BucketKeyEnabled"] is True
    sse = rule["ServerSideEncryptionByDefault"]
    assert sse["SSEAlgorithm"] == "aws:kms"
    assert sse["KMSMasterKeyID"]["Fn::GetAtt"][0].startswith("KeysAudit")
    assert bucket["DeletionPolicy"] == "Retain"
    assert bucket["UpdateReplacePolicy"] == "Retain"


@pytest.mark.parametrize("prefix", ["AuditStorageAudit", "AuditStorageReports"])
def test_buckets_block_public_access_log_access_and_refuse_plain_http(
    env: Synthesized, prefix: str
) -> None:
    logical_id, bucket = _bucket(env, prefix)
    props = bucket["Properties"]
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert "DestinationBucketName" in props["LoggingConfiguration"]
    policies = [
        policy["Properties"]["PolicyDocument"]["Statement"]
        for policy in env.resources("AWS::S3::BucketPolicy").values()
        if policy["Properties"]["Bucket"] == {"Ref": logical_id}
    ]
    (statements,) = policies
    assert any(
        s["Effect"] == "Deny" and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        for s in statements
    )


def _audit_policy(env: Synthesized) -> list[dict[str, Any]]:
    logical_id, _ = _audit_bucket(env)
    (statements,) = (
        policy["Properties"]["PolicyDocument"]["Statement"]
        for policy in env.resources("AWS::S3::BucketPolicy").values()
        if policy["Properties"]["Bucket"] == {"Ref": logical_id}
    )
    return statements  # type: ignore[no-any-return]


@pytest.mark.parametrize("action", ["s3:DeleteObject", "s3:DeleteObjectVersion"])
def test_nobody_may_delete_from_the_audit_bucket(env: Synthesized, action: str) -> None:
    # A plain DeleteObject succeeds under Object Lock (a delete marker hides the locked version
    # from listings and reads); DeleteObjectVersion removes a version once a lock lets it.
    logical_id, _ = _audit_bucket(env)
    (deny,) = [s for s in _audit_policy(env) if s["Action"] == action]
    assert deny["Effect"] == "Deny"
    assert deny["Principal"] == {"AWS": "*"}
    assert "Condition" not in deny  # whoever asks, over TLS or not
    assert deny["Resource"] == {
        "Fn::Join": ["", [{"Fn::GetAtt": [logical_id, "Arn"]}, "/*"]]
    }  # every key: audit/, archive/ and checkpoints/ alike
    assert not [s for s in _audit_policy(env) if s["Effect"] == "Allow"]


def test_no_lifecycle_rule_expires_audit_objects_before_their_retention(env: Synthesized) -> None:
    _, bucket = _audit_bucket(env)
    retention = bucket["Properties"]["ObjectLockConfiguration"]["Rule"]["DefaultRetention"]
    retention_days = retention.get("Days", 0) or 365 * retention.get("Years", 0)
    for rule in bucket["Properties"].get("LifecycleConfiguration", {}).get("Rules", []):
        for key in ("ExpirationInDays", "NoncurrentVersionExpiration"):
            if key in rule:
                days = rule[key] if isinstance(rule[key], int) else rule[key]["NoncurrentDays"]
                assert days >= retention_days, rule
        assert "ExpirationDate" not in rule


def test_reports_bucket_is_encrypted_with_a_customer_key(env: Synthesized) -> None:
    _, bucket = _bucket(env, "AuditStorageReports")
    (rule,) = bucket["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
