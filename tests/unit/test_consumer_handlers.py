"""What the toolkit does with a handler it cannot run as written, and with a delivery the broker's
delivery limit would dead-letter on its next return (no broker needed)."""

from __future__ import annotations

import base64
import gc
import warnings
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from fabric import topology
from fabric.adapters.memory import MemoryAuditSink, MemoryTransport
from fabric.audit import AuditEvent
from fabric.consumer import (
    Delivery,
    Idempotency,
    MessageProcessor,
    RabbitMqSettler,
    Verdict,
    delivery_count,
    last_delivery,
    rabbitmq_batch_handler,
)
from fabric.envelope import new_message_id
from fabric.stakeholders import Stakeholder

WORK = topology.queue_name(Stakeholder.MEDIA)
DLQ = topology.dead_letter_queue_name(Stakeholder.MEDIA)
REGION = "ap-southeast-3"


def delivery(message_id: str) -> Delivery:
    return Delivery(message_id=message_id, topic="media.story.published", body=b"{}", queue=WORK)


# -- async handlers ---------------------------------------------------------------------------


async def notify_async(delivery: Delivery) -> None:
    raise AssertionError("an async handler's body must never run")


class AsyncNotifier:
    async def __call__(self, delivery: Delivery) -> None:
        raise AssertionError("an async handler's body must never run")


@pytest.mark.parametrize("handler", [notify_async, AsyncNotifier()], ids=["function", "object"])
def test_an_async_handler_is_refused_when_the_processor_is_built(handler: Any) -> None:
    # Before, the coroutine object it returned was taken for a return value: every message was
    # acknowledged and audited delivered, and none was ever processed.
    with pytest.raises(TypeError, match="async"):
        MessageProcessor(handler)


def test_a_handler_that_returns_a_coroutine_parks_the_message_as_poison_not_delivered() -> None:
    ran: list[str] = []

    async def body(item: Delivery) -> None:
        ran.append(item.message_id)

    def handler(item: Delivery) -> Any:  # a plain function that hands back a coroutine
        return body(item)

    message_id = new_message_id()  # the toolkit records only ids in the envelope's syntax
    transport, audit = MemoryTransport(), MemoryAuditSink()
    settler = RabbitMqSettler(lambda _group: transport, audit=audit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decision = MessageProcessor(handler).process(delivery(message_id))
        assert settler.settle([(delivery(message_id), decision)]) == [True]
        gc.collect()  # a coroutine dropped unawaited warns when it is collected

    assert (decision.verdict, decision.reason, decision.error) == (
        Verdict.DEAD_LETTER,
        "poison",
        "HandlerReturnedAwaitable",
    )
    (parked,) = transport.published
    assert parked.redeliver_to == DLQ
    assert parked.headers[topology.ERROR_HEADER] == "HandlerReturnedAwaitable"
    assert [(r.event, r.reason) for r in audit.records] == [(AuditEvent.DEAD_LETTERED, "poison")]
    assert ran == [], "the coroutine was closed, never run"
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        boto3.client("dynamodb", region_name=REGION).create_table(  # the infra's schema
            TableName="idempotency",
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        yield "idempotency"


def test_a_message_whose_handler_returned_a_coroutine_is_processed_once_the_handler_is_fixed(
    table: str,
) -> None:
    # Under Idempotency the coroutine was a completed run: the record said processed, and the
    # message, redriven after the fix, was skipped.
    async def body(item: Delivery) -> None:
        pass

    def handler(item: Delivery) -> Any:  # a plain function that hands back a coroutine
        return body(item)

    message = delivery(new_message_id())
    broken = MessageProcessor(handler, idempotency=Idempotency(table, consumer="stories"))
    assert broken.process(message).verdict is Verdict.DEAD_LETTER

    processed: list[str] = []
    fixed = MessageProcessor(
        lambda item: processed.append(item.message_id),
        idempotency=Idempotency(table, consumer="stories"),
    )
    assert fixed.process(message).verdict is Verdict.DONE
    assert processed == [message.message_id]


# -- the delivery limit -----------------------------------------------------------------------


def amazon_mq_event(queue: str, delivery_counts: list[int]) -> dict[str, Any]:
    """An ``aws:rmq`` event; a redelivery's ``x-delivery-count`` is a plain number in it."""
    messages = [
        {
            "basicProperties": {
                "messageId": f"m-{i}",
                "type": "media.story.published",
                "headers": {"x-delivery-count": count} if count else {},
            },
            "redelivered": bool(count),
            "data": base64.b64encode(b"{}").decode(),
        }
        for i, count in enumerate(delivery_counts)
    ]
    return {"eventSource": "aws:rmq", "rmqMessagesByQueue": {f"{queue}::/": messages}}


def test_a_delivery_at_the_delivery_limit_reaches_its_handler() -> None:
    # Returns that were no failure of the message (failed invocations of its batch, the end of
    # a long-running consumer's run, on RabbitMQ 3.10 to 4.2) raise its x-delivery-count too.
    # Before, the toolkit parked the delivery carrying the limit as max-receives before its
    # handler ran, though the broker still gave it to the handler: a healthy message lost.
    limit = topology.DELIVERY_LIMIT
    ran: list[str] = []
    transport, audit = MemoryTransport(), MemoryAuditSink()
    handle = rabbitmq_batch_handler(
        MessageProcessor(lambda item: ran.append(item.message_id)),
        RabbitMqSettler(lambda _group: transport, audit=audit),
    )

    counts = handle(amazon_mq_event(WORK, [0, limit - 1, limit]), None)

    assert counts == {"done": 3, "retry": 0, "dead-letter": 0}
    assert ran == ["m-0", "m-1", "m-2"]
    assert transport.published == []
    assert [r.event for r in audit.records] == [AuditEvent.DELIVERED] * 3


def test_only_a_fabric_work_queue_delivery_carrying_the_limit_is_its_last() -> None:
    # The long-running consumer parks such a delivery instead of handing it back (the broker
    # would dead-letter it without an audit record); a queue of the consumer's own has a limit
    # the toolkit does not know.
    limit = topology.DELIVERY_LIMIT
    assert last_delivery(WORK, limit)
    assert not last_delivery(WORK, limit - 1)
    assert not last_delivery("stories-own-queue", limit + 5)
    assert delivery_count({"x-delivery-count": limit}) == limit
    assert delivery_count({"x-delivery-count": True}) == 0
    assert delivery_count(None) == 0
