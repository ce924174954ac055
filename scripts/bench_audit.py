"""Audit trail benchmarks.

``audit_verify_1m_s``: ``fabric.audit_chain.verify_trail`` over one million records (200 batch
objects of 5,000 records, 10 signed checkpoints; the objects in memory, as the verifier holds
them once read from S3; signatures checked by moto's KMS in-process).
``audit_writer_records_per_s``: ``fabric.audit_writer.AuditWriter`` writing 100,000 records in
calls of 5,000, each the audit batches of ten router calls of 250 restricted messages (two records
a message, and the stored bodies), one Object Lock object and one archive object per call, into
moto's S3 and DynamoDB in-process.
``compliance_report_1m_s``: the compliance report function's ``ComplianceReporter.run`` (built by
``fabric.bootstrap.build_compliance_reporter``, as the Lambda builds it) over a UTC day of one
million records (1,000 Object Lock objects of 1,000 records in the audit writer's key layout,
hourly signed checkpoints, the anchor before the day and the checkpoint after it), against moto's
S3, KMS and SNS in-process: listing, reading every object with its Object Lock read back,
verification from the anchor, the figures, the three files into the reports bucket (SSE-KMS)
and the summary on the topic.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

Figure = tuple[str, float, str]
REGION = "ap-southeast-3"


def _record(i: int) -> dict[str, Any]:
    # The router's pairs: record 2n accepts message n, record 2n + 1 routes it.
    return {
        "event": "accepted" if i % 2 == 0 else "routed",
        "at": "2026-12-03T12:00:00.000Z",
        "message_id": f"01JF{i // 2:022d}",
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

    from fabric.audit_chain import Chain, Keyring, encode_object, make_checkpoint, verify_trail

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
            objects=objects, checkpoints=checkpoints, keys=Keyring([signer]), writer="bench"
        )
        elapsed = time.perf_counter() - started
    if not result.ok or result.records != records:
        raise RuntimeError(f"the benchmark trail did not verify: {result.problem}")
    yield "audit_verify_1m_s", elapsed, "s"


def bench_audit_writer(records: int = 100_000, per_call: int = 5_000) -> Iterator[Figure]:
    """The writer into moto's S3 (Object Lock bucket) and DynamoDB, in-process, given the audit
    batches the router emits (``_router_batches``): each call stores an audit object and the
    archive object of the bodies its records name."""
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
        calls = _router_batches(records // per_call, per_call)
        started = time.perf_counter()
        written = [writer.write(batches) for batches in calls]
        elapsed = time.perf_counter() - started
    stored = sum(w.records for w in written)
    archived = sum(w.archived for w in written)
    if stored != records or archived != records // 2:
        raise RuntimeError(f"the writer stored {stored} records and archived {archived} bodies")
    yield "audit_writer_records_per_s", records / elapsed, "records/s"


def _router_batches(calls: int, per_call: int) -> list[list[tuple[str, Any]]]:
    """``calls`` lists of (batch id, ``AuditBatch``) of ``per_call`` records, as the writer gets
    them from the router: each router call of 250 restricted 1 KiB case updates (moto's KMS)
    emits an ``accepted`` and a ``routed`` record a message and carries the stored bodies for
    the archive, split into audit messages as the router's audit sink splits them."""
    import boto3

    from fabric.adapters.esdk import EsdkCipher
    from fabric.adapters.memory import MemoryTransport
    from fabric.audit import decode_audit_batch
    from fabric.audit_sink import TransportAuditSink
    from fabric.ports import MessageKind
    from fabric.router import Router
    from fabric.routing import default_routing_table

    key = boto3.client("kms", region_name=REGION).create_key()["KeyMetadata"]["Arn"]
    transport = MemoryTransport(name="rabbitmq")
    router = Router(
        table=default_routing_table(),
        transports=[transport],
        cipher=EsdkCipher(key),
        audit=TransportAuditSink([transport], emitted_by="router"),
        environment="bench",
    )
    out: list[list[tuple[str, Any]]] = []
    for _ in range(calls):
        transport.published.clear()
        for _ in range(per_call // 500):
            items: list[Any] = [
                {
                    "message_id": str(uuid.uuid4()),
                    "topic": "case.assessment.updated",
                    "classification": "restricted",
                    "payload": {"data": "x" * 1024},
                }
                for _ in range(250)
            ]
            if router.route(items, source="government").rejected:
                raise RuntimeError("the router rejected the benchmark's messages")
        out.append(
            [
                (m.message_id, decode_audit_batch(m.body))
                for m in transport.published
                if m.kind is MessageKind.AUDIT
            ]
        )
    return out


def _life(i: int, at: datetime) -> dict[str, Any]:
    """Record ``i`` of a day: each message is accepted, routed and delivered to two groups (4
    records, a few ms apart); one in a hundred is an emergency, every other one restricted."""
    from fabric.envelope import format_timestamp

    message, step = divmod(i, 4)
    group = ("government", "community")[step % 2]
    record: dict[str, Any] = {
        "event": ("accepted", "routed", "delivered", "delivered")[step],
        "at": format_timestamp(at + timedelta(milliseconds=(step > 1) * (3 + message % 40) * step)),
        "message_id": f"01JF{message:022d}",
        "source": "government",
        "topic": "case.updated",
        "priority": "emergency" if message % 100 == 0 else "normal",
        "body_sha256": hashlib.sha256(message.to_bytes(8, "big")).hexdigest(),
    }
    if step == 0:
        restricted = message % 2 == 0
        record.update(
            transport="rabbitmq",
            classification="restricted" if restricted else "internal",
            encrypted=restricted,
            groups=["government", "community"],
        )
    elif step == 1:
        record["queues"] = ["fabric.government", "fabric.community"]
    else:
        record.update(groups=[group], queues=[f"fabric.{group}"], attempt=1)
    return record


def bench_compliance_report(records: int = 1_000_000, per_object: int = 1_000) -> Iterator[Figure]:
    """Write a day of one million records into moto's Object Lock bucket, then time the report."""
    import boto3
    from moto import mock_aws

    from fabric.adapters.audit_storage import S3ObjectStore
    from fabric.audit_chain import Chain, canonical, encode_object, make_checkpoint
    from fabric.audit_writer import checkpoint_key, object_key
    from fabric.bootstrap import build_compliance_reporter
    from fabric.compliance_run import Period
    from fabric.envelope import format_timestamp
    from fabric.settings import ComplianceReportSettings

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "moto")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "moto")
    writer, day = "bench-writer", datetime(2026, 12, 2, tzinfo=UTC)
    with mock_aws():
        s3, audit_key, topic_arn = _report_aws()
        signer = _signer()
        store, chain = S3ObjectStore("bench-audit", lambda: s3), Chain(writer)
        pending: list[tuple[str, str]] = []
        sealed: list[str | None] = [None]

        def seal(at: datetime) -> None:
            body = make_checkpoint(
                writer=writer,
                sequence=len(sealed),
                objects=pending,
                last_seq=chain.seq,
                last_hash=chain.last_hash,
                previous_signature=sealed[-1],
                at=format_timestamp(at),
                signer=signer,
            )
            store.put(checkpoint_key(writer, len(sealed)), canonical(body))
            sealed.append(str(body["signature"]))
            pending.clear()

        seal(day - timedelta(hours=1))  # the anchor: the day before's last checkpoint
        count = records // per_object
        for index in range(count):
            at = day + timedelta(seconds=86_400 * index / count)
            if pending and at >= day + timedelta(hours=len(sealed) - 1):
                seal(day + timedelta(hours=len(sealed) - 1))
            first = index * per_object
            data = encode_object(chain.link(_life(i, at) for i in range(first, first + per_object)))
            key = object_key(writer, chain.seq - per_object + 1, chain.seq, at)
            store.put(key, data)
            pending.append((key, hashlib.sha256(data).hexdigest()))
        while len(sealed) - 1 <= 26:  # to 01:00 the next day: the late-arrival margin
            seal(day + timedelta(hours=len(sealed) - 1))

        reporter = build_compliance_reporter(
            ComplianceReportSettings(
                environment="bench",
                audit_bucket="bench-audit",
                writers=(writer,),
                signing_key_arn=signer.key_id,
                reports_bucket="bench-reports",
                reports_key_arn=audit_key,
                topic_arn=topic_arn,
            ),
            client_factory=lambda service: boto3.client(service, region_name=REGION),
            metrics=_NoMetrics(),
        )
        started = time.perf_counter()
        summary = reporter.run(Period.day(day.date()))
        elapsed = time.perf_counter() - started
    if not summary["verified"] or summary["records"] != records:
        raise RuntimeError(f"the benchmark day did not report: {summary}")
    yield "compliance_report_1m_s", elapsed, "s"


def _report_aws() -> tuple[Any, str, str]:
    """The audit bucket (Object Lock, COMPLIANCE 7 years), the reports bucket, the audit key and
    the compliance topic, in moto: (S3 client, key ARN, topic ARN)."""
    import boto3

    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(
        Bucket="bench-audit",
        CreateBucketConfiguration={"LocationConstraint": REGION},
        ObjectLockEnabledForBucket=True,
    )
    s3.put_object_lock_configuration(
        Bucket="bench-audit",
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Years": 7}},
        },
    )
    s3.create_bucket(
        Bucket="bench-reports", CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    kms = boto3.client("kms", region_name=REGION)
    audit_key = kms.create_key(Description="bench audit")["KeyMetadata"]["Arn"]
    topic = boto3.client("sns", region_name=REGION).create_topic(Name="bench-compliance")
    return s3, str(audit_key), str(topic["TopicArn"])


class _NoMetrics:
    def count(self, counts: Any) -> None:
        """The benchmark prints only its BENCH line."""


BENCHMARKS: dict[str, Callable[[], Iterator[Figure]]] = {
    "audit_verify": bench_audit_verify,
    "audit_writer": bench_audit_writer,
    "compliance_report": bench_compliance_report,
}
