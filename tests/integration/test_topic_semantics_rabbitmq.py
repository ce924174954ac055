"""Our topic-pattern matcher routes exactly like the real RabbitMQ topic exchange."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from fabric.routing import topic_matches

pytestmark = pytest.mark.integration

AMQP = pika.ConnectionParameters(
    host="127.0.0.1",
    port=5672,
    credentials=pika.PlainCredentials("guest", "guest"),
    connection_attempts=1,
    socket_timeout=5,
    blocked_connection_timeout=10,
)

PATTERNS = [
    "",
    "#",
    "*",
    "a",
    "a.*",
    "*.a",
    "*.*",
    "*.*.*",
    "a.#",
    "#.a",
    "#.a.#",
    "a.#.b",
    "a.*.b",
    "a.*.#",
    "#.#",
    "*.#",
    "#.*",
    "#.b.*",
    "a..b",
    "a*.b",
    "child-safety.incident.#",
]
SPECIAL_KEYS = [
    "*",
    "#",
    "a.#",
    "a.*",
    "a*.b",
    "a.x.b",
    "a.x.y.b",
    "a.b.a.b",
    "x.y.z.w",
    "child-safety.incident",
    "child-safety.incident.reported",
    "child-safety.incidents.reported",
]
# Every key of up to three words over {a, b, empty}: "", "a", ".", "a.", ".a", "a..b", ...
GENERATED_KEYS = [
    ".".join(words) for n in range(1, 4) for words in itertools.product(["a", "b", ""], repeat=n)
]
KEYS = list(dict.fromkeys(["", *GENERATED_KEYS, *SPECIAL_KEYS]))


@pytest.fixture
def channel() -> Iterator[BlockingChannel]:
    try:
        connection = pika.BlockingConnection(AMQP)
    except pika.exceptions.AMQPConnectionError as exc:
        pytest.fail(
            "RabbitMQ is not reachable on 127.0.0.1:5672 (guest/guest); the integration tier "
            f"needs the local broker running: {exc!r}"
        )
    try:
        opened = connection.channel()
        opened.confirm_delivery()
        yield opened
    finally:
        connection.close()


def test_our_matcher_routes_every_key_like_the_rabbitmq_topic_exchange(
    channel: BlockingChannel,
) -> None:
    exchange = f"fabric-test.topic-semantics.{uuid.uuid4().hex}"
    channel.exchange_declare(exchange, exchange_type="topic", durable=False, auto_delete=True)
    queues: dict[str, str] = {}
    try:
        for pattern in PATTERNS:
            declared = channel.queue_declare("", exclusive=True, auto_delete=True)
            queue = declared.method.queue
            channel.queue_bind(queue, exchange, routing_key=pattern)
            queues[pattern] = queue
        for index, key in enumerate(KEYS):
            # With confirms on, basic_publish returns once the broker has routed the message.
            channel.basic_publish(exchange, key, str(index).encode())
        broker = {pattern: _drain(channel, queue) for pattern, queue in queues.items()}
    finally:
        for queue in queues.values():
            channel.queue_delete(queue)
        channel.exchange_delete(exchange)

    ours = {pattern: {key for key in KEYS if topic_matches(pattern, key)} for pattern in PATTERNS}
    differences = {
        p: {"only_rabbitmq": sorted(broker[p] - ours[p]), "only_ours": sorted(ours[p] - broker[p])}
        for p in PATTERNS
        if broker[p] != ours[p]
    }
    assert differences == {}
    assert any(broker.values()), "the broker routed nothing: the test would prove nothing"


def _drain(channel: BlockingChannel, queue: str) -> set[str]:
    received: set[str] = set()
    while True:
        method, _properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return received
        received.add(KEYS[int(body)])
