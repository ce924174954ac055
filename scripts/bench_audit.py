"""Audit trail benchmarks.

``audit_verify_1m_s``: ``fabric.audit_chain.verify_trail`` over one million records (200 batch
objects of 5,000 records, 10 signed checkpoints; the objects in memory, as the verifier holds
them once read from S3; signatures checked by moto's KMS in-process).
``audit_writer_records_per_s``: ``fabric.audit_writer.AuditWriter`` writing 100,000 records in
calls of 5,000 (ten audit batches of 500 each), one Object Lock object per call, into moto's S3
and DynamoDB in-process.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

Figure = tuple[str, float, str]
REGION = "ap-southeast-3"


def _record(i: int) -> dict[str, Any]:
    return {
        "event": "accepted",
        "at": "2026-12-03T12:00:00.000Z",
        "message_id": f"01JF{i:022d}",
        "source": "government",
        "topic": "case.updated",
        "body_sha256": hashlib.sha256(i.to_bytes(8, "big")).hexdigest(),
        "transport": "rabbitmq",
        "groups": ["government"],
        "classification": "restricted",
        "encrypted": True,
    }


def _signer() -> Any:
    import boto3

    from fabric.adapters.kms_signer import KmsSigner

    kms = boto3.client("kms", region_name=REGION)
    key = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]["Arn"]
    return KmsSigner(key, lambda: kms)


def bench_audit_verify(records: int = 1_000_000, per_object: int = 5_000) -> Iterator[Figure]:
    """Build a one-million-record trail, then time only its verification."""
    from moto import mock_aws

    from fabric.audit_chain import Chain, encode_object, make_checkpoint, verify_trail

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "moto")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "moto")
    with mock_aws():
        signer = _signer()
        chain = Chain("bench")
        objects: dict[str, bytes] = {}
        checkpoints: list[tuple[str, dict[str, Any]]] = []
        pending: list[tuple[str, str]] = []
        for index in range(records // per_object):
            start = index * per_object
            data = encode_object(chain.link(_record(i) for i in range(start, start + per_object)))
            key = f"audit/bench/{index:06d}.jsonl"
            objects[key] = data
            pending.append((key, hashlib.sha256(data).hexdigest()))
            if len(pending) == 20:
                body = make_checkpoint(
                    writer="bench",
                    sequence=len(checkpoints) + 1,
                    objects=pending,
                    last_seq=chain.seq,
                    last_hash=chain.last_hash,
                    previous_signature=checkpoints[-1][1]["signature"] if checkpoints else None,
                    at="2026-12-03T13:00:00.000Z",
                    signer=signer,
                )
                checkpoints.append((f"checkpoints/bench/{len(checkpoints) + 1:08d}.json", body))
                pending = []
        started = time.perf_counter()
        result = verify_trail(
            objects=objects, checkpoints=checkpoints, signer=signer, writer="bench"
        )
        elapsed = time.perf_counter() - started
    if not result.ok or result.records != records:
        raise RuntimeError(f"the benchmark trail did not verify: {result.problem}")
    yield "audit_verify_1m_s", elapsed, "s"


def bench_audit_writer(records: int = 100_000, per_call: int = 5_000) -> Iterator[Figure]:
    """The writer into moto's S3 (Object Lock bucket) and DynamoDB, in-process."""
    import boto3
    from moto import mock_aws

    from fabric.adapters.audit_storage import DynamoDbChainStore, S3ObjectStore
    from fabric.audit_writer import AuditWriter

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "moto")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "moto")
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(
            Bucket="bench-audit",
            CreateBucketConfiguration={"LocationConstraint": REGION},
            ObjectLockEnabledForBucket=True,
        )
        dynamodb = boto3.client("dynamodb", region_name=REGION)
        dynamodb.create_table(
            TableName="bench-idempotency",
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        writer = AuditWriter(
            "bench",
            chains=DynamoDbChainStore("bench-idempotency", lambda: dynamodb),
            objects=S3ObjectStore("bench-audit", lambda: s3),
            signer=_signer(),
        )
        calls = [
            [(f"batch-{c}-{b}", [_record(i) for i in range(500)]) for b in range(per_call // 500)]
            for c in range(records // per_call)
        ]
        started = time.perf_counter()
        for batches in calls:
            writer.write(batches)
        elapsed = time.perf_counter() - started
    yield "audit_writer_records_per_s", records / elapsed, "records/s"


BENCHMARKS: dict[str, Callable[[], Iterator[Figure]]] = {
    "audit_verify": bench_audit_verify,
    "audit_writer": bench_audit_writer,
}
