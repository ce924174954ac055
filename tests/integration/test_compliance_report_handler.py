"""The compliance report function on moto: a trail written by the real audit writer into the
Object Lock bucket, reported by the handler into the reports bucket (SSE-KMS) with a summary on
the SNS topic; the schedule, on-demand periods, bad input, a tampered trail, and an object
deleted (a delete marker) from under Object Lock."""

from __future__ import annotations

import csv
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
from fabric.audit import AuditBatch, AuditEvent, AuditRecord
from fabric.audit_chain import canonical, decode_object
from fabric.audit_writer import AuditWriter
from fabric.errors import TransportUnavailable
from tests.conftest import load_handler
from tests.integration.aws_audit import create_audit_bucket, create_idempotency_table
from tests.integration.aws_fallback import REGION

pytestmark = pytest.mark.integration

AUDIT_BUCKET = "fabric-test-audit"
REPORTS_BUCKET = "fabric-test-reports"
TABLE = "fabric-test-idempotency"
WRITER = "fabric-test-audit-writer"
DAY = datetime(2026, 11, 20, tzinfo=UTC)  # the day most tests report
SCHEDULED = {
    "version": "0",
    "id": "7bf73129-1428-4cd3-a780-95db273d1602",
    "detail-type": "Scheduled Event",
    "source": "aws.events",
    "time": "2026-11-21T02:30:00Z",
    "region": REGION,
    "resources": [f"arn:aws:events:{REGION}:123456789012:rule/fabric-test-compliance-report"],
    "detail": {},
}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """moto with the audit bucket (Object Lock), the reports bucket (SSE-KMS with the audit
    key), the signing key, the chain table, and the compliance topic with a queue on it."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "moto",
        "AWS_SECRET_ACCESS_KEY": "moto",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        kms = boto3.client("kms", region_name=REGION)
        audit_key = kms.create_key(Description="audit")["KeyMetadata"]["Arn"]
        create_audit_bucket(s3, AUDIT_BUCKET)
        s3.create_bucket(
            Bucket=REPORTS_BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        s3.put_bucket_versioning(
            Bucket=REPORTS_BUCKET, VersioningConfiguration={"Status": "Enabled"}
        )
        dynamodb = boto3.client("dynamodb", region_name=REGION)
        create_idempotency_table(dynamodb, TABLE)
        signing = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]
        sns = boto3.client("sns", region_name=REGION)
        topic = sns.create_topic(Name="fabric-test-compliance")["TopicArn"]
        sqs = boto3.client("sqs", region_name=REGION)
        inbox = sqs.create_queue(QueueName="compliance-officer")["QueueUrl"]
        inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox, AttributeNames=["QueueArn"])
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=inbox_arn["Attributes"]["QueueArn"])
        yield {
            "s3": s3,
            "sqs": sqs,
            "inbox": inbox,
            "topic": topic,
            "audit_key": audit_key,
            "signer": KmsSigner(signing["Arn"], lambda: kms),
            "dynamodb": dynamodb,
        }


@pytest.fixture
def handler(aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    for name, value in {
        "FABRIC_ENV": "test",
        "AUDIT_BUCKET": AUDIT_BUCKET,
        "AUDIT_WRITERS": WRITER,
        "SIGNING_KEY_ARN": aws["signer"].key_id,
        "REPORTS_BUCKET": REPORTS_BUCKET,
        "REPORTS_KEY_ARN": aws["audit_key"],
        "COMPLIANCE_TOPIC_ARN": aws["topic"],
    }.items():
        monkeypatch.setenv(name, value)
    return load_handler("compliance_report", monkeypatch)


def record(event: AuditEvent, at: datetime, message_id: str, **fields: Any) -> dict[str, Any]:
    return AuditRecord(
        event=event, at=at, message_id=message_id, source="router", **fields
    ).to_dict()


class Fabric:
    """Writes what the fabric would audit, hour by hour, through the real audit writer."""

    def __init__(self, aws: dict[str, Any], name: str = WRITER, chains: Any = None) -> None:
        self.clock = DAY
        self.name = name
        self.writer = AuditWriter(
            name,
            chains=chains or DynamoDbChainStore(TABLE, lambda: aws["dynamodb"]),
            objects=S3ObjectStore(AUDIT_BUCKET, lambda: aws["s3"]),
            signer=aws["signer"],
            now=lambda: self.clock,
        )
        self.batches = 0

    def write(self, at: datetime, records: list[dict[str, Any]]) -> str:
        self.clock, self.batches = at, self.batches + 1
        written = self.writer.write([(f"{self.name}-{self.batches}", AuditBatch(records))])
        assert written.key is not None
        return written.key

    def hour(self, start: datetime) -> None:
        """An emergency (delivered to government 40 ms later), a restricted case update, a
        message through the fallback path drained back, and a rejection; then the checkpoint."""
        tag = f"{start:%d%H}"
        at = start + timedelta(minutes=5)
        emergency = f"em-{tag}"
        case = f"case-{tag}"
        fallback = f"fb-{tag}"
        self.write(
            at,
            [
                record(
                    AuditEvent.ACCEPTED,
                    at,
                    emergency,
                    transport="rabbitmq",
                    priority="emergency",
                    classification="restricted",
                    encrypted=True,
                    groups=("government",),
                ),
                record(AuditEvent.ROUTED, at, emergency, queues=("fabric.government.emergency",)),
                record(
                    AuditEvent.ACCEPTED,
                    at,
                    case,
                    transport="rabbitmq",
                    priority="normal",
                    classification="restricted",
                    encrypted=True,
                    groups=("government",),
                ),
                record(AuditEvent.ROUTED, at, case, queues=("fabric.government",)),
                record(
                    AuditEvent.ACCEPTED,
                    at,
                    fallback,
                    transport="sns",
                    priority="high",
                    groups=("media",),
                ),
                record(AuditEvent.FALLBACK, at, fallback, groups=("media",), reason="timeout"),
                record(AuditEvent.REJECTED, at, f"bad-{tag}", reason="malformed_json"),
            ],
        )
        later = at + timedelta(milliseconds=40)
        self.write(
            later + timedelta(seconds=1),
            [
                record(
                    AuditEvent.DELIVERED,
                    later,
                    emergency,
                    priority="emergency",
                    groups=("government",),
                    queues=("fabric.government.emergency",),
                    attempt=1,
                ),
                record(
                    AuditEvent.DRAINED, later, fallback, transport="rabbitmq", groups=("media",)
                ),
            ],
        )
        self.clock = start + timedelta(hours=1)
        self.writer.checkpoint()


@pytest.fixture
def fabric(aws: dict[str, Any]) -> Fabric:
    """Nov 19 23:00 to Nov 21 03:00, sealed every hour."""
    fabric = Fabric(aws)
    start = DAY - timedelta(hours=1)
    for hour in range(28):
        fabric.hour(start + timedelta(hours=hour))
    return fabric


def summaries(aws: dict[str, Any]) -> list[dict[str, Any]]:
    """What the compliance officer's queue received from the topic (SNS envelopes)."""
    received = aws["sqs"].receive_message(QueueUrl=aws["inbox"], MaxNumberOfMessages=10)
    return [json.loads(m["Body"]) for m in received.get("Messages", [])]


def reports(aws: dict[str, Any]) -> list[str]:
    listed = aws["s3"].list_objects_v2(Bucket=REPORTS_BUCKET)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def read(aws: dict[str, Any], key: str) -> bytes:
    return bytes(aws["s3"].get_object(Bucket=REPORTS_BUCKET, Key=key)["Body"].read())


def test_the_schedule_reports_yesterday_into_the_reports_bucket_and_tells_the_topic(
    handler: ModuleType, fabric: Fabric, aws: dict[str, Any]
) -> None:
    summary = handler.handler(SCHEDULED, None)

    assert summary["period"] == {"start": "2026-11-20T00:00:00Z", "end": "2026-11-21T00:00:00Z"}
    assert summary["verified"] is True
    assert summary["problem"] is None
    base = "compliance/test/2026/11/20/2026-11-20"
    assert summary["report"] == {
        "bucket": REPORTS_BUCKET,
        "json": f"{base}.json",
        "html": f"{base}.html",
        "csv": f"{base}.csv",
    }
    assert reports(aws) == [f"{base}.csv", f"{base}.html", f"{base}.json"]
    for key in reports(aws):
        head = aws["s3"].head_object(Bucket=REPORTS_BUCKET, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms"
        assert head["SSEKMSKeyId"] == aws["audit_key"]

    report = json.loads(read(aws, f"{base}.json"))
    # 24 hours of 3 accepted messages, one delivery each for the emergencies, one drain.
    assert report["outcomes"] == {
        "accepted": 72,
        "delivered": 24,
        "drained": 24,
        "fallback": 24,
        "rejected": 24,
        "routed": 48,
    }
    assert report["acceptance_rate"] == 1.0
    # Only the emergencies' consumers recorded their deliveries: one copy in three.
    assert report["delivery_success_rate"] == 24 / 72
    assert (report["copies"]["addressed"], report["copies"]["undelivered"]) == (72, 48)
    assert report["encryption"] == {"restricted_accepted": 48, "encrypted": 48, "coverage": 1.0}
    latency = report["emergency_latency_ms"]
    assert (latency["count"], latency["p50"], latency["p99"]) == (24, 40.0, 40.0)
    assert latency["by_group"]["government"]["count"] == 24
    assert report["fallback_not_drained"]["messages"] == 0
    # Read back from S3: every object the report read is locked, COMPLIANCE, for years.
    lock = report["object_lock"]
    assert lock["modes"] == {"COMPLIANCE": lock["objects"]}
    assert lock["unlocked"] == []
    assert lock["earliest_retain_until"] > "2033-"
    (writer,) = report["verification"]["writers"]
    assert (writer["writer"], writer["unsealed_objects"]) == (WRITER, 0)
    assert writer["checkpoints"] == 26  # 00:00 on the 20th to 01:00 on the 21st

    page = read(aws, f"{base}.html").decode()
    assert page.count("<svg") == 5
    assert "The trail verifies" in page
    rows = list(csv.reader(io.StringIO(read(aws, f"{base}.csv").decode())))
    assert ["emergency_latency_ms", "p99", "40.0"] in rows

    (envelope,) = summaries(aws)
    assert envelope["Subject"] == "Messaging Fabric test compliance 2026-11-20: verified"
    assert envelope["MessageAttributes"]["verified"]["Value"] == "true"
    assert json.loads(envelope["Message"]) == summary
    assert summary["emergency_latency_p99_ms"] == 40.0
    assert summary["encryption_coverage"] == 1.0
    # No message ids or body hashes in what the topic's subscribers read.
    assert "em-20" not in envelope["Message"]
    assert "body_sha256" not in envelope["Message"]


def test_on_demand_a_few_hours_report_only_those_hours(
    handler: ModuleType, fabric: Fabric, aws: dict[str, Any]
) -> None:
    summary = handler.handler(
        {"start": "2026-11-20T10:00:00+07:00", "end": "2026-11-20T06:00:00Z"}, None
    )
    assert summary["period"] == {"start": "2026-11-20T03:00:00Z", "end": "2026-11-20T06:00:00Z"}
    assert summary["verified"] is True
    assert summary["accepted"] == 9
    assert summary["report"]["json"] == (
        "compliance/test/2026/11/20/20261120T030000Z--20261120T060000Z.json"
    )


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"date": "2026-13-01"}, "not a calendar date"),
        ({"start": "2026-11-20T00:00:00Z"}, 'give {"date": "YYYY-MM-DD"}'),
        ({"date": "2099-01-01"}, "starts in the future"),
        ([], "must be a JSON object"),
    ],
)
def test_a_bad_request_is_refused_and_nothing_is_written_or_sent(
    handler: ModuleType, fabric: Fabric, aws: dict[str, Any], event: Any, reason: str
) -> None:
    answer = handler.handler(event, None)
    assert set(answer) == {"error"}
    assert reason in answer["error"]
    assert reports(aws) == []
    assert summaries(aws) == []


def test_a_tampered_trail_is_reported_not_verified_naming_the_place(
    handler: ModuleType, fabric: Fabric, aws: dict[str, Any]
) -> None:
    store = S3ObjectStore(AUDIT_BUCKET, lambda: aws["s3"])
    key = store.keys(f"audit/{WRITER}/2026/11/20/")[10]
    records = decode_object(store.get(key))
    records[0]["encrypted"] = False  # someone "corrects" a record: a new version of the key
    store.put(key, b"".join(canonical(r) + b"\n" for r in records))

    summary = handler.handler({"date": "2026-11-20"}, None)

    assert summary["verified"] is False
    assert summary["problem"] == f"{key}: its SHA-256 differs from the checkpoint's"
    report = json.loads(read(aws, summary["report"]["json"]))
    assert report["verification"]["problem"] == summary["problem"]
    page = read(aws, summary["report"]["html"]).decode()
    assert f"NOT VERIFIED: {key}: its SHA-256 differs" in page
    (envelope,) = summaries(aws)
    assert envelope["Subject"].endswith("2026-11-20: NOT VERIFIED")
    assert envelope["MessageAttributes"]["verified"]["Value"] == "false"


def test_a_report_of_a_day_far_from_the_trails_start_reads_only_its_window(
    handler: ModuleType, fabric: Fabric, aws: dict[str, Any]
) -> None:
    # Damage far before the period (the trail's first hour): the period's report does not read
    # it, its own day's report does; runbook.py verify checks the whole trail. (The trail ends at
    # 03:00 on Nov 21: its first two hours are what the checkpoint of 03:00 seals.)
    store = S3ObjectStore(AUDIT_BUCKET, lambda: aws["s3"])
    first = store.keys(f"audit/{WRITER}/2026/11/19/")[0]
    store.put(first, b"{}\n")
    period = {"start": "2026-11-21T00:00:00Z", "end": "2026-11-21T02:00:00Z"}
    assert handler.handler(period, None)["verified"] is True
    day_before = handler.handler({"date": "2026-11-19"}, None)
    assert day_before["verified"] is False
    assert day_before["problem"].startswith(first)


RETIRED = "fabric-test-audit-writer-old"


def test_a_deleted_object_is_named_although_its_writer_stopped_sealing_before_it(
    aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A writer rename on Nov 20 at noon: the old writer sealed hourly until 12:00 and wrote once
    # more at 12:30, the new one seals from then on. A plain DeleteObject on the old writer's
    # last object succeeds under Object Lock (a delete marker; the locked version stays), and
    # nothing of the old writer is listed after its last checkpoint any more.
    old, new = Fabric(aws, RETIRED), Fabric(aws)
    for hour in range(13):
        old.hour(DAY - timedelta(hours=1) + timedelta(hours=hour))
    tail = old.write(
        DAY + timedelta(hours=12, minutes=30),
        [record(AuditEvent.REJECTED, DAY + timedelta(hours=12, minutes=30), "bad-tail")],
    )
    for hour in range(15):
        new.hour(DAY + timedelta(hours=12 + hour))
    monkeypatch.setenv("FABRIC_ENV", "test")
    for name, value in {
        "AUDIT_BUCKET": AUDIT_BUCKET,
        "AUDIT_WRITERS": f"{RETIRED},{WRITER}",
        "SIGNING_KEY_ARN": aws["signer"].key_id,
        "REPORTS_BUCKET": REPORTS_BUCKET,
        "REPORTS_KEY_ARN": aws["audit_key"],
        "COMPLIANCE_TOPIC_ARN": aws["topic"],
    }.items():
        monkeypatch.setenv(name, value)
    handler = load_handler("compliance_report", monkeypatch)
    assert handler.handler({"date": "2026-11-20"}, None)["verified"] is False  # the tail

    deleted = aws["s3"].delete_object(Bucket=AUDIT_BUCKET, Key=tail)
    assert deleted["DeleteMarker"] is True
    summary = handler.handler({"date": "2026-11-20"}, None)

    assert summary["verified"] is False
    assert summary["problem"] == (
        f"{tail}: deleted after it was written (a delete marker among its versions)"
    )
    report = json.loads(read(aws, summary["report"]["json"]))
    assert report["verification"]["problem"] == summary["problem"]


def test_a_deleted_checkpoint_is_named_through_the_windows_closing_one(
    handler: ModuleType, fabric: Fabric, aws: dict[str, Any]
) -> None:
    # Nov 20's window closes at Nov 21 01:00 (the first checkpoint at or after the end and
    # margin). The trail's last checkpoint (03:00) is Nov 21's: its delete marker, which the
    # bucket policy will not let anyone remove, must not fail Nov 20 for good. A hidden closing
    # checkpoint makes 02:00 close the window: its key sorts before that, so it is named.
    store = S3ObjectStore(AUDIT_BUCKET, lambda: aws["s3"])
    *_, closing, _, last = store.keys(f"checkpoints/{WRITER}/")
    assert json.loads(store.get(closing))["at"] == "2026-11-21T01:00:00Z"
    aws["s3"].delete_object(Bucket=AUDIT_BUCKET, Key=last)
    assert handler.handler({"date": "2026-11-20"}, None)["verified"] is True

    aws["s3"].delete_object(Bucket=AUDIT_BUCKET, Key=closing)

    summary = handler.handler({"date": "2026-11-20"}, None)
    assert summary["problem"] == (
        f"{closing}: deleted after it was written (a delete marker among its versions)"
    )


class _StateUpdateFails(DynamoDbChainStore):
    """The chain table, whose next state update after an object was stored times out once
    ``failures`` is set."""

    failures = 0

    def save(self, writer: str, state: Any, *, batch_ids: Any) -> bool:
        if batch_ids and self.failures:
            self.failures -= 1
            raise TransportUnavailable("the state update timed out")
        return super().save(writer, state, batch_ids=batch_ids)


def test_a_write_retried_under_the_same_key_leaves_two_versions_and_verifies(
    handler: ModuleType, aws: dict[str, Any]
) -> None:
    # The writer puts the same key again when it retries a write whose state update failed:
    # versions that are not current are the writer's own, not tampering (no delete marker).
    chains = _StateUpdateFails(TABLE, lambda: aws["dynamodb"])
    fabric = Fabric(aws, chains=chains)
    fabric.hour(DAY - timedelta(hours=1))
    at = DAY + timedelta(minutes=5)
    batch = [("retried", AuditBatch([record(AuditEvent.REJECTED, at, "bad-retried")]))]
    fabric.clock, chains.failures = at, 1
    with pytest.raises(TransportUnavailable):
        fabric.writer.write(batch)
    key = fabric.writer.write(batch).key
    versions = aws["s3"].list_object_versions(Bucket=AUDIT_BUCKET, Prefix=key)["Versions"]
    assert len(versions) == 2
    for hour in range(26):
        fabric.hour(DAY + timedelta(hours=hour))

    summary = handler.handler({"date": "2026-11-20"}, None)
    assert (summary["verified"], summary["problem"]) == (True, None)
    assert summary["rejected"] == 24 + 1


@pytest.fixture
def prod_handler(aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The function as production configures it (``FABRIC_ENV=prod``)."""
    for name, value in {
        "FABRIC_ENV": "prod",
        "AUDIT_BUCKET": AUDIT_BUCKET,
        "AUDIT_WRITERS": WRITER,
        "SIGNING_KEY_ARN": aws["signer"].key_id,
        "REPORTS_BUCKET": REPORTS_BUCKET,
        "REPORTS_KEY_ARN": aws["audit_key"],
        "COMPLIANCE_TOPIC_ARN": aws["topic"],
    }.items():
        monkeypatch.setenv(name, value)
    return load_handler("compliance_report", monkeypatch)


def test_in_production_the_stacks_compliance_lock_verifies(
    prod_handler: ModuleType, fabric: Fabric, aws: dict[str, Any]
) -> None:
    summary = prod_handler.handler({"date": "2026-11-20"}, None)
    assert (summary["verified"], summary["noncompliant_objects"]) == (True, 0)
    report = json.loads(read(aws, summary["report"]["json"]))
    assert report["object_lock"]["required"] == {"mode": "COMPLIANCE", "retention_days": 2555}


def test_in_production_objects_stored_under_governance_fail_the_report(
    prod_handler: ModuleType, aws: dict[str, Any]
) -> None:
    # A bucket deployed with staging's lock mode: seven years, but GOVERNANCE (a role allowed
    # s3:BypassGovernanceRetention could delete the trail).
    aws["s3"].put_object_lock_configuration(
        Bucket=AUDIT_BUCKET,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Years": 7}},
        },
    )
    fabric = Fabric(aws)
    start = DAY - timedelta(hours=1)
    for hour in range(28):
        fabric.hour(start + timedelta(hours=hour))

    summary = prod_handler.handler({"date": "2026-11-20"}, None)

    assert summary["verified"] is False
    assert summary["problem"].endswith(": Object Lock GOVERNANCE, COMPLIANCE required")
    report = json.loads(read(aws, summary["report"]["json"]))
    lock = report["object_lock"]
    assert lock["modes"] == {"GOVERNANCE": lock["objects"]}
    assert lock["noncompliant"] == summary["noncompliant_objects"] == lock["objects"]
    (writer,) = report["verification"]["writers"]
    assert writer["problem"] is None, "the trail itself is authentic"
    (envelope,) = summaries(aws)
    assert envelope["Subject"].endswith("2026-11-20: NOT VERIFIED")
