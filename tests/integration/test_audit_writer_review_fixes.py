"""The audit writer after review (rev-audit), on moto: a chain state behind the trail (the chain
item restored to an earlier point, or lost) or a second writer never stores a new version over
what the trail holds, while a conditional write whose answer was lost is not taken for one, and
the runbook's rebuild holds also when the state behind wrote past the tail; a refused batch is
counted even when the checkpoint its write makes fails; two groups' identical bytes are two
batches; ``data`` that is not base64 is hashed as it came."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import pytest
from botocore.exceptions import ConnectionClosedError, ConnectTimeoutError

from fabric.adapters.audit_storage import DynamoDbChainStore, S3ObjectStore
from fabric.audit import AuditEvent
from fabric.audit_chain import decode_object, record_hash
from fabric.audit_writer import AuditWriter, ChainBehindTrail, ChainState
from fabric.bootstrap import _writer_client
from fabric.envelope import new_message_id
from fabric.errors import FabricError, TransportUnavailable
from fabric.stakeholders import Stakeholder
from fabric.topology import user_name
from tests.integration.test_audit_writer import (  # noqa: F401 (aws_audit: the fixture)
    BUCKET,
    TABLE,
    WRITER,
    aws_audit,
    batch,
    read_trail,
    writer,
)
from tests.integration.test_audit_writer_handler import (  # noqa: F401 (handler: the fixture)
    M1,
    amazon_mq,
    body,
    handler,
)
from tests.integration.test_audit_writer_handler import WRITER as FUNCTION_WRITER


def chain_item(aws: dict[str, Any], name: str = WRITER) -> dict[str, Any]:
    """The writer's chain item as DynamoDB holds it (what point-in-time recovery brings back)."""
    key = {"id": {"S": f"audit-chain#{name}"}}
    return dict(aws["dynamodb"].get_item(TableName=TABLE, Key=key)["Item"])


def restore(aws: dict[str, Any], item: dict[str, Any]) -> None:
    """The chain item put back as it was at an earlier point (a table restored, or rolled back)."""
    aws["dynamodb"].put_item(TableName=TABLE, Item=item)


def versions(aws: dict[str, Any], key: str) -> list[bytes]:
    """Every version stored under ``key`` (Object Lock keeps each), oldest first."""
    listed = aws["s3"].list_object_versions(Bucket=BUCKET, Prefix=key).get("Versions", [])
    ordered = sorted((v for v in listed if v["Key"] == key), key=lambda v: v["LastModified"])
    return [
        aws["s3"].get_object(Bucket=BUCKET, Key=key, VersionId=v["VersionId"])["Body"].read()
        for v in ordered
    ]


def only_key(aws: dict[str, Any], prefix: str) -> str:
    (key,) = S3ObjectStore(BUCKET, lambda: aws["s3"]).keys(prefix)
    return key


def test_a_restored_chain_item_fails_the_checkpoint_instead_of_sealing_its_number_again(
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    audit = writer(aws_audit)
    audit.write([batch("b1", 2)])
    audit.checkpoint()
    earlier = chain_item(aws_audit)
    audit.write([batch("b2", 2)])
    sealed = audit.checkpoint()  # checkpoint 2 seals b2
    restore(aws_audit, earlier)
    audit.write([batch("b3", 1)])  # a key the trail does not hold: nothing tells yet

    with pytest.raises(ChainBehindTrail, match="behind the trail"):
        audit.checkpoint()  # checkpoint 2 again: the bucket holds it

    assert len(versions(aws_audit, sealed)) == 1  # the sealed checkpoint is as it was
    state = DynamoDbChainStore(TABLE, lambda: aws_audit["dynamodb"]).load(WRITER)
    assert (state.checkpoints, state.sealing) == (1, None)  # saved back: a retry refuses too
    with pytest.raises(ChainBehindTrail):
        audit.checkpoint()
    assert len(versions(aws_audit, sealed)) == 1


def test_a_restored_chain_item_fails_a_write_whose_key_the_trail_holds_and_its_retries(
    handler: ModuleType,  # noqa: F811
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    handler.WRITER._now = lambda: datetime(2026, 12, 3, 12, tzinfo=UTC)  # one day's keys
    first = handler.handler(amazon_mq(("b1", body(new_message_id(), new_message_id()))), None)
    earlier = chain_item(aws_audit, FUNCTION_WRITER)
    second = handler.handler(amazon_mq(("b2", body(new_message_id(), new_message_id()))), None)
    restore(aws_audit, earlier)
    event = amazon_mq(("b3", body(new_message_id(), new_message_id())))  # same size: same key

    with pytest.raises(ChainBehindTrail):
        handler.handler(event, None)  # the invocation fails: AuditWriterErrors
    with pytest.raises(ChainBehindTrail):
        handler.handler(event, None)  # the event source's retry: still nothing stored over it

    assert [first["records"], second["records"]] == [2, 2]
    assert len(versions(aws_audit, second["object"])) == 1
    records = decode_object(versions(aws_audit, second["object"])[0])
    assert {r["batch"] for r in records} == {"b2"}
    # b3 is not marked written: once the state is rebuilt, its redelivery is written.
    chains = DynamoDbChainStore(TABLE, lambda: aws_audit["dynamodb"])
    assert chains.written(["b2", "b3"]) == {"b2"}


def test_two_writers_on_one_chain_cannot_put_a_version_over_the_winners_object(
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # Writer A saves its intent; B loads it, abandons it and writes the same key (the same
    # count of records on the same day), and A's put reaches S3 only after B's whole write.
    # Before, A's bytes became the key's newest version while the chain named B's: the trail
    # could never verify again.
    class LateStore(S3ObjectStore):
        """Writer A's bucket: its object reaches S3 after writer B's whole write."""

        raced = False

        def race(self, key: str) -> None:
            if key.startswith("audit/") and not self.raced:
                self.raced = True
                writer(aws_audit).write([batch("b-batch", 2)])

        def put(self, key: str, data: bytes) -> None:
            self.race(key)
            super().put(key, data)

        def create(self, key: str, data: bytes) -> bool:
            self.race(key)
            return super().create(key, data)

    a = AuditWriter(
        WRITER,
        chains=DynamoDbChainStore(TABLE, lambda: aws_audit["dynamodb"]),
        objects=LateStore(BUCKET, lambda: aws_audit["s3"]),
        signer=aws_audit["signer"],
    )
    with pytest.raises(FabricError) as refused:
        a.write([batch("a-batch", 2)])
    writer(aws_audit).checkpoint()

    key = only_key(aws_audit, f"audit/{WRITER}/")
    (stored,) = versions(aws_audit, key)
    assert {r["batch"] for r in decode_object(stored)} == {"b-batch"}
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert isinstance(refused.value, ChainBehindTrail)  # its batch is written again later


class _SealSaveFailsOnce(DynamoDbChainStore):
    """The state update after a checkpoint was stored fails once (throttling, a timeout)."""

    failures = 1

    def save(self, writer: str, state: ChainState, *, batch_ids: Any) -> bool:
        if self.failures and state.checkpoints > self.load(writer).checkpoints:
            self.failures -= 1
            raise TransportUnavailable("the chain store: ProvisionedThroughputExceeded")
        return super().save(writer, state, batch_ids=batch_ids)


def test_a_checkpoint_retried_after_its_state_update_failed_is_made_again(
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    audit = AuditWriter(
        WRITER,
        chains=_SealSaveFailsOnce(TABLE, lambda: aws_audit["dynamodb"]),
        objects=S3ObjectStore(BUCKET, lambda: aws_audit["s3"]),
        signer=aws_audit["signer"],
    )
    audit.write([batch("b1", 2)])
    with pytest.raises(TransportUnavailable):
        audit.checkpoint()  # stored; the state did not move
    key = audit.checkpoint()  # its own attempt's key: stored again (another time, signature)
    audit.write([batch("b2", 1)])
    audit.checkpoint()

    assert len(versions(aws_audit, key)) == 2
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert (result.records, result.checkpoints) == (3, 2)


class _AuditPutFails(S3ObjectStore):
    """The next ``failures`` audit objects are not stored (S3 throttling)."""

    failures = 0

    def fail(self, key: str) -> None:
        if key.startswith("audit/") and self.failures:
            self.failures -= 1
            raise TransportUnavailable("the audit bucket: SlowDown")

    def put(self, key: str, data: bytes) -> None:
        self.fail(key)
        super().put(key, data)

    def create(self, key: str, data: bytes) -> bool:
        self.fail(key)
        return super().create(key, data)


class _SaveFailsOnce(DynamoDbChainStore):
    """The state update after an object was stored fails once."""

    failures = 0

    def save(self, writer: str, state: ChainState, *, batch_ids: Any) -> bool:
        if batch_ids and self.failures:
            self.failures -= 1
            raise TransportUnavailable("the chain store: ProvisionedThroughputExceeded")
        return super().save(writer, state, batch_ids=batch_ids)


def test_a_key_a_checkpoint_named_abandoned_is_still_the_writers_own_to_write_again(
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # Attempt 1 stores 1-3 (b1, b3) and its state update fails; attempt 2 (b1 alone: 1-2) is
    # not stored; the checkpoint names 1-3 abandoned; attempt 3 carries b3 and b1 in the other
    # order: key 1-3 once more, other bytes. The state still knows 1-3 as its own attempt's
    # (not a trail it is behind), and the new version is the chain's.
    chains = _SaveFailsOnce(TABLE, lambda: aws_audit["dynamodb"])
    store = _AuditPutFails(BUCKET, lambda: aws_audit["s3"])
    audit = AuditWriter(WRITER, chains=chains, objects=store, signer=aws_audit["signer"])
    chains.failures = 1
    with pytest.raises(TransportUnavailable):
        audit.write([batch("b1", 2), batch("b3", 1)])
    store.failures = 1
    with pytest.raises(TransportUnavailable):
        audit.write([batch("b1", 2)])
    audit.checkpoint()
    again = audit.write([batch("b3", 1), batch("b1", 2)])
    audit.checkpoint()

    assert again.key is not None
    assert again.key.endswith("000000000001-000000000003.jsonl")
    assert len(versions(aws_audit, again.key)) == 2
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert result.records == 3


def rebuild(aws: dict[str, Any], last: str, tail: str, strays: list[str]) -> None:
    """docs/runbook.md, "The chain state is behind the trail", done by hand: the state rebuilt
    from the last checkpoint, the unsealed tail after it (here one object), and the objects the
    state behind wrote named abandoned."""
    store = S3ObjectStore(BUCKET, lambda: aws["s3"])
    checkpoint = json.loads(store.get(last))
    tail_records = decode_object(store.get(tail))
    chains = DynamoDbChainStore(TABLE, lambda: aws["dynamodb"])
    rebuilt = ChainState(
        seq=tail_records[-1]["seq"],
        last_hash=record_hash(tail_records[-1]),
        pending=[(tail, hashlib.sha256(store.get(tail)).hexdigest())],
        checkpoints=checkpoint["checkpoint"],
        last_signature=checkpoint["signature"],
        version=chains.load(WRITER).version,
        abandoned=[(key, hashlib.sha256(store.get(key)).hexdigest()) for key in strays],
    )
    assert chains.save(WRITER, rebuilt, batch_ids=[])


def test_the_runbooks_rebuild_of_a_chain_state_behind_the_trail_makes_it_verify(
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # docs/runbook.md, "The chain state is behind the trail", done by hand: the state rebuilt
    # from the last checkpoint, the unsealed tail after it, and the objects the state behind
    # wrote named abandoned.
    audit = writer(aws_audit)
    audit.write([batch("b1", 2)])
    audit.checkpoint()
    earlier = chain_item(aws_audit)
    audit.write([batch("b2", 2)])
    last = audit.checkpoint()
    tail = audit.write([batch("b4", 1)]).key  # 5-5, not sealed yet
    restore(aws_audit, earlier)
    orphan = audit.write([batch("b3", 1)]).key  # 3-3: from the state behind
    with pytest.raises(ChainBehindTrail):
        audit.checkpoint()
    assert not read_trail(aws_audit).ok  # 3-3: an object no checkpoint names

    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    assert tail is not None
    assert orphan is not None
    tail_records = decode_object(store.get(tail))
    assert tail_records[0]["prev"] == json.loads(store.get(last))["last_hash"]  # it continues
    rebuild(aws_audit, last, tail, [orphan])
    audit.checkpoint()  # names the tail, and the orphan as abandoned
    audit.write([batch("b5", 1)])
    audit.checkpoint()

    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert result.records == 6  # b1, b2, b4, b5: b3 only in the abandoned object


def test_after_the_rebuild_the_chain_writes_the_key_of_a_stray_past_its_tail(
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # The state behind wrote 3-3, 4-6 and 7-7 before a key collided; the true tail ends at 5.
    # The rebuild's checkpoint names the three abandoned, and the same day the chain comes to
    # 7-7 again. Before, the first write after that checkpoint forgot them, and 7-7 failed with
    # ChainBehindTrail on a rebuilt state: the trail stopped again.
    audit = AuditWriter(
        WRITER,
        chains=DynamoDbChainStore(TABLE, lambda: aws_audit["dynamodb"]),
        objects=S3ObjectStore(BUCKET, lambda: aws_audit["s3"]),
        signer=aws_audit["signer"],
        now=lambda: datetime(2026, 12, 3, 12, tzinfo=UTC),  # one day's keys
    )
    audit.write([batch("b1", 2)])
    audit.checkpoint()
    earlier = chain_item(aws_audit)
    audit.write([batch("b2", 2)])
    last = audit.checkpoint()
    tail = audit.write([batch("b4", 1)]).key  # 5-5, not sealed yet
    restore(aws_audit, earlier)
    strays = [audit.write([batch(name, count)]).key for name, count in (("c1", 1), ("c2", 3))]
    strays.append(audit.write([batch("c3", 1)]).key)
    with pytest.raises(ChainBehindTrail):
        audit.checkpoint()
    assert tail is not None
    assert all(strays)
    rebuild(aws_audit, last, tail, [key for key in strays if key])
    audit.checkpoint()  # names the tail, and the strays as abandoned

    audit.write([batch("d1", 1)])  # 6-6
    past = audit.write([batch("d2", 1)]).key  # 7-7: the key of a stray
    audit.checkpoint()

    assert past == strays[-1]
    assert len(versions(aws_audit, past)) == 2  # the chain's object over the stray's
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert result.records == 7  # b1, b2, b4, d1, d2: the c batches only in abandoned objects


def lose_an_answer(s3: Any, prefix: str) -> None:
    """S3 stores the first conditional PutObject under ``prefix``, and its answer is lost (the
    connection closes): botocore sends the request again, as the writer's client does."""
    lost = {"answers": 1}

    def lose(request: Any, **_: Any) -> None:
        conditional = request.headers.get("If-None-Match") in ("*", b"*")
        if lost["answers"] and conditional and f"/{prefix}" in request.url:
            lost["answers"] -= 1
            raise ConnectionClosedError(endpoint_url=request.url)

    # Registered for the same event as moto's handler, which answers the request (a handler of
    # a narrower event, ``before-send.s3.PutObject``, would run before it): it runs after it,
    # when moto has stored the object.
    s3.meta.events.register("before-send", lose)


def writer_on_its_own_client(aws: dict[str, Any], prefix: str) -> AuditWriter:
    """A writer whose S3 client is configured as in production (``bootstrap``: standard
    retries), and whose first conditional write under ``prefix`` loses its answer."""
    s3 = _writer_client("s3")
    lose_an_answer(s3, prefix)
    return AuditWriter(
        WRITER,
        chains=DynamoDbChainStore(TABLE, lambda: aws["dynamodb"]),
        objects=S3ObjectStore(BUCKET, lambda: s3),
        signer=aws["signer"],
    )


def test_an_object_whose_answer_was_lost_is_the_writers_own_on_the_retry(
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # botocore's own retry of the stored object met 412. Before, the writer took that for a
    # trail ahead of its state: it saved its state back without its intent and failed every
    # redelivery with ChainBehindTrail, a healthy writer stopped until an operator rebuilt it.
    # The key holds this very object (its checksum says so): the write went through.
    audit = writer_on_its_own_client(aws_audit, "audit/")

    written = audit.write([batch("b1", 2)])
    audit.checkpoint()

    assert written.records == 2
    assert written.key is not None
    assert len(versions(aws_audit, written.key)) == 1
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert result.records == 2


def test_a_checkpoint_whose_answer_was_lost_is_the_writers_own_on_the_retry(
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # Before, the checkpoint failed with ChainBehindTrail for good (its sealing saved back
    # away), and writes went on with no checkpoint ever again: the objects awaiting one grew
    # toward the chain item's size limit.
    audit = writer_on_its_own_client(aws_audit, "checkpoints/")
    audit.write([batch("b1", 2)])

    key = audit.checkpoint()
    audit.write([batch("b2", 1)])
    audit.checkpoint()

    assert len(versions(aws_audit, key)) == 1
    state = DynamoDbChainStore(TABLE, lambda: aws_audit["dynamodb"]).load(WRITER)
    assert (state.checkpoints, state.pending, state.sealing) == (2, [], None)
    result = read_trail(aws_audit)
    assert result.ok, result.problem
    assert (result.records, result.checkpoints) == (3, 2)


def emf(out: str, name: str) -> list[Any]:
    return [json.loads(line)[name] for line in out.splitlines() if f'"{name}"' in line]


def test_a_refused_batch_is_counted_when_the_checkpoint_its_write_makes_fails(
    handler: ModuleType,  # noqa: F811
    aws_audit: dict[str, Any],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The 1,000th object since a checkpoint (here every one) makes a checkpoint at once; KMS
    # throttles its signature. Before, the call failed after its marks were saved, and the
    # redelivery found the batch written: AuditBatchesRefused never counted it.
    handler.WRITER._seal_every = 1
    real_sign = handler.WRITER._signer.sign
    throttled = {"signatures": 1}

    def sign(message: bytes) -> bytes:
        if throttled["signatures"]:
            throttled["signatures"] -= 1
            raise TransportUnavailable("KMS: ThrottlingException")
        return real_sign(message)

    handler.WRITER._signer.sign = sign
    document = json.loads(body(M1, event=AuditEvent.DELIVERED))
    document["records"][0]["notes"] = "free text"  # refused: not a field of the toolkit's
    event = amazon_mq(
        (new_message_id(), json.dumps(document).encode()),
        user=user_name(Stakeholder.COMMUNITY),
    )

    written = handler.handler(event, None)
    again = handler.handler(event, None)  # a redelivery all the same
    handler.handler({"checkpoint": True}, None)

    assert (written["refused"], again["duplicate_batches"]) == (1, 1)
    assert emf(capsys.readouterr().out, "AuditBatchesRefused") == [1]
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    assert len(store.keys(f"checkpoints/{FUNCTION_WRITER}/")) == 1


def test_the_same_bytes_from_two_groups_are_two_batches_and_a_redelivery_is_one(
    handler: ModuleType,  # noqa: F811
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    media, community = user_name(Stakeholder.MEDIA), user_name(Stakeholder.COMMUNITY)
    sent = b"{}"  # any batch sent without a fabric message id, by either group
    from_media = amazon_mq(("batch-1", sent), user=media)
    from_community = amazon_mq(("batch-1", sent), user=community)

    first = handler.handler(from_media, None)
    second = handler.handler(from_community, None)
    again = handler.handler(
        {
            "eventSource": "aws:rmq",
            "rmqMessagesByQueue": {
                "fabric.audit::/": [
                    *from_media["rmqMessagesByQueue"]["fabric.audit::/"],
                    *from_community["rmqMessagesByQueue"]["fabric.audit::/"],
                ]
            },
        },
        None,
    )

    assert (first["refused"], second["refused"]) == (1, 1)
    assert (again["records"], again["duplicate_batches"]) == (0, 2)
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    records = [
        r for key in store.keys(f"audit/{FUNCTION_WRITER}/") for r in decode_object(store.get(key))
    ]
    assert sorted(r["publisher"] for r in records) == sorted([media, community])
    assert {r["body_sha256"] for r in records} == {hashlib.sha256(sent).hexdigest()}
    assert len({r["batch"] for r in records}) == 2
    assert all(r["batch"].startswith("sha256-") for r in records)


def test_data_that_is_not_base64_is_hashed_as_it_came(
    handler: ModuleType,  # noqa: F811
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    text = "abcd efgh"  # not base64 (a space): a lenient decoder drops it and decodes the rest
    event = amazon_mq(("", b""), user=user_name(Stakeholder.MEDIA))
    event["rmqMessagesByQueue"]["fabric.audit::/"][0]["data"] = text

    handler.handler(event, None)

    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    (record,) = decode_object(store.get(only_key(aws_audit, f"audit/{FUNCTION_WRITER}/")))
    assert (record["event"], record["body_sha256"]) == (
        "unreadable-batch",
        hashlib.sha256(text.encode()).hexdigest(),
    )


def test_a_412_to_a_retry_whose_first_attempt_never_reached_s3_is_the_trails_object(
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # A chain item restored to before b2, whose object is sealed; the restored writer's first
    # conditional put of that key times out before it reaches S3, and botocore's retry meets
    # 412. The key holds the trail's object, not this one: ChainBehindTrail, nothing stored
    # over it (taken for its own lost answer, the redelivery stored a new version over it).
    def at_noon() -> datetime:
        return datetime(2026, 12, 3, 12, tzinfo=UTC)

    def writer(s3: Any) -> AuditWriter:
        return AuditWriter(
            WRITER,
            chains=DynamoDbChainStore(TABLE, lambda: aws_audit["dynamodb"]),
            objects=S3ObjectStore(BUCKET, lambda: s3),
            signer=aws_audit["signer"],
            now=at_noon,
        )

    healthy = writer(aws_audit["s3"])
    healthy.write([batch("b1", 2)])
    healthy.checkpoint()
    earlier = chain_item(aws_audit)
    sealed = healthy.write([batch("b2", 2)]).key
    assert sealed is not None
    healthy.checkpoint()
    restore(aws_audit, earlier)

    s3 = _writer_client("s3")
    unsent = [1]

    def never_sent(request: Any, **_: Any) -> None:
        if unsent and "/audit/" in request.url and request.headers.get("If-None-Match"):
            unsent.pop()
            raise ConnectTimeoutError(endpoint_url=request.url)

    s3.meta.events.register("before-send.s3.PutObject", never_sent)
    behind = writer(s3)
    for _ in range(2):  # and the event source's retry
        with pytest.raises(ChainBehindTrail):
            behind.write([batch("b3", 2)])

    assert len(versions(aws_audit, sealed)) == 1
    result = read_trail(aws_audit)
    assert result.ok, result.problem
