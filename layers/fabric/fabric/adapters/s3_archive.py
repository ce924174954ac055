"""The audit bucket as the replay sees it: audit and archive objects, listed and read (S3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fabric.errors import TransportUnavailable

_DELIMITER = "/"


class S3ArchiveReader:
    """An ``ArchiveReader`` (``fabric.replay``) on the Object Lock audit bucket.

    Needs ``s3:ListBucket`` for the prefixes it lists and ``s3:GetObject`` for the objects it
    reads (plus the bucket key's ``kms:Decrypt`` through S3); it never writes. Every S3 error
    becomes ``TransportUnavailable`` except a missing key, which reads as None.
    """

    def __init__(self, bucket: str, client_factory: Callable[[], Any]) -> None:
        self._bucket = bucket
        self._client_factory = client_factory
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def children(self, prefix: str) -> list[str]:
        """The prefixes one level below ``prefix`` (``audit/`` → ``audit/<writer>/``), sorted.

        Raises:
            TransportUnavailable: the bucket cannot be listed.
        """
        found: list[str] = []
        for page in self._pages(Prefix=prefix, Delimiter=_DELIMITER):
            found.extend(item["Prefix"] for item in page.get("CommonPrefixes", []))
        return sorted(found)

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, in key order.

        Raises:
            TransportUnavailable: the bucket cannot be listed.
        """
        found: list[str] = []
        for page in self._pages(Prefix=prefix):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(found)

    def read(self, key: str) -> bytes | None:
        """The newest version of ``key``; None when there is no such key.

        Raises:
            TransportUnavailable: S3 cannot be reached or refuses the read.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._s3().get_object(Bucket=self._bucket, Key=key)
            return bytes(response["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise TransportUnavailable(f"cannot read {key}: {type(exc).__name__}") from exc
        except BotoCoreError as exc:
            raise TransportUnavailable(f"cannot read {key}: {type(exc).__name__}") from exc

    def _pages(self, **arguments: str) -> list[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            paginator = self._s3().get_paginator("list_objects_v2")
            return list(paginator.paginate(Bucket=self._bucket, **arguments))
        except (BotoCoreError, ClientError) as exc:
            raise TransportUnavailable(
                f"cannot list {arguments.get('Prefix')}: {type(exc).__name__}"
            ) from exc
