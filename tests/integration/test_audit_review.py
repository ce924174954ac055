"""Audit writer review: what a stakeholder's consumer may publish on fabric.audit (the writer's
Amazon MQ event source) on moto, through the function's own entry point."""

from __future__ import annotations

import base64
import hashlib
import json
from types import ModuleType
from typing import Any

from fabric.adapters.audit_storage import S3ObjectStore
from fabric.audit import AuditEvent
from fabric.audit_chain import decode_object
from fabric.stakeholders import Stakeholder
from fabric.topology import user_name
from tests.integration.test_audit_writer import (  # noqa: F401 (fixture)
    BUCKET,
    aws_audit,
    batch,
    read_trail,
    writer,
)
from tests.integration.test_audit_writer_handler import (  # noqa: F401 (fixture)
    WRITER,
    amazon_mq,
    body,
    handler,
    verified,
)


def test_raw_surrogate_bytes_are_an_unreadable_batch_not_a_stopped_trail(
    handler: ModuleType,  # noqa: F811
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # json.loads reads bytes with "surrogatepass": a lone surrogate as raw UTF-8 bytes (or in a
    # UTF-16 document) passed as a batch, then no record of the call could be encoded, and the
    # whole event, every other component's batch in it, failed on every redelivery.
    template = json.dumps(json.loads(body("m1", event=AuditEvent.DELIVERED)))
    raw = template.replace('"m1"', '"m1\\u0000"').encode().replace(b"\\u0000", b"\xed\xa0\x80")
    utf16 = template.replace('"m1"', '"\\ud800"').encode().decode("unicode_escape")
    wide = utf16.encode("utf-16-le", "surrogatepass")
    consumer = user_name(Stakeholder.COMMUNITY)
    event = amazon_mq(
        ("raw", raw),
        ("wide", wide),
        ("good", body("m2", event=AuditEvent.DELIVERED)),
        user=consumer,
    )

    written = handler.handler(event, None)
    handler.handler({"checkpoint": True}, None)

    assert written["records"] == 3
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    (key,) = store.keys(f"audit/{WRITER}/")
    records = decode_object(store.get(key))
    assert [(r["batch"], r["event"]) for r in records] == [
        ("raw", "unreadable-batch"),
        ("wide", "unreadable-batch"),
        ("good", "delivered"),
    ]
    assert records[0]["body_sha256"] == hashlib.sha256(raw).hexdigest()
    result = verified(store, aws_audit["signer"])
    assert result.ok, result.problem


def test_a_consumers_batch_puts_no_bytes_into_the_locked_archive(
    handler: ModuleType,  # noqa: F811
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # Only the router's and the drain's batches carry stored bodies; a consumer's bodies would
    # sit in the archive, locked for seven years where nobody can delete them (any bytes at all,
    # child data too), though no record of the platform names them.
    smuggled = b"anything a stakeholder wants kept out of reach for seven years"
    digest = hashlib.sha256(smuggled).hexdigest()
    document = json.loads(body("m1", event=AuditEvent.DELIVERED))
    document["records"][0]["body_sha256"] = digest
    document["bodies"] = {digest: base64.b64encode(smuggled).decode()}
    consumer = user_name(Stakeholder.MEDIA)

    written = handler.handler(amazon_mq(("c1", json.dumps(document).encode()), user=consumer), None)

    assert (written["records"], written["archived"]) == (1, 0)
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    assert store.keys(f"archive/{WRITER}/") == []
    (delivered,) = decode_object(store.get(written["object"]))
    assert (delivered["event"], delivered["publisher"]) == ("delivered", consumer)


def test_a_checkpoint_with_an_empty_signature_is_named_not_a_crash(
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # KMS refuses to check an empty signature (ValidationException): the error escaped the
    # verifier, so the runbook, the compliance report and replay failed instead of naming it.
    audit = writer(aws_audit)
    audit.write([batch("b1", 2)])
    key = audit.checkpoint()
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    stripped = {**json.loads(store.get(key)), "signature": ""}
    aws_audit["s3"].put_object(Bucket=BUCKET, Key=key, Body=json.dumps(stripped).encode())

    problem = read_trail(aws_audit).problem

    assert problem is not None
    assert (problem.where, problem.why) == (key, "the signature does not match the checkpoint")


def test_an_unsealed_object_nested_beyond_the_parser_is_named_not_a_crash(
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # Objects after the last checkpoint are read before anything seals them: one put there
    # with a line nested deeper than the parser raised RecursionError out of the verifier.
    audit = writer(aws_audit)
    first = audit.write([batch("b1", 2)])
    audit.checkpoint()
    assert first.key is not None
    forged = first.key.replace("000000000001-000000000002", "000000000003-000000000003")
    aws_audit["s3"].put_object(Bucket=BUCKET, Key=forged, Body=b"[" * 100_000 + b"\n")

    problem = read_trail(aws_audit).problem

    assert problem is not None
    assert problem.where == forged
    assert problem.why.startswith("not a batch object")
