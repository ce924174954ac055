"""Failover drills through a fault-injecting proxy: nothing lost, no false acknowledgment.

Never touches the shared broker's configuration: faults happen in the proxy between the router
and the broker. Every drill checks that each accepted message id is in RabbitMQ or in the
fallback queues (lost = 0), and that nothing was accepted that is in neither.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pika
import pytest

from fabric.adapters.memory import MemoryAuditSink
from fabric.adapters.memory_cipher import LocalCipher
from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.adapters.sns import SnsFallbackTransport
from fabric.bootstrap import exchange_for
from fabric.breaker import BreakerTransport, State
from fabric.router import Router
from fabric.routing import default_routing_table
from fabric.stakeholders import STAKEHOLDERS
from fabric.topology import queue_name
from tests.integration.aws_fallback import bootstrapped_router
from tests.integration.conftest import AMQP, REGION
from tests.integration.faults import FaultProxy

pytestmark = pytest.mark.integration
HEARTBEAT = 10


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    faults = FaultProxy(AMQP)
    yield faults
    faults.close()


def router(vhost: str, proxy: FaultProxy, aws: dict[str, Any], sns_url: str | None = None) -> Any:
    rabbit = RabbitMqTransport(
        RabbitSettings(
            "127.0.0.1",
            proxy.port,
            lambda: ("guest", "guest"),
            vhost=vhost,
            heartbeat=HEARTBEAT,
            connect_timeout=1.0,
        ),
        exchange_for=exchange_for,
    )
    fallback = SnsFallbackTransport(
        fallback_topic_arn=aws["topics"]["fallback"],
        emergency_topic_arn=aws["topics"]["emergency"],
        client_factory=lambda: boto3.client("sns", region_name=REGION, endpoint_url=sns_url),
    )
    breaker = BreakerTransport(rabbit, open_seconds=5)
    built = Router(
        table=default_routing_table(),
        transports=[breaker, fallback],
        cipher=LocalCipher(),
        audit=MemoryAuditSink(),
        environment="test",
    )
    return built, breaker


def alert() -> dict[str, Any]:
    return {
        "message_id": str(uuid.uuid4()),
        "topic": "child-safety.incident.reported",
        "priority": "emergency",
        "classification": "restricted",
        "payload": {"summary": "drill"},
    }


def donation() -> dict[str, Any]:
    return {"message_id": str(uuid.uuid4()), "topic": "donation.pledge.received", "payload": {}}


def stored_everywhere(vhost: str, aws: dict[str, Any]) -> set[str]:
    """Every message id on the broker's group queues or in the fallback queues."""
    found: set[str] = set()
    connection = pika.BlockingConnection(pika.ConnectionParameters(*AMQP, virtual_host=vhost))
    channel = connection.channel()
    for group in STAKEHOLDERS:
        for emergency in (False, True):
            while True:
                method, properties, _ = channel.basic_get(
                    queue_name(group, emergency=emergency), auto_ack=True
                )
                if method is None:
                    break
                found.add(properties.message_id)
    connection.close()
    for url in aws["queues"].values():
        while True:
            messages = (
                aws["sqs"].receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
            )
            if not messages:
                break
            found.update(json.loads(m["Body"])["message_id"] for m in messages)
    return found


def accepted(results: Any) -> dict[str, str]:
    return {r.message_id: r.transport for r in results if r.status == "accepted"}


def test_a_silent_black_hole_fails_over_within_twice_the_heartbeat_plus_a_second(
    broker_vhost: str, proxy: FaultProxy, aws: dict[str, Any]
) -> None:
    fabric, breaker = router(broker_vhost, proxy, aws)
    first = fabric.route([alert()], source="community").results
    assert first[0].transport == "rabbitmq"
    proxy.blackhole()
    started = time.monotonic()
    during = fabric.route([alert()], source="community").results
    elapsed = time.monotonic() - started
    assert (during[0].status, during[0].transport) == ("accepted", "fallback")
    assert elapsed < 2 * HEARTBEAT + 1
    # Both of the alert's queues had just stored: one stuck queue could explain that timeout, so
    # it opened nothing; the next call's reconnect finds nothing answering, which opens all.
    after = fabric.route([alert()], source="community").results
    assert after[0].transport == "fallback"
    assert breaker.state is State.OPEN
    started = time.monotonic()
    later = fabric.route([alert()], source="community").results
    assert later[0].transport == "fallback"
    assert time.monotonic() - started < 0.5, "open: straight to the fallback"
    proxy.restore()
    ids = accepted([*first, *during, *after, *later])
    assert set(ids) <= stored_everywhere(broker_vhost, aws)


def test_connections_closed_during_a_burst_lose_nothing(
    broker_vhost: str, proxy: FaultProxy, aws: dict[str, Any]
) -> None:
    fabric, _ = router(broker_vhost, proxy, aws)
    results = []
    killer = threading.Timer(0.15, proxy.reset)
    killer.start()
    for _ in range(10):
        results.extend(fabric.route([donation() for _ in range(200)], source="business").results)
    killer.join()
    ids = accepted(results)
    assert len(ids) == 2000  # every message stored somewhere: none rejected
    assert set(ids) <= stored_everywhere(broker_vhost, aws)


def test_with_broker_and_fallback_both_down_nothing_is_acknowledged(
    broker_vhost: str, proxy: FaultProxy, aws: dict[str, Any]
) -> None:
    fabric, _ = router(broker_vhost, proxy, aws, sns_url="http://127.0.0.1:1")
    proxy.refuse()
    results = fabric.route([alert(), donation()], source="community").results
    assert [(r.status, r.reason) for r in results] == [("rejected", "unavailable")] * 2
    proxy.restore()
    assert stored_everywhere(broker_vhost, aws) == set()


def test_while_the_circuit_is_open_neither_messages_nor_audit_batches_wait_for_the_broker(
    proxy: FaultProxy, aws: dict[str, Any]
) -> None:
    fabric = bootstrapped_router(aws, port=proxy.port)
    proxy.refuse()
    first = fabric.route([alert()], source="community").results
    assert (first[0].status, first[0].transport) == ("accepted", "fallback")
    tried = proxy.attempts
    assert tried >= 1
    during = fabric.route([alert(), donation()], source="community").results
    assert [(r.status, r.transport) for r in during] == [("accepted", "fallback")] * 2
    assert proxy.attempts == tried  # no connect for the messages, none for their audit batch


def test_audit_batches_of_an_outage_go_to_the_sqs_audit_queue(
    proxy: FaultProxy, aws: dict[str, Any]
) -> None:
    from fabric.audit import decode_audit_batch

    sqs = boto3.client("sqs", region_name=REGION)
    audit_queue = sqs.create_queue(QueueName="fabric-test-audit")["QueueUrl"]
    fabric = bootstrapped_router(aws, port=proxy.port, audit_queue_url=audit_queue)
    proxy.refuse()
    sent = alert()
    result = fabric.route([sent], source="community").results[0]
    assert (result.status, result.transport) == ("accepted", "fallback")

    (message,) = sqs.receive_message(QueueUrl=audit_queue, MaxNumberOfMessages=10)["Messages"]
    batch = decode_audit_batch(message["Body"].encode())
    record, fallback = batch.records
    assert (record["event"], record["message_id"]) == ("accepted", sent["message_id"])
    assert record["transport"] == "fallback"
    assert record["emitted_by"] == "router"
    # Why it took the fallback path, and the stored bytes for the archive.
    assert (fallback["event"], fallback["reason"]) == ("fallback", "unavailable")
    assert list(batch.bodies) == [record["body_sha256"]]
