"""Drain review: what a run takes from SQS while RabbitMQ cannot take it, and emergencies first.

The resource-alarm drill runs on a private node (never on the shared broker).
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pika
import pytest

from fabric.adapters.memory import MemoryAuditSink
from fabric.adapters.sns import HEADERS_ATTRIBUTE, MESSAGE_ID_ATTRIBUTE, TOPIC_ATTRIBUTE
from fabric.adapters.sqs import SqsFallbackSource
from fabric.drain import Drainer, FallbackQueue
from fabric.stakeholders import Stakeholder
from fabric.topology import queue_name
from tests.integration.aws_fallback import MOTO_POLL_S, REGION
from tests.integration.conftest import management
from tests.integration.private_node import PrivateNode, private_node
from tests.integration.test_broker_drills import apply, topology
from tests.integration.test_drain import (
    draining,
    fallback_queues,
    in_rabbitmq,
    left_in_sqs,
    message,
    park,
    rabbit,
    refuses_publishes,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    with private_node() as started:
        yield started


@pytest.fixture
def node_vhost(node: PrivateNode) -> Iterator[str]:
    name = f"fabric-drain-{uuid.uuid4().hex[:12]}"
    node.add_vhost(name)
    apply(node, name, topology(name))
    yield name
    node.delete_vhost(name)


def memory_alarm(node: PrivateNode) -> bool:
    return "memory" in node.ctl("eval", "rabbit_alarm:get_alarms().").stdout


def wait_for(condition: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(0.1)


def receive_counts(aws: dict[str, Any], url: str) -> list[str]:
    got = aws["sqs"].receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["ApproximateReceiveCount"]
    )
    return [m["Attributes"]["ApproximateReceiveCount"] for m in got.get("Messages", [])]


def test_under_a_resource_alarm_the_drain_receives_nothing_so_no_emergency_nears_its_dlq(
    aws: dict[str, Any], node: PrivateNode, node_vhost: str
) -> None:
    # A memory or disk alarm blocks a connection only once it publishes: a fresh connection
    # looks healthy. A drain that received before it knew counted a receive against its first
    # batch (the emergencies) every other run, and after ten (about 20 minutes of alarm) they
    # sat in the fallback DLQ, which nothing drains by itself.
    alert = message(Stakeholder.GOVERNMENT, emergency=True)
    park(aws, alert)
    drainer = draining(aws, rabbit(node_vhost, port=node.amqp_port))
    try:
        node.ctl("set_vm_memory_high_watermark", "0.000001")
        wait_for(lambda: memory_alarm(node), within=10, what="the memory alarm")
        reports = [drainer.drain() for _ in range(2)]
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4", check=False)
    wait_for(lambda: not memory_alarm(node), within=10, what="clearing the memory alarm")

    assert [(r.stopped, r.total) for r in reports] == [("broker unavailable", 0)] * 2
    url = aws["queues"][("emergency", Stakeholder.GOVERNMENT)]
    assert receive_counts(aws, url) == ["1"]  # this receive is its first

    aws["sqs"].purge_queue(QueueUrl=url)  # the receive above hid it; the alarm is over
    again = message(Stakeholder.GOVERNMENT, emergency=True)
    park(aws, again)
    after = drainer.drain()
    assert (after.stopped, after.total) == ("empty", 1)


def test_emergencies_are_drained_before_the_bulk_whatever_order_the_queues_are_given_in(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # fallback_queues lists the bulk queues first; a run with room for one message takes the
    # emergency, so a bulk backlog never holds an emergency back for a later run.
    bulk = message(Stakeholder.GOVERNMENT)
    alert = message(Stakeholder.GOVERNMENT, emergency=True)
    park(aws, bulk, alert)
    assert not fallback_queues(aws)[0].emergency

    report = draining(aws, rabbit(broker_vhost)).drain(max_messages=1)

    assert (report.stopped, report.moved) == (
        "message limit",
        {queue_name(Stakeholder.GOVERNMENT, emergency=True): 1},
    )
    assert in_rabbitmq(broker_vhost) == {
        queue_name(Stakeholder.GOVERNMENT, emergency=True): [alert.message_id]
    }
    assert left_in_sqs(aws) == 1


def test_a_full_work_queue_is_refused_once_and_its_subscription_dlq_is_left_alone(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # The fallback queue and its subscription's DLQ drain into the same work queue: once it
    # refused, a receive from the DLQ could only be refused too (and listed it a second time).
    management(
        "PUT",
        f"policies/{urllib.parse.quote(broker_vhost, safe='')}/full",
        {"pattern": "^fabric\\.academic$", "definition": {"max-length": 1}, "apply-to": "queues"},
    )
    deadline = time.monotonic() + 10
    while not refuses_publishes(broker_vhost, "fabric.academic"):  # the policy is in force
        assert time.monotonic() < deadline, "the policy was not applied"
        time.sleep(0.05)
    # Over its limit before the run, so that its first batch is refused (the bulk queues are
    # drained in turn: the DLQ's batch would go next). A quorum queue refuses publishes only
    # once it holds more than its limit: one at the limit still takes a whole burst.
    connection = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", virtual_host=broker_vhost)
    )
    channel = connection.channel()
    channel.confirm_delivery()
    for _ in range(2):
        channel.basic_publish("", "fabric.academic", b"{}", pika.BasicProperties(delivery_mode=2))
    connection.close()
    park(aws, *(message(Stakeholder.ACADEMIC) for _ in range(30)))
    sub_dlq = aws["sqs"].get_queue_url(QueueName="fabric-test-fallback-academic-sub-dlq")
    undelivered = [message(Stakeholder.ACADEMIC) for _ in range(3)]
    for item in undelivered:  # what SNS could not deliver, as delivered raw
        aws["sqs"].send_message(
            QueueUrl=sub_dlq["QueueUrl"],
            MessageBody=item.body.decode(),
            MessageAttributes={
                name: {"DataType": "String", "StringValue": value}
                for name, value in {
                    MESSAGE_ID_ATTRIBUTE: item.message_id,
                    TOPIC_ATTRIBUTE: item.topic,
                    HEADERS_ATTRIBUTE: json.dumps(item.headers),
                }.items()
            },
        )
    broker = rabbit(broker_vhost)
    drainer = Drainer(
        queues=[
            FallbackQueue(url=url, group=Stakeholder.ACADEMIC, emergency=False)
            for url in (aws["queues"][("fallback", Stakeholder.ACADEMIC)], sub_dlq["QueueUrl"])
        ],
        source=SqsFallbackSource(
            lambda: boto3.client("sqs", region_name=REGION), long_poll_s=MOTO_POLL_S
        ),
        broker=broker,
        audit=MemoryAuditSink(),
        connect=broker.connect,
    )

    report = drainer.drain()

    assert report.refused == ["fabric.academic"]
    counts = aws["sqs"].receive_message(
        QueueUrl=sub_dlq["QueueUrl"], MaxNumberOfMessages=10, AttributeNames=["All"]
    )["Messages"]
    assert sorted(m["Attributes"]["ApproximateReceiveCount"] for m in counts) == ["1"] * 3


def stalled(node: PrivateNode, vhost: str, queue: str, *, stall: bool) -> None:
    """Suspend (or resume) the Ra server of quorum queue ``queue``: it takes publishes and
    confirms none, as a quorum queue that lost its majority, while every other queue works."""
    node.ctl(
        "eval",
        f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"{vhost}">>, queue, <<"{queue}">>)),'
        f" {{Name, _}} = amqqueue:get_pid(Q), sys:{'suspend' if stall else 'resume'}(Name).",
    )


def arrived(node: PrivateNode, vhost: str, queue: str) -> list[str]:
    connection = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", node.amqp_port, virtual_host=vhost)
    )
    channel = connection.channel()
    found = []
    while True:
        method, properties, _body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        found.append(properties.message_id)
    connection.close()
    return found


def test_a_stalled_work_queue_keeps_only_its_own_messages_in_sqs_not_the_other_groups(
    aws: dict[str, Any], node: PrivateNode, node_vhost: str
) -> None:
    # government's emergency queue confirms nothing (its quorum lost the majority). Before,
    # the drain took its confirm timeout for a broker outage and ended every run there:
    # community's emergency and business's bulk, drained after it, waited in SQS as long as the
    # stall lasted (and government's first batch neared its DLQ by a receive each run).
    government = queue_name(Stakeholder.GOVERNMENT, emergency=True)
    alert, other_alert, bulk = (
        message(Stakeholder.GOVERNMENT, emergency=True),
        message(Stakeholder.COMMUNITY, emergency=True),
        message(Stakeholder.BUSINESS),
    )
    park(aws, alert, other_alert, bulk)
    url = aws["queues"][("emergency", Stakeholder.GOVERNMENT)]
    # What a run took comes back at once: only the run's own skipping keeps it from a second
    # receive.
    aws["sqs"].set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "0"})
    drainer = draining(aws, rabbit(node_vhost, port=node.amqp_port))
    stalled(node, node_vhost, government, stall=True)
    try:
        report = drainer.drain()
    finally:
        stalled(node, node_vhost, government, stall=False)

    assert (report.stopped, report.refused) == ("empty", [government])
    assert report.moved == {
        government: 0,
        queue_name(Stakeholder.COMMUNITY, emergency=True): 1,
        queue_name(Stakeholder.BUSINESS): 1,
    }
    assert arrived(node, node_vhost, queue_name(Stakeholder.COMMUNITY, emergency=True)) == [
        other_alert.message_id
    ]
    assert arrived(node, node_vhost, queue_name(Stakeholder.BUSINESS)) == [bulk.message_id]
    assert receive_counts(aws, url) == ["2"]  # the run's one receive, and this look

    # The queue works again: the next run moves its message (the publish that timed out may
    # have been stored meanwhile: then it arrives twice, with one message id).
    again = drainer.drain()
    assert (again.stopped, again.moved) == ("empty", {government: 1})
    assert set(arrived(node, node_vhost, government)) == {alert.message_id}


def test_the_emergency_queues_take_turns_so_one_groups_backlog_holds_no_other_back(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # Drained one queue after the other, a run with room for eleven took them all from
    # government's backlog, and community's emergency waited for a later run.
    backlog = [message(Stakeholder.GOVERNMENT, emergency=True) for _ in range(25)]
    alert = message(Stakeholder.COMMUNITY, emergency=True)
    park(aws, *backlog, alert)

    report = draining(aws, rabbit(broker_vhost)).drain(max_messages=11)

    community = queue_name(Stakeholder.COMMUNITY, emergency=True)
    assert (report.stopped, report.moved) == (
        "message limit",
        {queue_name(Stakeholder.GOVERNMENT, emergency=True): 10, community: 1},
    )
    assert in_rabbitmq(broker_vhost)[community] == [alert.message_id]
    assert left_in_sqs(aws) == 15
