"""Tamper drills on a 10,000-record audit trail, signed with an asymmetric key in moto's KMS."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any, cast

import boto3
import pytest
from moto import mock_aws

from fabric.adapters.kms_signer import KmsSigner
from fabric.audit_chain import (
    Chain,
    Keyring,
    Verification,
    canonical,
    decode_object,
    encode_object,
    make_checkpoint,
    merkle_root,
    verify_intervals,
    verify_trail,
)
from tests.integration.aws_fallback import REGION

WRITER = "audit-writer-1"
PER_OBJECT = 100
OBJECTS_PER_CHECKPOINT = 10
Trail = tuple[dict[str, bytes], list[tuple[str, dict[str, Any]]]]


@pytest.fixture(scope="module")
def signer() -> Iterator[KmsSigner]:
    with mock_aws():
        kms = boto3.client(
            "kms",
            region_name=REGION,
            aws_access_key_id="moto",
            aws_secret_access_key="moto",  # noqa: S106 - moto's fake credentials
        )
        key = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]
        yield KmsSigner(key["Arn"], lambda: kms)


def object_key(index: int) -> str:
    return f"audit/{WRITER}/2026/12/03/{index:06d}.jsonl"


def build_trail(signer: KmsSigner, records: int = 10_000) -> Trail:
    chain = Chain(WRITER)
    objects: dict[str, bytes] = {}
    checkpoints: list[tuple[str, dict[str, Any]]] = []
    pending: list[tuple[str, str]] = []
    for index in range(records // PER_OBJECT):
        # The router's pairs: each message accepted, then routed to its queues.
        batch = chain.link(
            {
                "event": "accepted" if i % 2 == 0 else "routed",
                "message_id": f"m-{(index * PER_OBJECT + i) // 2:05d}",
                "body_sha256": hashlib.sha256(str(i // 2).encode()).hexdigest(),
            }
            for i in range(PER_OBJECT)
        )
        objects[object_key(index)] = encode_object(batch)
        pending.append((object_key(index), hashlib.sha256(objects[object_key(index)]).hexdigest()))
        if len(pending) == OBJECTS_PER_CHECKPOINT:
            previous = checkpoints[-1][1]["signature"] if checkpoints else None
            checkpoint = make_checkpoint(
                writer=WRITER,
                sequence=len(checkpoints) + 1,
                objects=pending,
                last_seq=chain.seq,
                last_hash=chain.last_hash,
                previous_signature=previous,
                at="2026-12-03T12:00:00Z",
                signer=signer,
            )
            checkpoints.append(
                (f"checkpoints/{WRITER}/{len(checkpoints) + 1:06d}.json", checkpoint)
            )
            pending = []
    return objects, checkpoints


Verify = Callable[[KmsSigner, Trail], Verification]


def whole(signer: KmsSigner, trail: Trail) -> Verification:
    """The trail read at once (the compliance report's window)."""
    objects, checkpoints = trail
    return verify_trail(
        objects=objects, checkpoints=checkpoints, keys=Keyring([signer]), writer=WRITER
    )


def by_interval(signer: KmsSigner, trail: Trail) -> Verification:
    """The trail read one checkpoint's objects at a time, as a bucket holds it (``runbook
    verify``)."""
    objects, checkpoints = trail
    stored = {**objects, **{key: canonical(body) for key, body in checkpoints}}
    return verify_intervals(
        object_keys=sorted(objects),
        checkpoint_keys=[key for key, _ in checkpoints],
        read=stored.get,
        keys=Keyring([signer]),
        writer=WRITER,
    )


@pytest.fixture(params=[whole, by_interval], ids=["whole", "by-interval"])
def verify(request: pytest.FixtureRequest) -> Verify:
    """Each drill against both ways of verifying: they find the same problem."""
    return cast(Verify, request.param)


def rewrite(objects: dict[str, bytes], key: str, change: Any) -> None:
    records = decode_object(objects[key])
    objects[key] = encode_object(change(records))


def test_an_untouched_trail_verifies(signer: KmsSigner, verify: Verify) -> None:
    result = verify(signer, build_trail(signer))
    assert result.ok, result.problem
    assert (result.records, result.objects, result.checkpoints) == (10_000, 100, 10)
    if verify is whole:  # by interval, the ids are not kept: only those with an outcome, hashed
        assert len(result.message_ids["accepted"]) == 5_000
        assert result.message_ids["routed"] == result.message_ids["accepted"]


def test_an_accepted_message_without_an_outcome_is_named(signer: KmsSigner) -> None:
    # Not tampering after the fact: a component lost the routed record before the writer, so
    # the chain is intact, and only the outcome check can tell.
    chain = Chain(WRITER)
    records = chain.link(
        [
            {"event": "accepted", "message_id": "m-1"},
            {"event": "routed", "message_id": "m-1"},
            {"event": "accepted", "message_id": "m-2"},
            {"event": "rejected", "message_id": "m-3", "reason": "invalid_topic"},
        ]
    )
    objects = {object_key(0): encode_object(records)}
    problem = verify_trail(
        objects=objects, checkpoints=[], keys=Keyring([signer]), writer=WRITER
    ).problem
    assert problem is not None
    assert problem.where == f"{object_key(0)} record 3"
    assert problem.why == "an accepted message has no outcome (routed or fallback)"
    assert problem.authentic is False  # incomplete, not forged


def test_one_modified_byte_is_found(signer: KmsSigner, verify: Verify) -> None:
    objects, checkpoints = build_trail(signer)
    key = object_key(37)
    data = bytearray(objects[key])
    data[500] = ord("0") if data[500] != ord("0") else ord("1")
    objects[key] = bytes(data)
    problem = verify(signer, (objects, checkpoints)).problem
    assert problem is not None
    assert (problem.where, problem.why) == (key, "its SHA-256 differs from the checkpoint's")


def test_a_modified_record_after_the_last_checkpoint_breaks_the_chain(
    signer: KmsSigner, verify: Verify
) -> None:
    objects, checkpoints = build_trail(signer)
    del checkpoints[-1]  # the last ten objects are not sealed yet
    key = object_key(95)
    rewrite(objects, key, lambda rs: [rs[0], {**rs[1], "event": "rejected"}, *rs[2:]])
    problem = verify(signer, (objects, checkpoints)).problem
    assert problem is not None
    assert problem.where == f"{key} record {95 * PER_OBJECT + 3}"
    assert "prev hash" in problem.why


@pytest.mark.parametrize(
    ("name", "change", "expected_why"),
    [
        ("deleted record", lambda rs: rs[:10] + rs[11:], "sequence gap"),
        ("swapped records", lambda rs: [*rs[:10], rs[11], rs[10], *rs[12:]], "sequence gap"),
        (
            "forged record",
            lambda rs: [*rs[:10], {**rs[10], "message_id": "forged"}, *rs[10:]],
            "sequence gap",
        ),
    ],
)
def test_record_level_tampering_in_the_unsealed_tail_is_named(
    signer: KmsSigner, verify: Verify, name: str, change: Any, expected_why: str
) -> None:
    objects, checkpoints = build_trail(signer)
    del checkpoints[-1]
    key = object_key(92)
    rewrite(objects, key, change)
    problem = verify(signer, (objects, checkpoints)).problem
    assert problem is not None, name
    assert problem.where.startswith(f"{key} record "), name
    assert expected_why in problem.why or "prev hash" in problem.why, name


@pytest.mark.parametrize(
    "change",
    [lambda rs: rs[:10] + rs[11:], lambda rs: [*rs[:10], rs[11], rs[10], *rs[12:]]],
    ids=["deleted", "swapped"],
)
def test_record_level_tampering_in_a_sealed_object_is_named(
    signer: KmsSigner, verify: Verify, change: Any
) -> None:
    objects, checkpoints = build_trail(signer)
    rewrite(objects, object_key(12), change)
    problem = verify(signer, (objects, checkpoints)).problem
    assert problem is not None
    assert problem.where == object_key(12)


def test_a_truncated_tail_is_found(signer: KmsSigner, verify: Verify) -> None:
    objects, checkpoints = build_trail(signer)
    del objects[object_key(99)]
    problem = verify(signer, (objects, checkpoints)).problem
    assert problem is not None
    assert problem.where == object_key(99)
    assert "missing" in problem.why


def test_truncated_records_of_the_last_object_are_found(signer: KmsSigner, verify: Verify) -> None:
    objects, checkpoints = build_trail(signer)
    rewrite(objects, object_key(99), lambda rs: rs[:50])
    problem = verify(signer, (objects, checkpoints)).problem
    assert problem is not None
    assert problem.where == object_key(99)


def test_a_forged_object_among_sealed_ones_is_found(signer: KmsSigner, verify: Verify) -> None:
    objects, checkpoints = build_trail(signer)
    forged = object_key(40) + ".forged"
    objects[forged] = objects[object_key(40)]
    problem = verify(signer, (objects, checkpoints)).problem
    assert problem is not None
    assert problem.where == forged


def test_a_deleted_checkpoint_is_found(signer: KmsSigner, verify: Verify) -> None:
    objects, checkpoints = build_trail(signer)
    removed = checkpoints.pop(3)
    problem = verify(signer, (objects, checkpoints)).problem
    assert problem is not None
    assert problem.where == checkpoints[3][0]
    assert problem.why == "checkpoint 5, expected 4"
    assert removed[1]["checkpoint"] == 4


def test_a_checkpoint_changed_after_signing_is_found(signer: KmsSigner, verify: Verify) -> None:
    objects, checkpoints = build_trail(signer)
    key, body = checkpoints[2]
    checkpoints[2] = (key, {**body, "last_seq": body["last_seq"] + 1})
    problem = verify(signer, (objects, checkpoints)).problem
    assert problem is not None
    assert (problem.where, problem.why) == (key, "the signature does not match the checkpoint")


def test_merkle_root_follows_rfc_6962() -> None:
    # RFC 6962 §2.1: MTH({}) = SHA-256(); MTH({d0}) = SHA-256(0x00 || d0);
    # MTH(D[n]) = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n])), k the largest power of 2 < n.
    leaf = lambda d: hashlib.sha256(b"\x00" + d).digest()  # noqa: E731
    node = lambda a, b: hashlib.sha256(b"\x01" + a + b).digest()  # noqa: E731
    d = [bytes([i]) for i in range(3)]
    assert merkle_root([]) == hashlib.sha256(b"").hexdigest()
    assert merkle_root(d[:1]) == leaf(d[0]).hex()
    assert merkle_root(d) == node(node(leaf(d[0]), leaf(d[1])), leaf(d[2])).hex()
    assert json.dumps(merkle_root(d))  # a plain hex string


def test_another_writers_checkpoint_in_place_of_this_ones_is_found(
    signer: KmsSigner, verify: Verify
) -> None:
    # Every writer signs with the same key. A young trail's only checkpoint replaced by a new
    # version holding another writer's first one (a quiet hour's: nothing named, no previous
    # signature) passed every check: the objects it sealed read as written after it.
    objects, checkpoints = build_trail(signer, records=1_000)
    other = make_checkpoint(
        writer="audit-writer-2",
        sequence=1,
        objects=[],
        last_seq=0,
        last_hash="0" * 64,
        previous_signature=None,
        at="2026-12-03T12:00:00Z",
        signer=signer,
    )
    ((key, _),) = checkpoints
    result = verify(signer, (objects, [(key, other)]))
    assert not result.ok
    assert result.problem is not None
    assert (result.problem.where, result.problem.why) == (
        key,
        "a checkpoint of 'audit-writer-2', not 'audit-writer-1'",
    )
    # As the anchor of a window too.
    anchored = verify_trail(
        objects={}, checkpoints=[], keys=Keyring([signer]), writer=WRITER, anchor=(key, other)
    )
    assert anchored.problem is not None
    assert anchored.problem.why == "a checkpoint of 'audit-writer-2', not 'audit-writer-1'"


@pytest.mark.parametrize("body", [[], "x", None, 7])
def test_a_checkpoint_that_is_not_an_object_is_named_not_a_crash(
    signer: KmsSigner, body: Any
) -> None:
    objects, checkpoints = build_trail(signer, records=2_000)
    key = checkpoints[1][0]
    problem = verify_trail(
        objects=objects,
        checkpoints=[checkpoints[0], (key, body)],
        keys=Keyring([signer]),
        writer=WRITER,
    ).problem
    assert problem is not None
    assert (problem.where, problem.why) == (key, "not a checkpoint (not a JSON object)")
    # As the anchor of a window too.
    anchored = verify_trail(
        objects={}, checkpoints=[], keys=Keyring([signer]), writer=WRITER, anchor=(key, body)
    )
    assert anchored.problem == problem
