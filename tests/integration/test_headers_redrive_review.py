"""Dead letters with malformed headers on the real local RabbitMQ: the redrive reads them as
absent and moves the letter, instead of stopping every run of the queue at it.

A DLQ's and the overflow queue's letters carry whatever their publisher put in their headers
(RabbitMQ 3.10 keeps a client's ``x-death``; a consumer may park a message with its own
``fabric-*`` headers). Before, one such letter raised out of the run (OSError, ValueError,
TypeError, AttributeError): the function failed on every run and nothing behind it moved.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pika
import pytest

from fabric import topology
from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.redrive import RedrivePlan, Redriver
from tests.integration.queue_waits import settled_depth, settled_empty
from tests.integration.test_dead_letters import DLQ, WORK, dead_letter_queue
from tests.integration.test_overflow_redrive import connect, the_overflow_queue

pytestmark = pytest.mark.integration

MALFORMED = [
    pytest.param({topology.DEAD_LETTERED_AT_HEADER: "1e18"}, id="dead-lettered-at-past-time_t"),
    pytest.param({topology.DEAD_LETTERED_AT_HEADER: "99999999999"}, id="dead-lettered-at-year"),
    pytest.param({"x-death": "rejected"}, id="x-death-a-string"),
    pytest.param({"x-death": 5}, id="x-death-a-number"),
    pytest.param({topology.REDRIVES_HEADER: "²"}, id="redrives-a-superscript-digit"),
    pytest.param({topology.REDRIVES_HEADER: "9" * 5000}, id="redrives-5000-digits"),
]


@pytest.fixture
def amqp(broker_vhost: str) -> Iterator[Any]:
    """A confirm-mode channel (guest) in the test's vhost, which holds the generated topology."""
    channel = connect(broker_vhost)
    yield channel
    channel.connection.close()


def letter(
    channel: Any, exchange: str, routing_key: str, headers: dict[str, Any], message_id: str
) -> None:
    channel.basic_publish(
        exchange,
        routing_key,
        b'{"note": "not child data"}',
        pika.BasicProperties(
            message_id=message_id, type="community.update", delivery_mode=2, headers=headers
        ),
        mandatory=True,
    )


@pytest.mark.parametrize("headers", MALFORMED)
def test_a_dlq_letter_with_malformed_headers_is_listed_and_moved(
    broker_vhost: str, amqp: Any, headers: dict[str, Any]
) -> None:
    letter(amqp, "", DLQ, headers, "m-bad")  # the default exchange: straight into the DLQ
    letter(amqp, "", DLQ, {}, "m-sound")  # and a sound letter behind it
    redriver = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink())

    listed = redriver.run(dead_letter_queue(broker_vhost), RedrivePlan(dry_run=True))
    assert (listed.matched, listed.stopped) == (2, "empty")
    assert settled_depth(amqp, DLQ, 2) == 2

    report = redriver.run(dead_letter_queue(broker_vhost))

    assert (report.moved, report.stopped) == (2, "empty")
    assert settled_depth(amqp, WORK, 2) == 2
    settled_empty(amqp, DLQ)


@pytest.mark.parametrize("headers", MALFORMED)
def test_an_overflow_letter_with_malformed_headers_goes_back_to_its_queue(
    broker_vhost: str, amqp: Any, headers: dict[str, Any]
) -> None:
    letter(amqp, topology.OVERFLOW_EXCHANGE, DLQ, headers, "m-bad")

    report = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
        the_overflow_queue(broker_vhost)
    )

    assert (report.moved, report.left, report.stopped) == (1, 0, "empty")
    assert settled_depth(amqp, DLQ, 1) == 1
    settled_empty(amqp, topology.OVERFLOW_QUEUE)
