"""An emergency parked while the drain is busy with bulk reaches RabbitMQ in that run, at once."""

from __future__ import annotations

import threading
import time
from typing import Any

import boto3
import pika
import pytest

from fabric.adapters.memory import MemoryAuditSink
from fabric.adapters.sqs import SqsFallbackSource
from fabric.drain import RECHECK_SECONDS, Drainer, DrainReport, FallbackQueue
from fabric.stakeholders import STAKEHOLDERS, Stakeholder
from fabric.topology import queue_name
from tests.integration.aws_fallback import MOTO_POLL_S, REGION
from tests.integration.conftest import AMQP
from tests.integration.test_drain import fallback_queues, left_in_sqs, message, park, rabbit

pytestmark = pytest.mark.integration

BULK_GROUP = STAKEHOLDERS[0]  # its bulk queue is drained first, right after the emergencies
BULK_MESSAGES = 300  # moto takes seconds over them: a look is due several times


def with_subscription_dlqs(aws: dict[str, Any]) -> list[FallbackQueue]:
    """The fallback queues and their subscriptions' DLQs, as the stack hands them to the drain:
    each emergency look asks ten queues."""
    queues = fallback_queues(aws)
    return queues + [
        FallbackQueue(
            url=aws["sqs"].get_queue_url(QueueName=queue.url.rsplit("/", 1)[1] + "-sub-dlq")[
                "QueueUrl"
            ],
            group=queue.group,
            emergency=queue.emergency,
        )
        for queue in queues
    ]


def test_an_emergency_parked_mid_bulk_reaches_its_work_queue_before_the_bulk_drain_ends(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # Before, an emergency that reached its fallback queue while a run was on bulk (up to 240 s)
    # waited for the next run; now the run looks again about once a second.
    bulk = [message(BULK_GROUP) for _ in range(BULK_MESSAGES)]
    park(aws, *bulk)
    broker = rabbit(broker_vhost)
    drainer = Drainer(
        queues=with_subscription_dlqs(aws),
        source=SqsFallbackSource(
            lambda: boto3.client("sqs", region_name=REGION), long_poll_s=MOTO_POLL_S
        ),
        broker=broker,
        audit=MemoryAuditSink(),
        connect=broker.connect,
    )
    reports: list[DrainReport] = []
    run = threading.Thread(target=lambda: reports.append(drainer.drain()))
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(*AMQP, virtual_host=broker_vhost)
    )
    channel = connection.channel()
    bulk_queue, emergency_queue = (
        queue_name(BULK_GROUP),
        queue_name(Stakeholder.GOVERNMENT, emergency=True),
    )

    def waiting(queue: str) -> int:
        return int(channel.queue_declare(queue, passive=True).method.message_count)

    run.start()
    try:
        deadline = time.monotonic() + 30
        while waiting(bulk_queue) < 20:  # the run is past the emergencies, on the bulk
            assert time.monotonic() < deadline, "the drain did not start on the bulk"
            time.sleep(0.02)
        alert = message(Stakeholder.GOVERNMENT, emergency=True)
        park(aws, alert)
        parked_at = time.monotonic()
        arrived = None
        while arrived is None and run.is_alive():
            method, properties, _ = channel.basic_get(emergency_queue, auto_ack=True)
            arrived = properties.message_id if method is not None else None
            time.sleep(0.01)
        waited = time.monotonic() - parked_at
        bulk_by_then = waiting(bulk_queue)
    finally:
        run.join(timeout=300)
        connection.close()

    assert arrived == alert.message_id, "the emergency waited for the next run"
    assert bulk_by_then < BULK_MESSAGES  # the bulk was not finished when it arrived
    # A look is due a second after the last one; then one bulk batch, and moto's slow receives
    # of the deep bulk queue (it scans the whole queue each time).
    assert waited < RECHECK_SECONDS + 2
    [report] = reports
    assert (report.stopped, report.moved, report.left) == (
        "empty",
        {bulk_queue: BULK_MESSAGES, emergency_queue: 1},
        0,
    )
    assert left_in_sqs(aws) == 0
