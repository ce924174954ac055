"""The publish frames the transport writes are exactly the bytes pika's own marshalling writes."""

from __future__ import annotations

import itertools
import uuid

import pika
import pika.exceptions
import pytest
from pika import frame
from pika.spec import Basic, BasicProperties

from fabric.adapters.amqp_frames import PublishFrames
from fabric.ports import OutboundMessage

BODY_MAX = 100  # a small frame max, so splitting is exercised without megabytes
HEADERS = [{}, {"fabric-audience": "all"}, {"fabric-to-media": "yes", "trace": "ümlaut ✓", "": ""}]
OPTIONAL = [None, "c0rrelation", "réponse-ünicode"]
SIZES = [0, 1, BODY_MAX - 1, BODY_MAX, BODY_MAX + 1, 3 * BODY_MAX, 3 * BODY_MAX + 7]


def pika_frames(
    message: OutboundMessage,
    *,
    channel: int,
    exchange: str,
    routing_key: str,
    timestamp: int,
    user_id: str | None,
    body_max: int,
) -> bytes:
    """What pika's ``basic_publish`` sends for the same message, from pika's own classes."""
    properties = BasicProperties(
        user_id=user_id,
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        timestamp=timestamp,
        type=message.topic,
        headers=dict(message.headers) or None,
    )
    publish = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True)
    parts = [
        frame.Method(channel, publish).marshal(),
        frame.Header(channel, len(message.body), properties).marshal(),
    ]
    for start in range(0, len(message.body), body_max):
        parts.append(frame.Body(channel, message.body[start : start + body_max]).marshal())
    return b"".join(parts)


def outbound(size: int, headers: dict[str, str], optional: str | None) -> OutboundMessage:
    return OutboundMessage(
        message_id=str(uuid.uuid4()),
        topic="child-safety.incident.reported",
        body=bytes(i % 256 for i in range(size)),
        audience=frozenset(),
        headers=headers,
        correlation_id=optional,
        reply_to=optional and optional[::-1],
    )


@pytest.mark.parametrize(
    ("size", "headers", "optional", "user_id"),
    list(itertools.product(SIZES, HEADERS, OPTIONAL, [None, "fabric-platform"])),
)
def test_every_property_and_body_size_encodes_as_pika_encodes_it(
    size: int, headers: dict[str, str], optional: str | None, user_id: str | None
) -> None:
    message = outbound(size, headers, optional)
    where = {"exchange": "fabric.x.ingress", "routing_key": message.topic, "timestamp": 1796322645}
    ours = PublishFrames(7, BODY_MAX).encode(message, **where, user_id=user_id)
    assert ours == pika_frames(message, channel=7, **where, user_id=user_id, body_max=BODY_MAX)


def test_a_real_frame_size_body_splits_where_pika_splits_it() -> None:
    body_max = 131_072 - 8  # RabbitMQ's default frame max, less frame header and end
    for size in (body_max, body_max + 1, 400_000):
        message = outbound(size, {"fabric-audience": "all"}, None)
        where = {"exchange": "fabric.x.audit", "routing_key": "audit.batch", "timestamp": 0}
        ours = PublishFrames(1, body_max).encode(message, **where)
        assert ours == pika_frames(message, channel=1, **where, user_id=None, body_max=body_max)


def test_many_exchanges_keys_and_headers_all_encode_correctly_past_the_caches() -> None:
    encoder = PublishFrames(1, BODY_MAX)
    for n in range(1_100):  # more of each than the caches keep
        message = outbound(10, {"fabric-to-media": "yes", "n": str(n % 1_050)}, None)
        where = {"exchange": f"x.{n % 3}", "routing_key": f"topic.{n}", "timestamp": n}
        expected = pika_frames(message, channel=1, **where, user_id=None, body_max=BODY_MAX)
        assert encoder.encode(message, **where) == expected


def test_a_name_longer_than_a_short_string_is_refused_as_pika_refuses_it() -> None:
    encoder = PublishFrames(1, BODY_MAX)
    message = outbound(10, {}, None)
    with pytest.raises(pika.exceptions.ShortStringTooLong):
        encoder.encode(message, exchange="x", routing_key="é" * 128, timestamp=0)


def test_a_header_that_is_not_a_string_is_refused() -> None:
    message = outbound(10, {"count": 3}, None)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="header 'count' is not a string"):
        PublishFrames(1, BODY_MAX).encode(message, exchange="x", routing_key="k", timestamp=0)
