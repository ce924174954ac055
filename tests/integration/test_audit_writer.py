"""The audit writer on moto: an Object Lock bucket, the idempotency table, a KMS signing key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from fabric.adapters.audit_storage import DynamoDbChainStore, S3ObjectStore
from fabric.adapters.kms_signer import KmsSigner
from fabric.audit import (
    AuditBatch,
    AuditEvent,
    AuditRecord,
    decode_audit_batch,
    encode_audit_batch,
)
from fabric.audit_chain import Keyring, decode_object, verify_intervals, verify_trail
from fabric.audit_writer import AuditWriter, ChainConflict, decode_archive
from fabric.errors import TransportUnavailable
from tests.integration.aws_audit import create_audit_bucket, create_idempotency_table
from tests.integration.aws_fallback import REGION

BUCKET = "fabric-test-audit"
TABLE = "fabric-test-idempotency"
WRITER = "writer-a"


@pytest.fixture
def aws_audit(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "moto",
        "AWS_SECRET_ACCESS_KEY": "moto",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        create_audit_bucket(s3, BUCKET)
        dynamodb = boto3.client("dynamodb", region_name=REGION)
        create_idempotency_table(dynamodb, TABLE)
        kms = boto3.client("kms", region_name=REGION)
        key = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]
        yield {"s3": s3, "dynamodb": dynamodb, "signer": KmsSigner(key["Arn"], lambda: kms)}


def writer(aws: dict[str, Any]) -> AuditWriter:
    return AuditWriter(
        WRITER,
        chains=DynamoDbChainStore(TABLE, lambda: aws["dynamodb"]),
        objects=S3ObjectStore(BUCKET, lambda: aws["s3"]),
        signer=aws["signer"],
    )


def batch(batch_id: str, count: int) -> tuple[str, AuditBatch]:
    return batch_id, AuditBatch(
        [
            {"event": "rejected", "message_id": f"{batch_id}-{i}", "source": "router"}
            for i in range(count)
        ]
    )


def read_trail(aws: dict[str, Any]) -> Any:
    """The trail verified at once; ``runbook verify``'s way, interval by interval, must find
    the same."""
    store = S3ObjectStore(BUCKET, lambda: aws["s3"])
    objects = {key: store.get(key) for key in store.keys(f"audit/{WRITER}/")}
    checkpoints = [
        (key, json.loads(store.get(key))) for key in store.keys(f"checkpoints/{WRITER}/")
    ]
    result = verify_trail(
        objects=objects, checkpoints=checkpoints, keys=Keyring([aws["signer"]]), writer=WRITER
    )
    by_interval = verify_intervals(
        object_keys=store.keys(f"audit/{WRITER}/"),
        checkpoint_keys=store.keys(f"checkpoints/{WRITER}/"),
        read=store.read,
        keys=Keyring([aws["signer"]]),
        writer=WRITER,
    )
    assert by_interval.problem == result.problem
    if result.ok:
        counts = (result.records, result.objects, result.checkpoints)
        assert (by_interval.records, by_interval.objects, by_interval.checkpoints) == counts
    return result


def test_one_object_per_call_chained_and_sealed(aws_audit: dict[str, Any]) -> None:
    audit = writer(aws_audit)
    first = audit.write([batch("b1", 3), batch("b2", 2)])
    second = audit.write([batch("b3", 4)])
    audit.checkpoint()

    assert (first.records, second.records) == (5, 4)
    assert first.key is not None
    assert first.key.endswith("000000000001-000000000005.jsonl")
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert (result.records, result.objects, result.checkpoints) == (9, 2, 1)


def test_ninety_nine_batches_are_one_write_and_a_hundred_are_refused_before_anything_is_stored(
    aws_audit: dict[str, Any],
) -> None:
    audit = writer(aws_audit)
    written = audit.write([batch(f"b{i}", 1) for i in range(99)])
    assert written.records == 99
    with pytest.raises(ValueError, match="at most 99"):
        audit.write([batch(f"c{i}", 1) for i in range(100)])
    audit.checkpoint()
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert (result.records, result.objects) == (99, 1)


def test_a_checkpoint_is_made_every_n_objects_so_the_pending_list_stays_bounded(
    aws_audit: dict[str, Any],
) -> None:
    audit = AuditWriter(
        WRITER,
        chains=DynamoDbChainStore(TABLE, lambda: aws_audit["dynamodb"]),
        objects=S3ObjectStore(BUCKET, lambda: aws_audit["s3"]),
        signer=aws_audit["signer"],
        seal_every=3,
    )
    for i in range(7):
        audit.write([batch(f"b{i}", 2)])
    state = DynamoDbChainStore(TABLE, lambda: aws_audit["dynamodb"]).load(WRITER)

    assert (state.checkpoints, len(state.pending)) == (2, 1)
    audit.checkpoint()
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert (result.records, result.objects, result.checkpoints) == (14, 7, 3)


class _SaveFailsOnce(DynamoDbChainStore):
    """The state update after an object was stored fails once (throttling, a timeout)."""

    failures = 1

    def save(self, writer: str, state: Any, *, batch_ids: Any) -> bool:
        if batch_ids and self.failures:
            self.failures -= 1
            raise TransportUnavailable("the chain store: ProvisionedThroughputExceeded")
        return super().save(writer, state, batch_ids=batch_ids)


def test_a_write_retried_with_other_batches_names_its_first_attempt_and_still_verifies(
    aws_audit: dict[str, Any],
) -> None:
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    audit = AuditWriter(
        WRITER,
        chains=_SaveFailsOnce(TABLE, lambda: aws_audit["dynamodb"]),
        objects=store,
        signer=aws_audit["signer"],
    )
    with pytest.raises(TransportUnavailable):
        audit.write([batch("b1", 3), batch("b2", 2)])  # stored, but the chain did not move
    first_attempt = store.keys(f"audit/{WRITER}/")
    # The event source regroups: the retry carries other batches, so another key.
    retried = audit.write([batch("b2", 2), batch("b3", 1)])
    audit.write([batch("b1", 3)])

    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert result.records == 6  # b2, b3, b1 once each: the abandoned attempt is not chained
    (abandoned,) = first_attempt
    assert retried.key != abandoned
    checkpoint = json.loads(store.get(f"checkpoints/{WRITER}/00000001.json"))
    assert [item["key"] for item in checkpoint["abandoned"]] == [abandoned]
    assert checkpoint["abandoned"][0]["sha256"] == hashlib.sha256(store.get(abandoned)).hexdigest()

    forged = abandoned.replace("000000000001-000000000005", "000000000001-000000000004")
    store.put(forged, store.get(abandoned))  # an unnamed object is still found
    problem = read_trail(aws_audit).problem
    assert problem is not None
    assert problem.where.startswith(forged)


def test_a_key_abandoned_once_and_written_again_by_a_later_attempt_is_the_chains(
    aws_audit: dict[str, Any],
) -> None:
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    chains = _SaveFailsOnce(TABLE, lambda: aws_audit["dynamodb"])
    chains.failures = 2
    audit = AuditWriter(WRITER, chains=chains, objects=store, signer=aws_audit["signer"])
    with pytest.raises(TransportUnavailable):
        audit.write([batch("b1", 3), batch("b2", 2)])  # key 1-5, state not saved
    with pytest.raises(TransportUnavailable):
        audit.write([batch("b2", 2), batch("b3", 1)])  # key 1-3: 1-5 abandoned
    again = audit.write([batch("b1", 3), batch("b2", 2)])  # key 1-5 once more: the chain's
    audit.checkpoint()

    assert again.key is not None
    assert again.key.endswith("000000000001-000000000005.jsonl")
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert result.records == 5
    checkpoints = [json.loads(store.get(k)) for k in store.keys(f"checkpoints/{WRITER}/")]
    abandoned = [item["key"] for c in checkpoints for item in c.get("abandoned", [])]
    assert [k.rsplit("/", 1)[-1] for k in abandoned] == ["000000000001-000000000003.jsonl"]


def test_a_redelivered_batch_is_written_once(aws_audit: dict[str, Any]) -> None:
    audit = writer(aws_audit)
    audit.write([batch("b1", 3)])
    again = writer(aws_audit).write([batch("b1", 3), batch("b2", 1)])

    assert (again.records, again.duplicate_batches) == (1, 1)
    audit.checkpoint()
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert result.records == 4


def test_a_quiet_hour_still_gets_a_checkpoint(aws_audit: dict[str, Any]) -> None:
    audit = writer(aws_audit)
    audit.write([batch("b1", 1)])
    audit.checkpoint()
    audit.checkpoint()  # nothing happened in between
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert result.checkpoints == 2


def test_two_writers_on_one_chain_conflict_instead_of_forking_it(aws_audit: dict[str, Any]) -> None:
    class Slow(DynamoDbChainStore):
        """Loads, then lets the other writer go first."""

        def load(self, name: str) -> Any:
            state = super().load(name)
            if not hasattr(self, "raced"):
                self.raced = True
                writer(aws_audit).write([batch("other", 1)])
            return state

    racer = AuditWriter(
        WRITER,
        chains=Slow(TABLE, lambda: aws_audit["dynamodb"]),
        objects=S3ObjectStore(BUCKET, lambda: aws_audit["s3"]),
        signer=aws_audit["signer"],
    )
    with pytest.raises(ChainConflict):
        racer.write([batch("mine", 1)])


def test_the_bodies_a_batch_carries_are_archived_beside_its_records(
    aws_audit: dict[str, Any],
) -> None:
    wire = b'{"message_id":"m-1","payload":{"sealed":"ciphertext"}}'
    digest = hashlib.sha256(wire).hexdigest()
    stray = b"a body no record names"
    records: list[dict[str, object]] = [
        {"event": "accepted", "message_id": "m-1", "body_sha256": digest}
    ]
    carried = AuditBatch(records, {digest: wire, hashlib.sha256(stray).hexdigest(): stray})

    written = writer(aws_audit).write([("b1", carried)])

    assert written.key is not None
    assert written.archived == 1
    archive_key = "archive/" + written.key.removeprefix("audit/")
    stored = aws_audit["s3"].get_object(Bucket=BUCKET, Key=archive_key)["Body"].read()
    assert decode_archive(stored) == {digest: wire}  # only what a record's hash names
    # The archive is written before the records, and locked like them.
    head = aws_audit["s3"].head_object(Bucket=BUCKET, Key=archive_key)
    assert head["ObjectLockMode"] == "COMPLIANCE"


def test_a_body_that_does_not_match_its_hash_is_not_archived() -> None:
    wire = b"the stored bytes"
    forged = encode_audit_batch(
        [
            AuditRecord(
                event=AuditEvent.ACCEPTED,
                at=datetime(2026, 12, 3, tzinfo=UTC),
                message_id="m-1",
                source="router",
                body_sha256=hashlib.sha256(wire).hexdigest(),
            )
        ],
        emitted_by="router",
        bodies={hashlib.sha256(wire).hexdigest(): b"other bytes"},
    )
    assert decode_audit_batch(forged).bodies == {}


def test_a_locked_object_version_cannot_be_deleted(aws_audit: dict[str, Any]) -> None:
    written = writer(aws_audit).write([batch("b1", 2)])
    s3 = aws_audit["s3"]
    version = s3.head_object(Bucket=BUCKET, Key=written.key)["VersionId"]
    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=BUCKET, Key=written.key, VersionId=version)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    body = s3.get_object(Bucket=BUCKET, Key=written.key)["Body"].read()
    assert len(decode_object(body)) == 2


def test_the_runbook_verifies_the_trail_and_names_an_overwritten_object(
    aws_audit: dict[str, Any],
) -> None:
    import io

    from scripts import runbook

    audit = writer(aws_audit)
    written = audit.write([batch("b1", 3)])
    audit.write([batch("b2", 2)])
    audit.checkpoint()
    kms = aws_audit["signer"]._kms()
    clients = {"s3": aws_audit["s3"], "kms": kms}.__getitem__

    def run() -> tuple[int, str]:
        out = io.StringIO()
        status = runbook.verify(
            bucket=BUCKET,
            signing_keys=[aws_audit["signer"].key_id],
            writer=WRITER,
            client=clients,
            out=out,
        )
        return status, out.getvalue()

    assert run() == (
        0,
        f"reading 2 objects of {WRITER} from s3://{BUCKET} ...\n"
        "5 records, 2 objects, 1 checkpoints\n"
        "verified: signatures, chains, Merkle roots and sequence all hold\n",
    )
    # Object Lock keeps every version, but a new version can still be put over a key.
    original = aws_audit["s3"].get_object(Bucket=BUCKET, Key=written.key)["Body"].read()
    aws_audit["s3"].put_object(
        Bucket=BUCKET, Key=written.key, Body=original.replace(b"b1-0", b"b1-X")
    )
    status, output = run()
    assert status == 1
    assert f"NOT VERIFIED: {written.key}: its SHA-256 differs from the checkpoint's" in output


def test_the_runbook_does_not_call_an_empty_or_mistyped_trail_verified(
    aws_audit: dict[str, Any],
) -> None:
    import io

    from scripts import runbook

    writer(aws_audit).write([batch("b1", 3)])
    out = io.StringIO()
    status = runbook.verify(
        bucket=BUCKET,
        signing_keys=[aws_audit["signer"].key_id],
        writer=WRITER + "-typo",
        client={"s3": aws_audit["s3"], "kms": aws_audit["signer"]._kms()}.__getitem__,
        out=out,
    )
    assert status == 1
    assert f"NOT VERIFIED: no trail under audit/{WRITER}-typo/ in s3://{BUCKET}" in out.getvalue()


class _AuditPutFailsOnce(S3ObjectStore):
    """The put of the next audit object fails (the archive put before it went through)."""

    failures = 0

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("audit/") and self.failures:
            self.failures -= 1
            raise TransportUnavailable("the audit bucket: SlowDown")
        super().put(key, data)


def test_a_retry_under_the_same_key_that_fails_before_its_put_leaves_a_trail_that_verifies(
    aws_audit: dict[str, Any],
) -> None:
    # Attempt 1 stores 1-5, its state update fails; attempt 2 (regrouped: other records, the
    # same count) gets key 1-5 too, and its put fails, so S3 still holds attempt 1's bytes;
    # attempt 3 writes 1-3. Before, the checkpoint named 1-5 with attempt 2's hash: the trail
    # could never verify again (the objects are locked).
    chains = _SaveFailsOnce(TABLE, lambda: aws_audit["dynamodb"])
    store = _AuditPutFailsOnce(BUCKET, lambda: aws_audit["s3"])
    audit = AuditWriter(WRITER, chains=chains, objects=store, signer=aws_audit["signer"])
    with pytest.raises(TransportUnavailable):
        audit.write([batch("b1", 3), batch("b2", 2)])
    store.failures = 1
    with pytest.raises(TransportUnavailable):
        audit.write([batch("b2", 2), batch("b3", 3)])
    audit.write([batch("b1", 3)])
    audit.write([batch("b2", 2)])
    audit.write([batch("b3", 3)])
    audit.checkpoint()

    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert result.records == 8  # b1, b2, b3 once each


class _SignerFailsOnce:
    """KMS throttles the next signature."""

    def __init__(self, inner: KmsSigner) -> None:
        self.inner, self.key_id, self.failures = inner, inner.key_id, 0

    def sign(self, message: bytes) -> bytes:
        if self.failures:
            self.failures -= 1
            raise TransportUnavailable("KMS: ThrottlingException")
        return self.inner.sign(message)

    def verify(self, message: bytes, signature: bytes) -> bool:
        return self.inner.verify(message, signature)


def test_a_redelivery_of_written_batches_makes_the_checkpoint_an_abandoned_attempt_needs(
    aws_audit: dict[str, Any],
) -> None:
    # The write that abandons an attempt seals at once; that checkpoint failed, and the event
    # source redelivers batches that are all written. Before, nothing sealed the abandoned
    # object until the hourly checkpoint, and the trail read as forged meanwhile.
    signer = _SignerFailsOnce(aws_audit["signer"])
    chains = _SaveFailsOnce(TABLE, lambda: aws_audit["dynamodb"])
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    audit = AuditWriter(WRITER, chains=chains, objects=store, signer=signer)
    with pytest.raises(TransportUnavailable):
        audit.write([batch("b1", 3), batch("b2", 2)])
    signer.failures = 1
    # Written; its checkpoint is not (made best effort: the call does not fail for it).
    audit.write([batch("b2", 2), batch("b3", 1)])
    again = audit.write([batch("b2", 2), batch("b3", 1)])

    assert (again.key, again.duplicate_batches) == (None, 2)
    assert store.keys(f"checkpoints/{WRITER}/") == [f"checkpoints/{WRITER}/00000001.json"]
    result = read_trail(aws_audit)
    assert result.ok, result.problem


def test_a_write_whose_clock_stepped_back_past_midnight_still_verifies(
    aws_audit: dict[str, Any],
) -> None:
    # Half a second of clock skew between two Lambda hosts: the later write is keyed on the
    # day before; the chain's order is the sequence in the names, not the day folders.
    times = iter(
        [
            datetime(2026, 12, 6, 0, 0, 0, 400000, tzinfo=UTC),
            datetime(2026, 12, 5, 23, 59, 59, 900000, tzinfo=UTC),
            datetime(2026, 12, 6, 0, 1, tzinfo=UTC),
        ]
    )
    audit = AuditWriter(
        WRITER,
        chains=DynamoDbChainStore(TABLE, lambda: aws_audit["dynamodb"]),
        objects=S3ObjectStore(BUCKET, lambda: aws_audit["s3"]),
        signer=aws_audit["signer"],
        now=lambda: next(times),
    )
    first, second = audit.write([batch("b1", 1)]), audit.write([batch("b2", 1)])
    audit.checkpoint()

    assert first.key is not None
    assert "/2026/12/06/" in first.key
    assert second.key is not None
    assert "/2026/12/05/" in second.key
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert result.records == 2
