"""The audit trail's stateful resources, created in moto: an Object Lock bucket and the
idempotency table (which holds the writers' chain states). Call inside ``mock_aws``."""

from __future__ import annotations

from typing import Any

from tests.integration.aws_fallback import REGION


def create_audit_bucket(s3: Any, name: str, *, retention: dict[str, Any] | None = None) -> None:
    """An Object Lock bucket whose default retention is ``retention`` (the stack's: compliance
    mode, 7 years)."""
    s3.create_bucket(
        Bucket=name,
        CreateBucketConfiguration={"LocationConstraint": REGION},
        ObjectLockEnabledForBucket=True,
    )
    s3.put_object_lock_configuration(
        Bucket=name,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": retention or {"Mode": "COMPLIANCE", "Years": 7}},
        },
    )


def create_idempotency_table(dynamodb: Any, name: str) -> None:
    """A table of the idempotency table's schema: partition key ``id``, on demand."""
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
