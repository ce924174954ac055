"""``runbook verify`` on moto against what anyone able to put a new version of a key can plant:
a checkpoint or an unsealed record with a lone surrogate (``"\\ud800"``, which no UTF-8 holds),
a forged checkpoint naming keys outside the writer's; and an object the writer writes and seals
while the verifier lists the bucket. Each is named, or verifies: never a crash, never an AWS
error in place of the forgery."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from fabric.adapters.audit_storage import DynamoDbChainStore, S3ObjectStore
from fabric.audit import AuditBatch
from fabric.audit_chain import canonical
from fabric.audit_writer import AuditWriter
from tests.integration.test_audit_writer import BUCKET, TABLE, aws_audit  # noqa: F401 (fixture)
from tests.integration.test_runbook_verify_markers import (  # noqa: F401 (fixture)
    WRITER,
    _verify,
    trail,
)

_NO_FORM = "a lone surrogate, or nested deeper than the encoder"


def _get(s3: Any, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


@pytest.mark.parametrize("which", [0, -1])
def test_a_checkpoint_with_a_lone_surrogate_is_named_not_a_crash(
    trail: dict[str, Any],  # noqa: F811 (the fixture)
    which: int,
) -> None:
    # Still a JSON object, so it got as far as its signature: a UnicodeEncodeError traceback,
    # and the compliance report failed every day after it.
    key = trail["checkpoints"][which]
    forged = _get(trail["s3"], key)[:-1] + b',"note":"\\ud800"}'
    assert isinstance(json.loads(forged), dict)
    trail["s3"].put_object(Bucket=BUCKET, Key=key, Body=forged)

    status, output = _verify(trail)

    assert status == 1, output
    assert output.endswith(f"NOT VERIFIED: {key}: not a checkpoint ({_NO_FORM})\n"), output


def test_an_unsealed_record_with_a_lone_surrogate_is_named_not_a_crash(
    trail: dict[str, Any],  # noqa: F811 (the fixture)
) -> None:
    # Its writer, sequence and prev still match: only its hash could not be computed.
    key = trail["objects"][-1]
    first, last = _get(trail["s3"], key).splitlines(keepends=True)
    trail["s3"].put_object(Bucket=BUCKET, Key=key, Body=first + last[:-2] + b',"x":"\\ud800"}\n')

    status, output = _verify(trail)

    assert status == 1, output
    assert output.endswith(
        f"NOT VERIFIED: {key} record 6: not a record the writer could have written ({_NO_FORM})\n"
    ), output


class _ScopedS3:
    """The S3 client with reads and listings refused outside the writer's prefixes, as a
    prefix-scoped read policy does; it records every key read."""

    def __init__(self, s3: Any) -> None:
        self._s3 = s3
        self.reads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s3, name)

    def get_object(self, **arguments: Any) -> Any:
        self.reads.append(arguments["Key"])
        self._scoped("GetObject", arguments["Key"])
        return self._s3.get_object(**arguments)

    def list_objects_v2(self, **arguments: Any) -> Any:
        self._scoped("ListObjectsV2", arguments.get("Prefix", ""))
        return self._s3.list_objects_v2(**arguments)

    @staticmethod
    def _scoped(operation: str, where: str) -> None:
        if not where.startswith((f"audit/{WRITER}/", f"checkpoints/{WRITER}/")):
            raise ClientError({"Error": {"Code": "AccessDenied"}}, operation)


def test_a_forged_checkpoint_is_named_by_its_signature_before_anything_it_names_is_read(
    trail: dict[str, Any],  # noqa: F811 (the fixture)
) -> None:
    # Unsigned, it named the whole trail many times over and another writer's key: every one
    # was read first, and the refused read ended the run as an AWS error, the forgery unnamed.
    key = trail["checkpoints"][0]
    body = json.loads(_get(trail["s3"], key))
    named = [{"key": k, "sha256": "0" * 64} for k in trail["objects"]] * 50
    body["objects"] = [*named, {"key": "audit/other-writer/x.jsonl", "sha256": "0" * 64}]
    trail["s3"].put_object(Bucket=BUCKET, Key=key, Body=canonical(body))
    scoped = trail["s3"] = _ScopedS3(trail["s3"])

    status, output = _verify(trail)

    assert status == 1, output
    assert output.endswith(f"NOT VERIFIED: {key}: the signature does not match the checkpoint\n")
    assert scoped.reads == [key]


class _WriterBetweenListings:
    """The S3 client, with the writer writing and sealing an object just before the verifier's
    second listing (objects or checkpoints) starts."""

    def __init__(self, s3: Any, write: Callable[[], None]) -> None:
        self._s3, self._write, self._listings = s3, write, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s3, name)

    def get_paginator(self, operation: str) -> Any:
        if operation == "list_objects_v2":
            self._listings += 1
            if self._listings == 2:
                self._write()
        return self._s3.get_paginator(operation)


def test_an_object_written_and_sealed_between_the_listings_verifies(
    trail: dict[str, Any],  # noqa: F811 (the fixture)
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # Objects listed first, it was named by a checkpoint and not listed: "an object no
    # checkpoint names, among sealed ones", which reads as a planted object.
    audit = AuditWriter(
        WRITER,
        chains=DynamoDbChainStore(TABLE, lambda: aws_audit["dynamodb"]),
        objects=S3ObjectStore(BUCKET, lambda: aws_audit["s3"]),
        signer=aws_audit["signer"],
    )

    def write_and_seal() -> None:
        audit.write([("b4", AuditBatch([{"event": "rejected", "message_id": "b4-0"}]))])
        audit.checkpoint()

    trail["s3"] = _WriterBetweenListings(trail["s3"], write_and_seal)

    status, output = _verify(trail)

    assert (status, output.splitlines()[1:]) == (
        0,
        [
            "7 records, 4 objects, 2 checkpoints",
            "verified: signatures, chains, Merkle roots and sequence all hold",
        ],
    ), output
