"""Audit writer review: what a stakeholder's consumer may publish on fabric.audit (the writer's
Amazon MQ event source) on moto, through the function's own entry point."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import pika
import pytest

from fabric import topology
from fabric.adapters.audit_storage import S3ObjectStore
from fabric.adapters.management import ManagementClient
from fabric.adapters.rabbitmq import RabbitSettings
from fabric.adapters.rabbitmq_consumer import consumer_settler
from fabric.audit import AuditEvent, AuditRecord, encode_audit_batch
from fabric.audit_chain import decode_object
from fabric.consumer import Delivery, MessageProcessor
from fabric.envelope import new_message_id
from fabric.routing import default_routing_table
from fabric.stakeholders import Stakeholder
from fabric.topology import user_name
from fabric.topology_apply import apply_topology
from tests.integration.conftest import AMQP, MANAGEMENT
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
    digest,
    handler,
    verified,
)

CHILD = "Siti Rahayu"  # stands for child data: it must reach no stored object


def test_raw_surrogate_bytes_are_an_unreadable_batch_not_a_stopped_trail(
    handler: ModuleType,  # noqa: F811
    aws_audit: dict[str, Any],  # noqa: F811
) -> None:
    # json.loads reads bytes with "surrogatepass": a lone surrogate as raw UTF-8 bytes (or in a
    # UTF-16 document) passed as a batch, then no record of the call could be encoded, and the
    # whole event, every other component's batch in it, failed on every redelivery.
    first = new_message_id()
    template = json.dumps(json.loads(body(first, event=AuditEvent.DELIVERED)))
    raw = (
        template.replace(f'"{first}"', '"m1\\u0000"').encode().replace(b"\\u0000", b"\xed\xa0\x80")
    )
    utf16 = template.replace(f'"{first}"', '"\\ud800"').encode().decode("unicode_escape")
    wide = utf16.encode("utf-16-le", "surrogatepass")
    consumer = user_name(Stakeholder.COMMUNITY)
    good = new_message_id()
    event = amazon_mq(
        (new_message_id(), raw),
        (new_message_id(), wide),
        (good, body(new_message_id(), event=AuditEvent.DELIVERED)),
        user=consumer,
    )

    written = handler.handler(event, None)
    handler.handler({"checkpoint": True}, None)

    assert written["records"] == 3
    store = S3ObjectStore(BUCKET, lambda: aws_audit["s3"])
    (key,) = store.keys(f"audit/{WRITER}/")
    records = decode_object(store.get(key))
    assert [r["event"] for r in records] == ["unreadable-batch", "unreadable-batch", "delivered"]
    assert records[2]["batch"] == good
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
    document = json.loads(body(new_message_id(), event=AuditEvent.DELIVERED))
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


@pytest.fixture
def media_user(vhost: str) -> Iterator[tuple[str, str]]:
    """The generated topology in the test's vhost with the media group's user only, renamed for
    this test (users are broker-wide): (name, password). Deleted afterwards."""
    group = user_name(Stakeholder.MEDIA)
    name, password = f"t{vhost.removeprefix('fabric-test-')}-{group}", uuid.uuid4().hex
    document = topology.definitions(default_routing_table(), vhost=vhost)
    document["users"] = [{**u, "name": name} for u in document["users"] if u["name"] == group]
    document["permissions"] = [
        {**p, "user": name} for p in document["permissions"] if p["user"] == group
    ]
    client = ManagementClient(MANAGEMENT, "guest", "guest")
    apply_topology(client, document, passwords={name: password}, vhost=vhost)
    yield name, password
    client.delete_user(name)


def test_a_custom_consumers_free_text_never_reaches_the_locked_trail(
    handler: ModuleType,  # noqa: F811
    aws_audit: dict[str, Any],  # noqa: F811
    vhost: str,
    media_user: tuple[str, str],
) -> None:
    # The writer stored every key a group's batch had, text of any length: a custom consumer
    # (not the toolkit) could put a child's name or case notes in an object nobody can erase
    # for seven years. Its batches are refused whole; the toolkit's own are stored. The batch's
    # AMQP message id, which the group's user sets as freely, is no record's ``batch`` either.
    name, password = media_user
    work = topology.queue_name(Stakeholder.MEDIA)
    settings = RabbitSettings(*AMQP, lambda: (name, password), vhost=vhost)
    settler = consumer_settler(settings, work, consumer="consumer:media")
    odd = Delivery(message_id=CHILD, topic=CHILD, body=b"{}", queue=work)  # not the router's
    fine = Delivery(
        message_id=new_message_id(), topic="media.story.published", body=b"{}", queue=work
    )

    def fails(_delivery: Delivery) -> None:
        raise ValueError(CHILD)

    items = [
        (odd, MessageProcessor(lambda _d: None).process(odd)),
        (fine, MessageProcessor(fails).process(fine)),
    ]
    assert settler.settle(items) == [True, True]

    def custom(**fields: Any) -> bytes:
        record = AuditRecord(
            event=AuditEvent.RETRIED,
            at=datetime.now(UTC),
            message_id=fine.message_id,
            source="case-desk",
            reason="ValueError",
            queues=(work,),
        ).to_dict()
        document = json.loads(encode_audit_batch([], emitted_by="case-desk"))
        document["records"] = [{**record, **fields}]
        return json.dumps(document).encode()

    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            *AMQP, virtual_host=vhost, credentials=pika.PlainCredentials(name, password)
        )
    )
    channel = connection.channel()
    channel.confirm_delivery()
    notes = custom(notes=f"{CHILD} was seen at Pasar Minggu with a bruise")
    spaced = custom(reason=f"{CHILD} hit by her father")
    for batch_id, data in ((f"{CHILD}'s notes", notes), (f"{CHILD}, 7", spaced)):
        channel.basic_publish(
            topology.AUDIT_EXCHANGE,
            "consumer",
            data,
            pika.BasicProperties(message_id=batch_id, user_id=name, delivery_mode=2),
            mandatory=True,
        )
    connection.close()

    # What the Amazon MQ event source hands the writer, the test's user named as the deployed
    # broker names the group's (the broker checked the user-id against the connection's user).
    guest = pika.BlockingConnection(pika.ConnectionParameters(*AMQP, virtual_host=vhost))
    reader = guest.channel()
    messages = []
    while (got := reader.basic_get(topology.AUDIT_QUEUE, auto_ack=True))[0] is not None:
        _, properties, data = got
        assert properties.user_id == name
        messages.append(
            {
                "basicProperties": {
                    "messageId": properties.message_id,
                    "userId": user_name(Stakeholder.MEDIA),
                },
                "data": base64.b64encode(data).decode(),
            }
        )
    guest.close()
    event = {"eventSource": "aws:rmq", "rmqMessagesByQueue": {"fabric.audit::/": messages}}

    written = handler.handler(event, None)

    stored = aws_audit["s3"].get_object(Bucket=BUCKET, Key=written["object"])["Body"].read()
    records = decode_object(stored)
    assert [(r["event"], r.get("reason")) for r in records[:2]] == [
        ("delivered", None),
        ("retried", "ValueError"),
    ]
    assert records[0]["message_id"] is None  # the odd delivery: its id was not the fabric's
    assert {r["publisher"] for r in records} == {user_name(Stakeholder.MEDIA)}
    refused = {r["batch"]: r for r in records[2:]}
    media = user_name(Stakeholder.MEDIA)
    assert sorted(refused) == sorted([digest(notes, media), digest(spaced, media)])
    assert {r["event"] for r in refused.values()} == {"refused-batch"}
    why_notes = refused[digest(notes, media)]["reason"]
    assert "a field the fabric's consumer records do not have" in why_notes
    assert "a reason its event does not have" in refused[digest(spaced, media)]["reason"]
    assert CHILD.encode() not in stored
    assert b"bruise" not in stored
