"""``runbook verify`` on moto's Object Lock bucket: a key hidden by a delete marker (a plain
DeleteObject, which Object Lock does not refuse) is named, and the trail is not verified."""

from __future__ import annotations

import io
from typing import Any

import boto3
import pytest

from fabric.adapters.audit_storage import DynamoDbChainStore, S3ObjectStore
from fabric.audit import AuditBatch
from fabric.audit_writer import AuditWriter
from scripts import runbook
from tests.integration.aws_fallback import REGION
from tests.integration.test_audit_writer import BUCKET, TABLE, aws_audit  # noqa: F401 (fixture)

WRITER = "writer-a"
_DELETED = "deleted after they were written (a delete marker among their versions)"


@pytest.fixture
def trail(aws_audit: dict[str, Any]) -> dict[str, Any]:  # noqa: F811 (the fixture)
    """A writer's trail: two sealed objects, each under its own checkpoint, and an unsealed
    object after the last checkpoint (the current hour's)."""
    s3, dynamodb, signer = aws_audit["s3"], aws_audit["dynamodb"], aws_audit["signer"]
    audit = AuditWriter(
        WRITER,
        chains=DynamoDbChainStore(TABLE, lambda: dynamodb),
        objects=S3ObjectStore(BUCKET, lambda: s3),
        signer=signer,
    )
    objects, checkpoints = [], []
    for batch_id in ("b1", "b2"):
        objects.append(audit.write([_batch(batch_id)]).key)
        checkpoints.append(audit.checkpoint())
    objects.append(audit.write([_batch("b3")]).key)
    return {
        "s3": s3,
        "kms": boto3.client("kms", region_name=REGION),
        "key_arn": signer.key_id,
        "objects": objects,
        "checkpoints": checkpoints,
    }


def _batch(batch_id: str) -> tuple[str, AuditBatch]:
    return batch_id, AuditBatch(
        [
            {"event": "rejected", "message_id": f"{batch_id}-{i}", "source": "router"}
            for i in range(2)
        ]
    )


def _verify(trail: dict[str, Any]) -> tuple[int, str]:
    out = io.StringIO()
    status = runbook.verify(
        bucket=BUCKET,
        signing_keys=[trail["key_arn"]],
        writer=WRITER,
        client={"s3": trail["s3"], "kms": trail["kms"]}.__getitem__,
        out=out,
    )
    return status, out.getvalue()


def _delete(trail: dict[str, Any], key: str) -> None:
    """A plain DeleteObject: on the versioned, locked bucket it adds a delete marker."""
    answer = trail["s3"].delete_object(Bucket=BUCKET, Key=key)
    assert answer["DeleteMarker"] is True
    assert trail["s3"].list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount") == 0


def test_an_intact_trail_still_verifies(trail: dict[str, Any]) -> None:
    assert _verify(trail) == (
        0,
        f"reading 3 objects of {WRITER} from s3://{BUCKET} ...\n"
        "6 records, 3 objects, 2 checkpoints\n"
        "verified: signatures, chains, Merkle roots and sequence all hold\n",
    )


@pytest.mark.parametrize("hidden", ["objects", "checkpoints"])
def test_a_last_object_or_checkpoint_behind_a_delete_marker_is_named(
    trail: dict[str, Any], hidden: str
) -> None:
    # Without its last object (unsealed) or its last checkpoint (its object then reads as
    # unsealed), the trail left is a valid trail: only the marker tells what is gone.
    key = trail[hidden][-1]
    _delete(trail, key)
    status, output = _verify(trail)
    assert status == 1, output
    assert f"NOT VERIFIED: 1 key(s) of {WRITER} {_DELETED}:\n  {key}\n" in output
    assert "verified: signatures" not in output


def test_a_trail_hidden_whole_by_delete_markers_names_them_not_just_no_trail(
    trail: dict[str, Any],
) -> None:
    keys = trail["objects"] + trail["checkpoints"]
    for key in keys:
        _delete(trail, key)
    status, output = _verify(trail)
    assert status == 1, output
    assert f"reading 0 objects of {WRITER}" in output
    assert f"NOT VERIFIED: 5 key(s) of {WRITER} {_DELETED}:\n" in output
    assert "".join(f"  {key}\n" for key in sorted(keys)) in output


@pytest.mark.parametrize("body", [b"not json", b"[]", b'"x"', b"[" * 100_000])
@pytest.mark.parametrize("which", [0, -1])
def test_a_checkpoint_that_is_not_a_json_object_is_named_not_a_crash(
    trail: dict[str, Any], body: bytes, which: int
) -> None:
    # It was a JSONDecodeError or AttributeError traceback: the operator learnt nothing.
    key = trail["checkpoints"][which]  # the first is the next one's anchor too
    trail["s3"].put_object(Bucket=BUCKET, Key=key, Body=body)
    status, output = _verify(trail)
    assert status == 1, output
    assert output.endswith(f"NOT VERIFIED: {key}: not a checkpoint (not a JSON object)\n")


def test_a_checkpoint_naming_a_key_that_is_not_trusted_is_named(trail: dict[str, Any]) -> None:
    key = trail["checkpoints"][-1]
    trail["s3"].put_object(Bucket=BUCKET, Key=key, Body=b'{"key_id": [1]}')
    assert _verify(trail) == (
        1,
        f"reading 3 objects of {WRITER} from s3://{BUCKET} ...\n"
        "2 records, 1 objects, 1 checkpoints\n"
        f"NOT VERIFIED: {key}: signed by a key that is not trusted\n",
    )
