"""A message that comes again after it was redriven (a replay keeps its message id) and is
parked again by the consumer toolkit, on the real local RabbitMQ: the redrive moves it back
instead of taking it for the letter it moved weeks ago and removing it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
from fabric.consumer import Delivery, MessageProcessor, Poison
from fabric.redrive import Redriver
from tests.integration.queue_waits import settled_depth, settled_empty
from tests.integration.test_dead_letters import (
    DLQ,
    WORK,
    dead_letter_queue,
    drain_ids,
    publish,
    settings,
)
from tests.integration.test_overflow_redrive import connect

pytestmark = pytest.mark.integration


@pytest.fixture
def amqp(broker_vhost: str) -> Iterator[Any]:
    """A confirm-mode channel (guest) in the test's vhost, which holds the generated topology."""
    channel = connect(broker_vhost)
    yield channel
    channel.connection.close()


def consume_one(vhost: str, *, poison: bool) -> None:
    def handler(_delivery: Delivery) -> None:
        if poison:
            raise Poison("cannot be parsed")

    RabbitMqConsumer(settings(vhost), WORK, MessageProcessor(handler)).run(
        max_messages=1, idle_timeout_s=10
    )


def test_a_replayed_message_parked_again_is_redriven_not_removed(
    broker_vhost: str, amqp: Any
) -> None:
    ledger = MemoryRedriveLedger()  # the run's ledger outlives both dead-letterings
    redriver = Redriver(ledger=ledger, audit=MemoryAuditSink())
    publish(amqp, WORK, "case-7")
    consume_one(broker_vhost, poison=True)  # parked: fabric-redrives absent (0)
    assert redriver.run(dead_letter_queue(broker_vhost)).moved == 1
    consume_one(broker_vhost, poison=False)  # fixed, processed
    settled_empty(amqp, WORK, DLQ)

    time.sleep(1.1)  # the dead-lettering time has second precision
    publish(amqp, WORK, "case-7")  # replayed: the same id, no redrive counter
    consume_one(broker_vhost, poison=True)  # parked again: fabric-redrives absent (0) again
    assert settled_depth(amqp, DLQ, 1) == 1

    report = redriver.run(dead_letter_queue(broker_vhost))

    assert (report.moved, report.already_moved) == (1, 0)
    assert drain_ids(amqp, WORK) == ["case-7"], "back in its work queue, not dropped"
    settled_empty(amqp, DLQ)
