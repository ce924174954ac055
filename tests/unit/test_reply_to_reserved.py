"""A reply_to RabbitMQ reserves (``amq.``): refused from producers, left off every publish.

``amq.rabbitmq.reply-to`` as a publish's reply-to property has RabbitMQ close the channel when
the channel has no reply consumer (none of the fabric's has), so it must never reach the broker:
not from a producer, and not from a message stored before the router refused it.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pika
import pytest

from fabric.adapters.amqp_frames import PublishFrames
from fabric.adapters.rabbitmq_overflow import _returned
from fabric.envelope import Envelope, Reason, Rejection, amqp_reply_to, from_wire, validate_envelope
from fabric.ports import OutboundMessage
from tests.unit.test_amqp_frames import BODY_MAX, pika_frames

NOW = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
RESERVED = ["amq.rabbitmq.reply-to", "amq.rabbitmq.reply-to.g1h2AA", "amq.gen-JzTY20BRgKO"]


@pytest.mark.parametrize("reply_to", RESERVED)
def test_a_producer_may_not_name_a_reserved_reply_to(reply_to: str) -> None:
    body: dict[str, Any] = {"topic": "donation.received", "payload": 1, "reply_to": reply_to}
    for raw in (body, json.dumps(body), json.dumps(body).encode()):
        result = validate_envelope(raw, "community", now=NOW)
        assert isinstance(result, Rejection)
        assert result.reason is Reason.INVALID_FIELD_TYPE
        assert "amq." in result.message


@pytest.mark.parametrize("reply_to", ["fabric.community", "amq", "AMQ.x", "my.amq.reply", "a"])
def test_other_reply_to_values_are_kept(reply_to: str) -> None:
    body: dict[str, Any] = {"topic": "donation.received", "payload": 1, "reply_to": reply_to}
    result = validate_envelope(body, "community", now=NOW)
    assert isinstance(result, Envelope)
    assert result.reply_to == reply_to


def test_a_stored_envelope_with_a_reserved_reply_to_still_reads() -> None:
    # Accepted before the rule (on the fallback path, archived): the drain and the replay must
    # still be able to move it.
    wire = json.dumps(
        {
            "version": "fabric.envelope/1",
            "message_id": str(uuid.uuid4()),
            "topic": "donation.received",
            "source": "community",
            "payload": 1,
            "reply_to": "amq.rabbitmq.reply-to",
        }
    )
    assert from_wire(wire).reply_to == "amq.rabbitmq.reply-to"


def test_amqp_reply_to_leaves_off_only_reserved_names() -> None:
    assert [amqp_reply_to(value) for value in [*RESERVED, None]] == [None] * 4
    assert amqp_reply_to("fabric.community") == "fabric.community"


def outbound(reply_to: str | None) -> OutboundMessage:
    return OutboundMessage(
        message_id=str(uuid.uuid4()),
        topic="donation.received",
        body=b'{"n": 1}',
        audience=frozenset(),
        headers={"fabric-audience": "all"},
        correlation_id="case-7",
        reply_to=reply_to,
    )


@pytest.mark.parametrize("reply_to", RESERVED)
def test_the_publish_frames_carry_no_reserved_reply_to(reply_to: str) -> None:
    # Every publish through the transport (router, drain, replay, redrive, the consumer
    # toolkit's retries and parks) is encoded here.
    message = outbound(reply_to)
    where: dict[str, Any] = {
        "exchange": "fabric.x.redeliver",
        "routing_key": "fabric.business",
        "timestamp": 7,
    }
    ours = PublishFrames(1, BODY_MAX).encode(message, **where)
    without = dataclasses.replace(message, reply_to=None)
    assert ours == pika_frames(without, channel=1, **where, user_id=None, body_max=BODY_MAX)


def test_an_overflow_letter_goes_back_without_a_reserved_reply_to() -> None:
    properties = pika.BasicProperties(
        message_id="m-1",
        type="donation.received",
        correlation_id="case-7",
        reply_to="amq.rabbitmq.reply-to",
        headers={"fabric-audience": "all"},
    )
    returned = _returned(properties, None, 0)
    assert (returned.message_id, returned.correlation_id, returned.reply_to) == (
        "m-1",
        "case-7",
        None,
    )
    kept = _returned(pika.BasicProperties(reply_to="fabric.business"), None, 0)
    assert kept.reply_to == "fabric.business"
