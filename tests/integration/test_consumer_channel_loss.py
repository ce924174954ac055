"""The long-running consumer when the broker's consumer_timeout fires during a handler, on a
private RabbitMQ node whose timeout is one second (the shared broker keeps its 30 minutes).

The broker then closes the channel and puts the message back in its work queue. Before, the
consumer still published the message's retry or park and its audit record, and only failed on
the acknowledgement: a poison message lay in the DLQ (audited ``dead-lettered``) and in its work
queue, to be parked again by the next run; a failed one went round two retry chains. And a run
that ended on that message raised ``ValueError`` (pika's consumer tags of a closed channel are
empty), not the ``AMQPError`` its docstring promises.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from fabric import topology
from fabric.adapters.rabbitmq import RabbitSettings
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
from fabric.audit import decode_audit_batch
from fabric.consumer import Delivery, MessageProcessor, Poison
from fabric.envelope import new_message_id
from fabric.stakeholders import Stakeholder
from tests.integration.private_node import GUEST, PrivateNode
from tests.integration.queue_waits import depth, settled_depth, settled_empty
from tests.integration.test_broker_drills import apply
from tests.integration.test_broker_drills import topology as topology_document

pytestmark = pytest.mark.integration

GROUP = Stakeholder.COMMUNITY
WORK = topology.queue_name(GROUP)
DLQ = topology.dead_letter_queue_name(GROUP)
FIRST_TIER = topology.retry_queue_name(GROUP, topology.RETRY_TIERS_SECONDS[0])
CONSUMER_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    base = Path(tempfile.mkdtemp(prefix="fabric-consumer-timeout-"))
    started = PrivateNode(base, config=f"consumer_timeout = {CONSUMER_TIMEOUT_S * 1000}\n")
    # RabbitMQ 3.10 checks the timeout on each channel's tick, once a minute by default.
    (base / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 200}]}].\n")
    try:
        started.start()
        yield started
    finally:
        started.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def vhost(node: PrivateNode) -> Iterator[str]:
    name = f"fabric-consumer-timeout-{uuid.uuid4().hex[:12]}"
    node.add_vhost(name)
    apply(node, name, topology_document(name))
    yield name
    node.delete_vhost(name)


@pytest.fixture
def amqp(node: PrivateNode, vhost: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1",
            node.amqp_port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials(*GUEST),
        )
    )
    channel = connection.channel()
    channel.confirm_delivery()
    yield channel
    connection.close()


def settings(node: PrivateNode, vhost: str) -> RabbitSettings:
    return RabbitSettings(
        host="127.0.0.1", port=node.amqp_port, credentials=lambda: GUEST, vhost=vhost
    )


def publish(channel: Any, message_id: str) -> None:
    channel.basic_publish(
        topology.REDELIVER_EXCHANGE,
        WORK,
        b'{"note": "not child data"}',
        pika.BasicProperties(
            message_id=message_id,
            type="community.update",
            delivery_mode=2,
            headers={topology.AUDIENCE_HEADER: topology.ALL_AUDIENCE},
        ),
        mandatory=True,
    )


def audit_events(channel: Any) -> list[tuple[Any, Any]]:
    """The (event, reason) of every audit record the consumers sent, taken off the queue."""
    events: list[tuple[Any, Any]] = []
    while True:
        method, _, body = channel.basic_get(topology.AUDIT_QUEUE, auto_ack=True)
        if method is None:
            return events
        events += [(r["event"], r.get("reason")) for r in decode_audit_batch(body).records]


def outlasting_the_timeout(amqp: Any, then: BaseException) -> Callable[[Delivery], None]:
    """A handler that runs until the broker's consumer_timeout closed its consumer's channel
    and put the message back in the work queue, then raises ``then``."""

    def handler(_delivery: Delivery) -> None:
        deadline = time.monotonic() + 15
        while depth(amqp, WORK) == 0:
            assert time.monotonic() < deadline, "the broker's consumer_timeout did not fire"
            time.sleep(0.1)
        raise then

    return handler


def test_a_poison_message_whose_handler_outlasted_the_timeout_is_parked_once_not_twice(
    node: PrivateNode, vhost: str, amqp: Any
) -> None:
    message_id = new_message_id()
    publish(amqp, message_id)
    slow = RabbitMqConsumer(
        settings(node, vhost),
        WORK,
        MessageProcessor(outlasting_the_timeout(amqp, Poison("cannot be processed"))),
        consumer_timeout_s=CONSUMER_TIMEOUT_S,
    )

    # The run ends on that message: it raises the documented error, not ValueError.
    with pytest.raises(pika.exceptions.AMQPError) as raised:
        slow.run(max_messages=1, idle_timeout_s=5)

    settled_empty(amqp, DLQ)  # not parked: the broker had taken it back
    assert audit_events(amqp) == []
    assert settled_depth(amqp, WORK, 1) == 1
    assert isinstance(raised.value, pika.exceptions.ChannelClosed)

    # The next run parks it, once.
    def poison(_delivery: Delivery) -> None:
        raise Poison("cannot be processed")

    quick = RabbitMqConsumer(settings(node, vhost), WORK, MessageProcessor(poison))
    assert quick.run(max_messages=1, idle_timeout_s=5) == {"dead-letter": 1}
    settled_empty(amqp, WORK)
    assert settled_depth(amqp, DLQ, 1) == 1
    assert audit_events(amqp) == [("dead-lettered", "poison")]


def test_a_failed_attempt_whose_handler_outlasted_the_timeout_starts_no_second_retry_chain(
    node: PrivateNode, vhost: str, amqp: Any
) -> None:
    # The run goes on waiting for more messages: what was decided is settled when it finds
    # none (``idle``), after the broker took the message back.
    publish(amqp, new_message_id())
    consumer = RabbitMqConsumer(
        settings(node, vhost),
        WORK,
        MessageProcessor(outlasting_the_timeout(amqp, RuntimeError("the service timed out"))),
        consumer_timeout_s=CONSUMER_TIMEOUT_S,
    )

    with pytest.raises(pika.exceptions.AMQPError) as raised:
        consumer.run(idle_timeout_s=5)

    settled_empty(amqp, FIRST_TIER)  # no retry copy beside the message in its work queue
    assert audit_events(amqp) == [], "no retried record for an attempt that was given back"
    assert settled_depth(amqp, WORK, 1) == 1
    assert isinstance(raised.value, pika.exceptions.ChannelClosed)
