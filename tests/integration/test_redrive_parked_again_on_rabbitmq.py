"""One runbook redrive in several chunks, on the real local RabbitMQ with the redrive function
wired as deployed (moto for its secret and ledger, its audit records on the broker) and a real
consumer toolkit that still parks every message as poison: each letter goes back once, and the
command says how many were parked again, instead of sending them round once per chunk. And a
message dead-lettered twice, far apart in its DLQ: both copies go back."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from fabric import topology
from fabric.adapters.rabbitmq import RabbitSettings
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
from fabric.audit import decode_audit_batch
from fabric.consumer import Delivery, MessageProcessor, Poison
from fabric.redrive import RedrivePlan, parse_request
from fabric.stakeholders import Stakeholder
from scripts import runbook
from tests.integration.conftest import AMQP, GUEST
from tests.integration.queue_waits import settled_depth, settled_empty, unheld_depth
from tests.integration.test_overflow_redrive import (
    connect,
    deployed_redrive,
    moto_aws,  # noqa: F401 (a fixture)
)
from tests.message_ids import msg_id

pytestmark = pytest.mark.integration

GROUP = Stakeholder.COMMUNITY
WORK = topology.queue_name(GROUP)
DLQ = topology.dead_letter_queue_name(GROUP)


@pytest.fixture
def amqp(broker_vhost: str) -> Iterator[Any]:
    channel = connect(broker_vhost)
    yield channel
    channel.connection.close()


def park(channel: Any, message_id: str, *, at: int, reason: str = "poison") -> None:
    """A dead letter as the consumer toolkit parks it, dead-lettered at ``at`` (epoch s)."""
    channel.basic_publish(
        topology.retry_exchange_name(GROUP),
        DLQ,
        b'{"note": "not child data"}',
        pika.BasicProperties(
            message_id=message_id,
            type="community.update",
            delivery_mode=2,
            headers={
                "fabric-audience": "all",
                topology.DEAD_LETTER_REASON_HEADER: reason,
                topology.DEAD_LETTERED_AT_HEADER: str(at),
            },
        ),
        mandatory=True,
    )


def redriven_ids(channel: Any) -> Counter[str]:
    """The message ids of the ``redriven`` records on the broker's audit queue."""
    ids: Counter[str] = Counter()
    while (got := channel.basic_get(topology.AUDIT_QUEUE, auto_ack=True))[0] is not None:
        for record in decode_audit_batch(got[2]).records:
            if record["event"] == "redriven":
                ids[record["message_id"]] += 1
    return ids


class DeployedFunction:
    """Lambda's invoke, running the redrive function's code in-process; between two
    invocations it waits until the DLQ holds ``settled`` letters again (each one a chunk moved
    parked again by the consumer)."""

    def __init__(self, runtime: Any, channel: Any, settled: int) -> None:
        self.runtime, self.channel, self.settled = runtime, channel, settled
        self.events: list[dict[str, Any]] = []

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
        event = json.loads(Payload)
        self.events.append(event)
        request = parse_request(event, max_seconds=60)
        report = self.runtime.redriver.run(
            self.runtime.queue(request.source, request.queue), request.plan
        )
        settled_depth(self.channel, DLQ, self.settled, timeout=15)
        return {"Payload": io.BytesIO(json.dumps(report.to_dict()).encode())}


def test_a_chunked_redrive_moves_each_poison_letter_once_and_reports_those_parked_again(
    broker_vhost: str,
    amqp: Any,
    moto_aws: None,  # noqa: F811
) -> None:
    # Before: each chunk was a redrive of its own, and each met the copies the consumer had
    # parked again after the chunks before it and moved them again: 8 letters in chunks of 3
    # with --max-messages 40 made 40 moves (each letter about five times), 40 "redriven"
    # records, "summary: moved 40", exit 0.
    ids = [msg_id(f"poison-{i}") for i in range(8)]
    for message_id in ids:
        park(amqp, message_id, at=int(time.time()) - 3600)
    runtime = deployed_redrive(broker_vhost)
    handled: list[str] = []

    def still_poison(delivery: Delivery) -> None:
        handled.append(delivery.message_id)
        raise Poison("still cannot be parsed")

    settings = RabbitSettings(
        host=AMQP[0], port=AMQP[1], credentials=lambda: GUEST, vhost=broker_vhost
    )
    consumer = RabbitMqConsumer(settings, WORK, MessageProcessor(still_poison))
    stop = threading.Event()
    worker = threading.Thread(target=lambda: consumer.run(stop=stop, idle_timeout_s=120))
    worker.start()
    function, out = DeployedFunction(runtime, amqp, settled=len(ids)), io.StringIO()
    try:
        status = runbook.redrive(
            "test",
            client={"lambda": function}.__getitem__,
            request={"source": "rabbitmq", "queue": DLQ, "max_messages": 40},
            chunk=3,
            out=out,
        )
    finally:
        stop.set()
        worker.join(10)
    output = out.getvalue()

    assert status == 1
    assert Counter(handled) == dict.fromkeys(ids, 1), "each letter went back once"
    assert redriven_ids(amqp) == dict.fromkeys(ids, 1), "one redriven record each"
    assert len(function.events) == 3
    assert len({event["redrive_id"] for event in function.events}) == 1
    # The first chunk met none (its letters came back after it looked), the second the first
    # chunk's 3, the last the 6 of the chunks before it, and its own 2 if they came back
    # before it looked again.
    parked = re.search(
        r"(\d+) letter\(s\) were parked again while this redrive ran: the cause is not fixed",
        output,
    )
    assert parked is not None, output
    assert 6 <= int(parked.group(1)) <= 8
    assert "summary: moved 8, stopped: parked again" in output
    assert unheld_depth(amqp, DLQ) == 8, "the copies parked again stay in the DLQ"
    settled_empty(amqp, WORK)


def test_a_message_dead_lettered_twice_far_apart_goes_back_twice(
    broker_vhost: str,
    amqp: Any,
    moto_aws: None,  # noqa: F811
) -> None:
    # A consumer that parked a message and died before its acknowledgement parks it again with
    # a later time: both copies go back (same message id, consumers deduplicate). Before, the
    # run skipped the second copy when it was more than a batch (100 letters) behind the first,
    # counted it nowhere and reported "empty" with it still in the DLQ.
    now = int(time.time())
    twice = msg_id("twice")
    park(amqp, twice, at=now - 300, reason="max-attempts")
    for i in range(120):
        park(amqp, msg_id(f"other-{i}"), at=now - 200, reason="max-attempts")
    park(amqp, twice, at=now - 100, reason="max-attempts")
    runtime = deployed_redrive(broker_vhost)

    report = runtime.redriver.run(runtime.queue("rabbitmq", DLQ), RedrivePlan())

    assert report.moved == 122
    assert (report.parked_again, report.stopped) == (0, "empty")
    settled_empty(amqp, DLQ)
    arrived: Counter[str] = Counter()
    while (got := amqp.basic_get(WORK, auto_ack=True))[0] is not None:
        arrived[got[1].message_id] += 1
    assert arrived[twice] == 2
    assert sum(arrived.values()) == 122
