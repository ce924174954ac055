"""The overflow queue's redrive starts no publish once the run's time is spent (the real local
RabbitMQ): it publishes one letter at a time, each waiting for its confirm, so a batch of 100
letters begun at a run's time limit went on past it."""

from __future__ import annotations

from typing import Any

import pika
import pytest

from fabric import topology
from tests.integration.queue_waits import settled_depth, settled_empty
from tests.integration.test_overflow_redrive import (  # noqa: F401 (fixtures)
    BODY,
    DLQ,
    OVERFLOW,
    amqp,
    overflow_vhost,
    the_overflow_queue,
)
from tests.message_ids import msg_id

pytestmark = pytest.mark.integration


def test_no_letter_is_published_once_the_budget_is_spent(
    overflow_vhost: str,  # noqa: F811
    amqp: Any,  # noqa: F811
) -> None:
    for i in range(3):
        amqp.basic_publish(
            topology.OVERFLOW_EXCHANGE,
            DLQ,
            BODY,
            pika.BasicProperties(message_id=msg_id(f"late-{i}"), delivery_mode=2),
            mandatory=True,
        )
    assert settled_depth(amqp, OVERFLOW, 3) == 3
    queue = the_overflow_queue(overflow_vhost)
    letters = queue.peek(10)
    assert len(letters) == 3

    assert queue.move(letters, budget_s=0.0) == []
    settled_empty(amqp, DLQ)
    assert queue.move(letters, budget_s=60.0) == letters
    assert settled_depth(amqp, DLQ, 3) == 3
    queue.release()
