"""Redrive benchmark: RabbitMQ DLQ → its work queue, through the production redrive path.

``redrive_msgs_per_s``: 20,000 parked 1 KiB letters moved by ``fabric.redrive.Redriver`` with the
RabbitMQ DLQ adapter (basic.get, confirmed republish, ack) and the DynamoDB ledger, the table in
moto in-process (real DynamoDB answers in single-digit ms a batch; moto costs about as much).
``redrive_broker_bound_msgs_per_s``: the same run with an in-memory ledger, same run and host, to
show how much of the time is the broker side.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from bench_router import fabric_vhost, purge, raw_publish

Figure = tuple[str, float, str]


def _dynamodb_ledger() -> Any:
    import boto3

    from fabric.adapters.dynamodb_ledger import DynamoDbRedriveLedger

    client = boto3.client("dynamodb", region_name="ap-southeast-3")
    client.create_table(
        TableName="bench-idempotency",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return DynamoDbRedriveLedger("bench-idempotency", lambda: client)


def _one_run(vhost: str, ledger: Any, count: int) -> float:
    from fabric import topology
    from fabric.adapters.memory import MemoryAuditSink
    from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
    from fabric.adapters.rabbitmq_dlq import RabbitMqDeadLetterQueue
    from fabric.bootstrap import exchange_for
    from fabric.redrive import RedrivePlan, Redriver
    from fabric.stakeholders import Stakeholder

    group = Stakeholder.COMMUNITY
    dlq = topology.dead_letter_queue_name(group)
    raw_publish(
        vhost,
        exchange=topology.retry_exchange_name(group),
        routing_key=dlq,
        bodies=[b"x" * 1024] * count,
        headers={topology.DEAD_LETTER_REASON_HEADER: "max-attempts", "fabric-audience": "all"},
    )
    settings = RabbitSettings("127.0.0.1", 5672, lambda: ("guest", "guest"), vhost=vhost)
    queue = RabbitMqDeadLetterQueue(
        settings, dlq, origin=RabbitMqTransport(settings, exchange_for=exchange_for)
    )
    started = time.perf_counter()
    report = Redriver(ledger=ledger, audit=MemoryAuditSink()).run(
        queue, RedrivePlan(max_messages=count)
    )
    elapsed = time.perf_counter() - started
    if report.moved != count:
        raise RuntimeError(f"redrive moved {report.moved} of {count}: {report.stopped}")
    purge(vhost, [topology.queue_name(group)])
    return count / elapsed


def bench_redrive(count: int = 20_000) -> Iterator[Figure]:
    """Both ledgers in one run, each on a freshly parked DLQ."""
    from moto import mock_aws

    from fabric.adapters.memory import MemoryRedriveLedger

    with fabric_vhost() as vhost, mock_aws():
        yield "redrive_msgs_per_s", _one_run(vhost, _dynamodb_ledger(), count), "msg/s"
        yield (
            "redrive_broker_bound_msgs_per_s",
            _one_run(vhost, MemoryRedriveLedger(), count),
            "msg/s",
        )


BENCHMARKS: dict[str, Callable[[], Iterator[Figure]]] = {"redrive": bench_redrive}
