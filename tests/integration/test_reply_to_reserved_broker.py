"""A reply_to RabbitMQ reserves (``amq.``) on the real broker: the router refuses it, and a
message stored with one before (fallback queue, archive, dead-letter queue) still moves.

Published as the reply-to property, ``amq.rabbitmq.reply-to`` (RabbitMQ's direct reply-to) has
the broker close the publishing channel: every message in flight beside it went to the fallback
path, and the drain stopped at it on every run ("broker unavailable"), moving nothing.
"""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import Any

import pika
import pytest

from fabric import topology
from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.ports import OutboundMessage
from fabric.redrive import Redriver
from fabric.stakeholders import Stakeholder
from tests.integration.conftest import AMQP
from tests.integration.test_dead_letters import DLQ, WORK, amqp, dead_letter_queue  # noqa: F401
from tests.integration.test_drain import draining, in_rabbitmq, left_in_sqs, message, park, rabbit
from tests.integration.test_router_on_rabbitmq import FUNCTION, fabric, invoke  # noqa: F401

pytestmark = pytest.mark.integration
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def envelope(**fields: Any) -> dict[str, Any]:
    return {"message_id": str(uuid.uuid4()), "topic": "donation.received", "payload": 1, **fields}


def outcomes(answer: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(r["status"], r.get("transport") or r.get("reason")) for r in answer["results"]]


def test_the_router_refuses_a_reserved_reply_to_and_routes_the_rest_on_rabbitmq(
    fabric: SimpleNamespace,  # noqa: F811
) -> None:
    batch = [
        envelope(),
        envelope(reply_to=DIRECT_REPLY_TO),
        envelope(reply_to="amq.gen-JzTY20BRgKO-HjmUJj0wLg"),
        envelope(reply_to="fabric.community"),
    ]

    answer = invoke(fabric, {"messages": batch}, f"{FUNCTION}:community")
    later = invoke(fabric, {"messages": [envelope()]}, f"{FUNCTION}:business")

    assert outcomes(answer) == [
        ("accepted", "rabbitmq"),
        ("rejected", "invalid_field_type"),
        ("rejected", "invalid_field_type"),
        ("accepted", "rabbitmq"),
    ]
    assert "amq." in answer["results"][1]["detail"]
    assert outcomes(later) == [("accepted", "rabbitmq")]  # the broker path stayed up


def stored_with_direct_reply_to() -> OutboundMessage:
    """A message the router accepted on the fallback path before it refused such a reply_to."""
    message_id = str(uuid.uuid4())
    body = json.dumps(
        {"message_id": message_id, "topic": "donation.received", "reply_to": DIRECT_REPLY_TO}
    ).encode()
    return OutboundMessage(
        message_id,
        "donation.received",
        body,
        frozenset({Stakeholder.BUSINESS}),
        headers={"fabric-audience": "all"},
        reply_to=DIRECT_REPLY_TO,
    )


def test_the_drain_moves_a_stored_message_with_a_reserved_reply_to_and_the_rest(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    poisoned = stored_with_direct_reply_to()
    others = [message(Stakeholder.BUSINESS) for _ in range(3)]
    park(aws, poisoned, *others)

    report = draining(aws, rabbit(broker_vhost)).drain()

    assert (report.total, report.stopped) == (4, "empty")
    assert left_in_sqs(aws) == 0
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(*AMQP, virtual_host=broker_vhost)
    )
    channel = connection.channel()
    arrived = {}
    while (got := channel.basic_get("fabric.business", auto_ack=True))[0] is not None:
        _, properties, body = got
        arrived[properties.message_id] = (properties.reply_to, body)
    connection.close()
    assert sorted(arrived) == sorted([poisoned.message_id, *(m.message_id for m in others)])
    # The property is left off; the body, which consumers read, is the stored one.
    assert arrived[poisoned.message_id] == (None, poisoned.body)
    assert in_rabbitmq(broker_vhost) == {}


def test_a_transport_publish_of_a_reserved_reply_to_is_stored_without_it(
    broker_vhost: str,
) -> None:
    # The replay and the redrive publish stored messages through this transport, with their
    # reply_to: a message archived or dead-lettered with the direct reply-to still moves.
    transport = rabbit(broker_vhost)
    messages = [
        OutboundMessage(
            str(uuid.uuid4()),
            "donation.received",
            b"{}",
            frozenset({Stakeholder.BUSINESS}),
            headers={"fabric-audience": "all"},
            redeliver_to="fabric.business",
            reply_to=reply_to,
        )
        for reply_to in (None, DIRECT_REPLY_TO, "fabric.business")
    ]

    stored = [outcome.stored for outcome in transport.publish(messages)]
    again = transport.publish(messages[:1])

    assert stored == [True, True, True]
    assert again[0].stored  # the same connection and channel still publish
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(*AMQP, virtual_host=broker_vhost)
    )
    channel = connection.channel()
    replies = []
    while (got := channel.basic_get("fabric.business", auto_ack=True))[0] is not None:
        replies.append(got[1].reply_to)
    connection.close()
    assert replies == [None, None, "fabric.business", None]


def test_a_redriven_letter_with_a_reserved_reply_to_moves_without_it(
    broker_vhost: str,
    amqp: Any,  # noqa: F811
) -> None:
    # The broker stores a direct reply-to as "amq.rabbitmq.reply-to.<suffix>", which it takes
    # back without complaint; the redrive leaves it off all the same (an amq. name is never a
    # fabric address), and moves the letter.
    amqp.basic_publish(
        topology.retry_exchange_name(Stakeholder.COMMUNITY),
        DLQ,
        b"{}",
        pika.BasicProperties(
            message_id="reserved-reply",
            type="community.update",
            correlation_id="case-7",
            reply_to=f"{DIRECT_REPLY_TO}.g1h2AA",
            delivery_mode=2,
            headers={"fabric-audience": "all", topology.DEAD_LETTER_REASON_HEADER: "poison"},
        ),
        mandatory=True,
    )

    report = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
        dead_letter_queue(broker_vhost)
    )

    assert report.moved == 1
    _, properties, _ = amqp.basic_get(WORK, auto_ack=True)
    assert (properties.message_id, properties.correlation_id, properties.reply_to) == (
        "reserved-reply",
        "case-7",
        None,
    )
