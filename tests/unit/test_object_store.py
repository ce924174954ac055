"""The audit bucket's reader tells a missing object from a refused read, also where S3 answers
a missing key with 403 (to a caller that may list only some prefixes of the bucket)."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from fabric.adapters.audit_storage import DynamoDbChainStore, S3ObjectStore
from fabric.audit_writer import ChainState
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


class _Body:
    """A GetObject body whose stream breaks off, as S3's does on a dropped connection."""

    def read(self) -> bytes:
        raise ResponseStreamingError(error="Connection broken: IncompleteRead")


class _BrokenStream:
    def get_object(self, Bucket: str, Key: str) -> Any:
        return {"Body": _Body(), "ObjectLockMode": "COMPLIANCE"}


def test_a_read_whose_body_stream_breaks_is_an_outage_not_a_crash() -> None:
    # The headers arrive, then the connection drops while the body streams: replay ("never
    # raises for bucket trouble") and the verifier catch TransportUnavailable only.
    store = S3ObjectStore("audit", _BrokenStream)
    with pytest.raises(TransportUnavailable):
        store.read("archive/w/2026/12/01/000000000001-000000000002.jsonl")
    with pytest.raises(TransportUnavailable):
        store.get("audit/w/2026/12/01/000000000001-000000000002.jsonl")


def test_the_body_of_a_response_reads_as_an_outage_too() -> None:
    # The compliance report reads the body of ``response`` itself (with the lock headers).
    response = S3ObjectStore("audit", _BrokenStream).response("audit/w/k.jsonl")
    assert response is not None
    assert response["ObjectLockMode"] == "COMPLIANCE"
    with pytest.raises(TransportUnavailable):
        response["Body"].read()


class _DynamoDb:
    """TransactWriteItems failing as given."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def transact_write_items(self, TransactItems: Any) -> Any:
        raise self.error


def _cancelled(*codes: str) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": "TransactionCanceledException", "Message": "cancelled"},
            "CancellationReasons": [{"Code": code} for code in codes],
        },
        "TransactWriteItems",
    )


def test_only_a_failed_version_check_is_another_writer() -> None:
    store = DynamoDbChainStore("t", lambda: _DynamoDb(_cancelled("ConditionalCheckFailed", "None")))
    assert store.save("w", ChainState(version=3), batch_ids=["b1"]) is False


@pytest.mark.parametrize(
    "error",
    [
        _cancelled("ThrottlingError", "None"),
        _cancelled("None", "ProvisionedThroughputExceeded"),
        _cancelled("ValidationError"),
        EndpointConnectionError(endpoint_url="https://dynamodb.ap-southeast-3.amazonaws.com"),
        ReadTimeoutError(endpoint_url="https://dynamodb.ap-southeast-3.amazonaws.com"),
    ],
)
def test_a_throttled_or_unreachable_state_table_is_an_outage_not_a_chain_conflict(
    error: Exception,
) -> None:
    # ChainConflict says another writer advanced the chain (a wiring error: two writers); a
    # throttled transaction or a dropped connection is the table being unavailable.
    store = DynamoDbChainStore("t", lambda: _DynamoDb(error))
    with pytest.raises(TransportUnavailable):
        store.save("w", ChainState(version=3), batch_ids=["b1"])
