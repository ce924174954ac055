"""The compliance report's AWS side: the audit bucket read back (S3, read only), the reports
bucket (S3, SSE-KMS) and the compliance topic (SNS)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fabric.adapters.audit_storage import S3ObjectStore
from fabric.compliance_run import StoredObject
from fabric.envelope import format_timestamp
from fabric.errors import TransportUnavailable


class S3TrailStore:
    """The audit bucket, read only (``S3ObjectStore``): keys, deleted keys, and objects with
    their lock.

    The Object Lock mode and retain-until come from the headers of the same GET, one request
    per object. S3 sends those headers only to a caller allowed ``s3:GetObjectRetention`` on
    the object; without that permission every object would read as unlocked (the report would
    then name them all), so the function's role has it.
    """

    def __init__(self, bucket: str, client_factory: Callable[[], Any]) -> None:
        self._objects = S3ObjectStore(bucket, client_factory)

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, in key order.

        Raises:
            TransportUnavailable: the bucket cannot be listed.
        """
        return self._objects.keys(prefix)

    def deleted(self, prefix: str, *, after: str = "") -> list[str]:
        """The keys under ``prefix`` (after ``after``) with a delete marker among their
        versions, in key order (ListObjectVersions: the role needs ``s3:ListBucketVersions``).

        Raises:
            TransportUnavailable: the versions cannot be listed.
        """
        return self._objects.deleted(prefix, after=after)

    def read(self, key: str) -> StoredObject | None:
        """The newest version of ``key`` and its lock; None when the key does not exist.

        Raises:
            TransportUnavailable: S3 cannot be reached or refuses the read.
        """
        response = self._objects.response(key)
        if response is None:
            return None
        until = response.get("ObjectLockRetainUntilDate")
        return StoredObject(
            data=bytes(response["Body"].read()),
            lock_mode=response.get("ObjectLockMode"),
            retain_until=None if until is None else format_timestamp(until),
        )


class S3ReportStore:
    """Report files in the reports bucket, each encrypted with the given KMS key (SSE-KMS,
    bucket key). The key is named explicitly: ``aws:kms`` without a key id would use the AWS
    managed ``aws/s3`` key instead of the bucket's own."""

    def __init__(self, bucket: str, key_arn: str, client_factory: Callable[[], Any]) -> None:
        self.bucket = bucket
        self._key_arn = key_arn
        self._client_factory = client_factory
        self._client: Any = None

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store one report file, SSE-KMS.

        Raises:
            TransportUnavailable: S3 refused it, or did not store it under SSE-KMS.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        if self._client is None:
            self._client = self._client_factory()
        try:
            response = self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                ServerSideEncryption="aws:kms",
                SSEKMSKeyId=self._key_arn,
                BucketKeyEnabled=True,
                ChecksumAlgorithm="SHA256",
            )
        except (BotoCoreError, ClientError) as exc:
            raise TransportUnavailable(f"cannot store {key}: {type(exc).__name__}") from exc
        if response.get("ServerSideEncryption") != "aws:kms":
            raise TransportUnavailable(f"{key} was not stored under SSE-KMS")


class SnsSummaryTopic:
    """The SNS compliance topic (encrypted with the topics key)."""

    def __init__(self, topic_arn: str, client_factory: Callable[[], Any]) -> None:
        self._topic_arn = topic_arn
        self._client_factory = client_factory
        self._client: Any = None

    def publish(self, subject: str, message: str, attributes: Mapping[str, str]) -> None:
        """Publish one summary; ``attributes`` become String message attributes (subscribers
        may filter on ``verified``).

        Raises:
            TransportUnavailable: SNS cannot be reached or refuses the message.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        if self._client is None:
            self._client = self._client_factory()
        try:
            self._client.publish(
                TopicArn=self._topic_arn,
                Subject=subject[:100],  # SNS's limit
                Message=message,
                MessageAttributes={
                    name: {"DataType": "String", "StringValue": value}
                    for name, value in attributes.items()
                },
            )
        except (BotoCoreError, ClientError) as exc:
            raise TransportUnavailable(f"cannot publish the summary: {type(exc).__name__}") from exc
