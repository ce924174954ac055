"""Terminal queues never drop a letter at their delivery limit (the real local RabbitMQ).

Every redrive run peeks a DLQ's letters and gives back the ones it does not move (dry runs,
filtered runs, chunks); a failing audit writer hands its batch back; each hand-back counts as a
delivery. The generated topology is applied with a terminal delivery limit of 3 instead of
1000 (``definitions(terminal_delivery_limit=...)``: the same arguments otherwise) so the limit
is reached in a few runs. A letter that reaches it must land in ``fabric.overflow`` with what
the redrive needs to send it back, not vanish (the redrive of the overflow queue itself:
``test_overflow_redrive.py``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from fabric import topology
from fabric.adapters.management import ManagementClient
from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.adapters.rabbitmq_dlq import RabbitMqDeadLetterQueue
from fabric.adapters.rabbitmq_overflow import RabbitMqOverflowQueue
from fabric.bootstrap import exchange_for
from fabric.redrive import RedriveFilter, RedrivePlan, Redriver
from fabric.routing import default_routing_table
from fabric.stakeholders import Stakeholder
from fabric.topology_apply import apply_topology
from tests.integration.conftest import AMQP, GUEST, MANAGEMENT
from tests.integration.queue_waits import settled_depth, settled_empty, unheld_depth

pytestmark = pytest.mark.integration

LIMIT = 3
GROUP = Stakeholder.COMMUNITY
WORK = topology.queue_name(GROUP)
DLQ = topology.dead_letter_queue_name(GROUP)


@pytest.fixture
def overflow_vhost(vhost: str) -> str:
    """The generated topology, terminal delivery limit lowered, without its broker-wide users."""
    document = topology.definitions(
        default_routing_table(), vhost=vhost, terminal_delivery_limit=LIMIT
    )
    document["users"], document["permissions"] = [], []
    apply_topology(
        ManagementClient(MANAGEMENT, "guest", "guest"), document, passwords={}, vhost=vhost
    )
    return vhost


@pytest.fixture
def amqp(overflow_vhost: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            *AMQP, virtual_host=overflow_vhost, credentials=pika.PlainCredentials(*GUEST)
        )
    )
    channel = connection.channel()
    channel.confirm_delivery()
    yield channel
    connection.close()


def settings(vhost: str) -> RabbitSettings:
    return RabbitSettings(host=AMQP[0], port=AMQP[1], credentials=lambda: GUEST, vhost=vhost)


def dead_letter_queue(vhost: str) -> RabbitMqDeadLetterQueue:
    origin = RabbitMqTransport(settings(vhost), exchange_for=exchange_for)
    return RabbitMqDeadLetterQueue(settings(vhost), DLQ, origin=origin)


def park(channel: Any, message_id: str) -> None:
    """A dead letter as the consumer toolkit parks it (through the group's retry exchange)."""
    channel.basic_publish(
        topology.retry_exchange_name(GROUP),
        DLQ,
        b'{"note": "not child data"}',
        pika.BasicProperties(
            message_id=message_id,
            type="community.case.update",
            correlation_id="corr-1",
            delivery_mode=2,
            headers={
                "fabric-audience": "all",
                "case-region": "north",
                topology.DEAD_LETTER_REASON_HEADER: "poison",
                topology.DEAD_LETTERED_AT_HEADER: str(int(time.time()) - 3600),
            },
        ),
        mandatory=True,
    )


def test_a_letter_that_dry_runs_peek_past_the_limit_moves_to_the_overflow_queue(
    overflow_vhost: str, amqp: Any
) -> None:
    park(amqp, "peeked-too-often")
    dry_run = RedrivePlan(selection=RedriveFilter(reasons=frozenset({"poison"})), dry_run=True)

    listed = []
    for _ in range(LIMIT + 3):
        report = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
            dead_letter_queue(overflow_vhost), dry_run
        )
        listed.append(len(report.listed))
        if not report.listed:
            break
        unheld_depth(amqp, DLQ)  # the letter the run held is back, or moved on

    assert listed[-1] == 0, "the limit was reached: the letter left the DLQ"
    assert settled_depth(amqp, topology.OVERFLOW_QUEUE, 1) == 1, "not dropped: in the overflow"
    settled_empty(amqp, DLQ)
    method, properties, body = amqp.basic_get(topology.OVERFLOW_QUEUE, auto_ack=False)
    assert method.routing_key == DLQ, "its routing key names the queue it came from"
    assert body == b'{"note": "not child data"}'
    assert properties.message_id == "peeked-too-often"
    assert properties.type == "community.case.update"
    assert properties.correlation_id == "corr-1"
    headers = properties.headers
    assert headers["case-region"] == "north"
    assert headers["fabric-audience"] == "all"
    assert headers[topology.DEAD_LETTER_REASON_HEADER] == "poison"
    assert headers["x-death"][0]["queue"] == DLQ
    assert headers["x-death"][0]["reason"] == "delivery_limit"

    # The way back (docs/dead-letters.md): the redrive of the overflow queue puts it back in
    # its DLQ, then the redrive of the DLQ as usual.
    amqp.basic_nack(method.delivery_tag, requeue=True)
    back = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
        RabbitMqOverflowQueue(settings(overflow_vhost))
    )
    assert back.moved == 1
    assert settled_depth(amqp, DLQ, 1) == 1
    settled_empty(amqp, topology.OVERFLOW_QUEUE)
    moved = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
        dead_letter_queue(overflow_vhost)
    )
    assert moved.moved == 1
    method, properties, _ = amqp.basic_get(WORK, auto_ack=True)
    assert properties.message_id == "peeked-too-often"
    assert properties.headers["case-region"] == "north"
    assert properties.headers[topology.REDRIVES_HEADER] == "1"


@pytest.mark.parametrize(
    "queue",
    [
        topology.AUDIT_QUEUE,
        topology.UNROUTED_QUEUE,
        topology.dead_letter_queue_name(Stakeholder.GOVERNMENT, emergency=True),
    ],
)
def test_a_letter_handed_back_past_the_limit_of_any_terminal_queue_is_kept(
    amqp: Any, queue: str
) -> None:
    # What a failing audit writer (its event source gives the batch back) or an operator who
    # looks at messages and requeues them does.
    amqp.basic_publish(
        "",
        queue,
        b"batch",
        pika.BasicProperties(message_id=f"{queue}-1", delivery_mode=2),
        mandatory=True,
    )
    for _ in range(LIMIT + 3):
        assert unheld_depth(amqp, queue) in (0, 1)  # handed back, or moved on
        method, _, _ = amqp.basic_get(queue, auto_ack=False)
        if method is None:
            break
        amqp.basic_nack(method.delivery_tag, requeue=True)

    assert settled_depth(amqp, topology.OVERFLOW_QUEUE, 1) == 1
    settled_empty(amqp, queue)
    method, properties, body = amqp.basic_get(topology.OVERFLOW_QUEUE, auto_ack=True)
    assert (method.routing_key, properties.message_id, body) == (queue, f"{queue}-1", b"batch")
