"""Rotating the audit signing key, on moto: a trail signed by a retired key and then by the
current one verifies wherever both are trusted (the runbook, the compliance report function),
fails where one is missing, and a checkpoint signed with the retired key after the rotation is
refused however valid its signature."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import boto3
import pytest
from moto import mock_aws

from fabric.adapters.audit_storage import DynamoDbChainStore, S3ObjectStore
from fabric.adapters.kms_signer import KmsSigner
from fabric.audit import AuditBatch, AuditRecord
from fabric.audit_chain import make_checkpoint
from fabric.audit_writer import AuditWriter, checkpoint_key
from scripts import runbook
from tests.conftest import load_handler
from tests.integration.aws_audit import create_audit_bucket, create_idempotency_table
from tests.integration.aws_fallback import REGION

pytestmark = pytest.mark.integration

AUDIT_BUCKET = "fabric-test-audit"
REPORTS_BUCKET = "fabric-test-reports"
TABLE = "fabric-test-idempotency"
WRITER = "fabric-test-audit-writer"
DAY = datetime(2026, 11, 20, tzinfo=UTC)
ROTATED_AT = 12  # the hour of DAY from which the new key signs


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """moto: the audit bucket, the chain table, two signing keys (retired, current), and what
    the compliance report writes to."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "moto",
        "AWS_SECRET_ACCESS_KEY": "moto",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        s3, kms = boto3.client("s3", region_name=REGION), boto3.client("kms", region_name=REGION)
        create_audit_bucket(s3, AUDIT_BUCKET)
        s3.create_bucket(
            Bucket=REPORTS_BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        dynamodb = boto3.client("dynamodb", region_name=REGION)
        create_idempotency_table(dynamodb, TABLE)
        retired, current = (
            KmsSigner(
                kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"][
                    "Arn"
                ],
                lambda: kms,
            )
            for _ in range(2)
        )
        topic = boto3.client("sns", region_name=REGION).create_topic(Name="compliance")
        yield {
            "s3": s3,
            "kms": kms,
            "dynamodb": dynamodb,
            "retired": retired,
            "current": current,
            "topic": topic["TopicArn"],
            "report_key": kms.create_key(Description="reports")["KeyMetadata"]["Arn"],
        }


def write_rotated_trail(aws: dict[str, Any], hours: int = 26) -> None:
    """A record and a checkpoint every hour from DAY 00:00 for ``hours`` hours; the writer
    signs with the retired key before ROTATED_AT and with the current key from then on (the
    same chain: a rotation only changes the writer's ``SIGNING_KEY_ARN``)."""
    for hour in range(hours):
        at = DAY + timedelta(hours=hour, minutes=30)
        writer = AuditWriter(
            WRITER,
            chains=DynamoDbChainStore(TABLE, lambda: aws["dynamodb"]),
            objects=S3ObjectStore(AUDIT_BUCKET, lambda: aws["s3"]),
            signer=aws["retired"] if hour < ROTATED_AT else aws["current"],
            now=lambda at=at: at,
        )
        record = AuditRecord(event="rejected", at=at, message_id=f"m-{hour}", source="router")
        writer.write([(f"batch-{hour}", AuditBatch([record.to_dict()]))])
        writer.checkpoint()


def forge_with_the_retired_key(aws: dict[str, Any]) -> str:
    """What a holder of the retired key could add after the rotation: the next checkpoint,
    correctly numbered and chained, with a valid signature of the retired key."""
    store = S3ObjectStore(AUDIT_BUCKET, lambda: aws["s3"])
    (*_, last_key) = store.keys(f"checkpoints/{WRITER}/")
    last = json.loads(store.get(last_key))
    forged = make_checkpoint(
        writer=WRITER,
        sequence=last["checkpoint"] + 1,
        objects=[],
        last_seq=last["last_seq"],
        last_hash=last["last_hash"],
        previous_signature=last["signature"],
        at="2026-11-21T02:00:00.000Z",
        signer=aws["retired"],
    )
    key = checkpoint_key(WRITER, last["checkpoint"] + 1)
    store.put(key, json.dumps(forged).encode())
    return key


def verify(aws: dict[str, Any], *trusted: KmsSigner) -> tuple[int, str]:
    out = io.StringIO()
    status = runbook.verify(
        bucket=AUDIT_BUCKET,
        signing_keys=[signer.key_id for signer in trusted],
        writer=WRITER,
        client={"s3": aws["s3"], "kms": aws["kms"]}.__getitem__,
        out=out,
    )
    return status, out.getvalue()


def test_the_runbook_verifies_a_trail_across_a_rotation_only_with_both_keys_trusted(
    aws: dict[str, Any],
) -> None:
    write_rotated_trail(aws)

    status, output = verify(aws, aws["retired"], aws["current"])
    assert status == 0, output
    assert "26 records, 26 objects, 26 checkpoints" in output

    status, output = verify(aws, aws["current"])
    assert status == 1
    first = checkpoint_key(WRITER, 1)
    assert f"NOT VERIFIED: {first}: signed by a key that is not trusted" in output

    status, output = verify(aws, aws["retired"])
    assert status == 1
    rotated = checkpoint_key(WRITER, ROTATED_AT + 1)
    assert f"NOT VERIFIED: {rotated}: signed by a key that is not trusted" in output

    # The order is the order of service: the current key named first makes the old
    # checkpoints come after a newer key's.
    status, output = verify(aws, aws["current"], aws["retired"])
    assert status == 1
    assert f"NOT VERIFIED: {rotated}: signed by a retired key after a newer one" in output


def test_a_checkpoint_signed_with_the_retired_key_after_the_rotation_is_refused(
    aws: dict[str, Any],
) -> None:
    write_rotated_trail(aws)
    forged = forge_with_the_retired_key(aws)

    status, output = verify(aws, aws["retired"], aws["current"])

    assert status == 1
    assert f"NOT VERIFIED: {forged}: signed by a retired key after a newer one" in output


@pytest.fixture
def report(aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The compliance report function's handler, configured as the stack configures it after
    one rotation (``retired``: whether RETIRED_SIGNING_KEY_ARNS names the retired key)."""

    def run(day: str, *, retired: bool = True) -> dict[str, Any]:
        for name, value in {
            "FABRIC_ENV": "test",
            "AUDIT_BUCKET": AUDIT_BUCKET,
            "AUDIT_WRITERS": WRITER,
            "SIGNING_KEY_ARN": aws["current"].key_id,
            "REPORTS_BUCKET": REPORTS_BUCKET,
            "REPORTS_KEY_ARN": aws["report_key"],
            "COMPLIANCE_TOPIC_ARN": aws["topic"],
        }.items():
            monkeypatch.setenv(name, value)
        if retired:
            monkeypatch.setenv("RETIRED_SIGNING_KEY_ARNS", aws["retired"].key_id)
        else:
            monkeypatch.delenv("RETIRED_SIGNING_KEY_ARNS", raising=False)
        handler: ModuleType = load_handler("compliance_report", monkeypatch)
        summary: dict[str, Any] = handler.handler({"date": day}, None)
        return summary

    return run


def test_the_compliance_report_verifies_the_day_of_the_rotation_with_the_retired_key_trusted(
    aws: dict[str, Any], report: Any
) -> None:
    write_rotated_trail(aws)

    trusted = report("2026-11-20")
    assert trusted["verified"] is True, trusted["problem"]
    assert trusted["problem"] is None

    untrusted = report("2026-11-20", retired=False)
    assert untrusted["verified"] is False
    assert untrusted["problem"].endswith(": signed by a key that is not trusted")


def test_the_compliance_report_refuses_a_retired_keys_checkpoint_after_a_newer_ones_window(
    aws: dict[str, Any], report: Any
) -> None:
    # The next day's window starts after a checkpoint of the current key (its anchor): the
    # rank carries over from the anchor, though the window holds no current-key checkpoint.
    write_rotated_trail(aws, hours=24)
    forged = forge_with_the_retired_key(aws)

    summary = report("2026-11-21")

    assert summary["verified"] is False
    assert summary["problem"] == f"{forged}: signed by a retired key after a newer one"
