"""What bounds the long-running consumer, on the real local RabbitMQ: the queue's delivery limit
for a message whose consumers keep dying with it, and ``max_messages`` through an outage."""

from __future__ import annotations

from typing import Any

import pytest

from fabric import topology
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
from fabric.audit import decode_audit_batch
from fabric.consumer import Delivery, MessageProcessor, Systemic
from fabric.envelope import new_message_id
from tests.integration import test_dead_letters as dead_letters

pytestmark = pytest.mark.integration
WORK, DLQ = dead_letters.WORK, dead_letters.DLQ
publish, depth = dead_letters.publish, dead_letters.depth
amqp, settings = dead_letters.amqp, dead_letters.settings  # the broker's fixture and settings


class Crashed(BaseException):
    """The consumer's process dies mid-handler: nothing catches it, and the run closes its
    connection without acknowledging, as the broker sees a dead process do."""


def audit_records(channel: Any) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    while True:
        method, _, body = channel.basic_get(topology.AUDIT_QUEUE, auto_ack=True)
        if method is None:
            return records
        records += decode_audit_batch(body).records


def test_a_message_whose_consumers_keep_dying_is_parked_by_the_toolkit_with_an_audit_record(
    broker_vhost: str, amqp: Any
) -> None:
    # A message that crashes its consumer's process every time came back until the work
    # queue's delivery limit dead-lettered it: in the DLQ with x-death, but without a
    # dead-lettered record, so the compliance report undercounted dead letters.
    message_id = new_message_id()
    publish(amqp, WORK, message_id)
    tries: list[int] = []

    def crashes(delivery: Delivery) -> None:
        tries.append(delivery.delivery_count)
        raise Crashed

    outcome = None
    for _ in range(topology.DELIVERY_LIMIT + 1):  # the broker delivers it limit + 1 times
        consumer = RabbitMqConsumer(settings(broker_vhost), WORK, MessageProcessor(crashes))
        try:
            outcome = consumer.run(max_messages=1, idle_timeout_s=2)
        except Crashed:
            continue
        break

    assert tries == list(range(topology.DELIVERY_LIMIT)), "the handler had limit tries"
    assert outcome == {"dead-letter": 1}, "the last delivery was parked, not handled again"
    method, properties, _ = amqp.basic_get(DLQ, auto_ack=True)
    assert method is not None
    assert properties.message_id == message_id
    assert properties.headers[topology.DEAD_LETTER_REASON_HEADER] == "max-receives"
    assert "x-death" not in properties.headers, "parked by the toolkit, not by the broker"
    assert depth(amqp, DLQ) == 0
    assert depth(amqp, WORK) == 0
    assert [
        (r["event"], r.get("reason"), r["queues"])
        for r in audit_records(amqp)
        if r["message_id"] == message_id
    ] == [("dead-lettered", "max-receives", [DLQ])]


def test_a_run_asked_for_some_messages_takes_that_many_through_a_dependency_outage(
    broker_vhost: str, amqp: Any
) -> None:
    # Each wait of a systemic pause counted as a message: asked for 5, a run that met three
    # failed tries stopped after 2 messages and left 3 in the queue.
    ids = [new_message_id() for _ in range(5)]
    for message_id in ids:
        publish(amqp, WORK, message_id)
    outage, done = [3], []

    def handler(delivery: Delivery) -> None:
        if outage[0]:
            outage[0] -= 1
            raise Systemic("the database is down")
        done.append(delivery.message_id)

    counts = RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(handler), backoff_s=0.01, max_backoff_s=0.01
    ).run(max_messages=5, idle_timeout_s=5)

    assert sorted(done) == sorted(ids)
    assert counts == {"systemic": 3, "done": 5}
    assert depth(amqp, WORK) == 0
