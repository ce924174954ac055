"""The audit bucket's reader tells a missing object from a refused read, also where S3 answers
a missing key with 403 (to a caller that may list only some prefixes of the bucket)."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from fabric.adapters.audit_storage import S3ObjectStore
from fabric.errors import TransportUnavailable


class _S3:
    """GetObject refused with AccessDenied, as S3 answers a reader without s3:ListBucket on
    the key's prefix; ListObjectsV2 answers from ``keys``."""

    def __init__(self, *keys: str) -> None:
        self.keys = keys

    def get_object(self, Bucket: str, Key: str) -> Any:
        error = {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}
        raise ClientError(error, "GetObject")

    def list_objects_v2(self, Bucket: str, Prefix: str, MaxKeys: int) -> Any:
        return {"Contents": [{"Key": k} for k in self.keys if k.startswith(Prefix)][:MaxKeys]}


def test_a_403_for_a_key_that_is_not_listed_is_a_missing_object() -> None:
    # An abandoned attempt that never got stored, an archive twin that was never written:
    # the verifier and replay expect None, not an outage.
    store = S3ObjectStore(
        "audit", lambda: _S3("audit/w/2026/12/01/000000000001-000000000002.jsonl")
    )
    assert store.read("audit/w/2026/12/01/000000000001-000000000001.jsonl") is None


def test_a_403_for_a_key_that_exists_is_a_refused_read() -> None:
    key = "audit/w/2026/12/01/000000000001-000000000002.jsonl"
    store = S3ObjectStore("audit", lambda: _S3(key))
    with pytest.raises(TransportUnavailable):
        store.read(key)
