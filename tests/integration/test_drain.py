"""The drain on moto SQS and the real RabbitMQ: each copy to its own queue once, deleted after."""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from typing import Any

import boto3
import pika
import pytest

from fabric.adapters.memory import MemoryAuditSink
from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.adapters.sns import (
    HEADERS_ATTRIBUTE,
    MESSAGE_ID_ATTRIBUTE,
    TOPIC_ATTRIBUTE,
    SnsFallbackTransport,
)
from fabric.adapters.sqs import SqsFallbackSource
from fabric.bootstrap import exchange_for
from fabric.drain import Drainer, FallbackQueue
from fabric.ports import OutboundMessage
from fabric.stakeholders import STAKEHOLDERS, Stakeholder
from fabric.topology import queue_name
from tests.integration.aws_fallback import MOTO_POLL_S, REGION
from tests.integration.conftest import AMQP, management

pytestmark = pytest.mark.integration


def rabbit(vhost: str, port: int = AMQP[1]) -> RabbitMqTransport:
    settings = RabbitSettings(
        AMQP[0], port, lambda: ("guest", "guest"), vhost=vhost, connect_timeout=0.5
    )
    return RabbitMqTransport(settings, exchange_for=exchange_for)


def fallback_queues(aws: dict[str, Any]) -> list[FallbackQueue]:
    return [
        FallbackQueue(url=aws["queues"][(flow, group)], group=group, emergency=flow == "emergency")
        for flow in ("fallback", "emergency")
        for group in STAKEHOLDERS
    ]


def draining(
    aws: dict[str, Any],
    broker: RabbitMqTransport,
    audit: MemoryAuditSink | None = None,
    *,
    probe: bool = True,
) -> Drainer:
    """The drain of the fallback queues into ``broker``; ``probe``: it connects before it
    receives, as bootstrap wires it."""
    return Drainer(
        queues=fallback_queues(aws),
        source=SqsFallbackSource(
            lambda: boto3.client("sqs", region_name=REGION), long_poll_s=MOTO_POLL_S
        ),
        broker=broker,
        audit=audit or MemoryAuditSink(),
        connect=broker.connect if probe else None,
    )


PARK_SLICE = 50


def park(aws: dict[str, Any], *messages: OutboundMessage) -> None:
    """Park ``messages`` in the fallback queues as the router's fallback does, through SNS: in
    calls of at most ``PARK_SLICE``, each well inside the transport's budget even on a loaded
    host, where moto stores a message in tens of milliseconds (400 in one call outlast it)."""
    sender = SnsFallbackTransport(
        fallback_topic_arn=aws["topics"]["fallback"],
        emergency_topic_arn=aws["topics"]["emergency"],
        client_factory=lambda: boto3.client("sns", region_name=REGION),
    )
    for start in range(0, len(messages), PARK_SLICE):
        outcomes = sender.publish(list(messages[start : start + PARK_SLICE]))
        assert all(o.stored for o in outcomes), (
            "not parked: "
            + ", ".join(f"{o.message_id} {o.failure}" for o in outcomes if not o.stored)[:500]
        )


def message(*groups: Stakeholder, emergency: bool = False) -> OutboundMessage:
    message_id = str(uuid.uuid4())
    body = json.dumps({"message_id": message_id, "topic": "donation.received"}).encode()
    return OutboundMessage(
        message_id,
        "donation.received",
        body,
        frozenset(groups),
        emergency=emergency,
        headers={"fabric-audience": "all"},
    )


def in_rabbitmq(vhost: str) -> dict[str, list[str]]:
    connection = pika.BlockingConnection(pika.ConnectionParameters(*AMQP, virtual_host=vhost))
    channel = connection.channel()
    found: dict[str, list[str]] = {}
    for group in STAKEHOLDERS:
        for emergency in (False, True):
            queue = queue_name(group, emergency=emergency)
            while True:
                method, properties, _body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                found.setdefault(queue, []).append(properties.message_id)
    connection.close()
    return found


def left_in_sqs(aws: dict[str, Any]) -> int:
    total = 0
    for url in aws["queues"].values():
        attributes = aws["sqs"].get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        total += sum(int(v) for v in attributes.values())
    return total


def test_each_copy_goes_back_to_its_own_group_queue_once_then_leaves_sqs(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    both = message(Stakeholder.BUSINESS, Stakeholder.COMMUNITY)
    alarm = message(Stakeholder.GOVERNMENT, emergency=True)
    park(aws, both, alarm)
    audit = MemoryAuditSink()
    drainer = draining(aws, rabbit(broker_vhost), audit, probe=False)
    report = drainer.drain()
    assert report.total == 3
    assert report.stopped == "empty"
    assert in_rabbitmq(broker_vhost) == {
        "fabric.business": [both.message_id],
        "fabric.community": [both.message_id],
        "fabric.government.emergency": [alarm.message_id],
    }
    assert left_in_sqs(aws) == 0
    assert sorted(str(r.message_id) for r in audit.records) == sorted(
        [both.message_id, both.message_id, alarm.message_id]
    )
    assert drainer.drain().total == 0


def test_nothing_leaves_sqs_while_the_broker_cannot_confirm(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    park(aws, message(Stakeholder.MEDIA), message(Stakeholder.ACADEMIC))
    drainer = draining(aws, rabbit(broker_vhost, port=1), probe=False)
    report = drainer.drain()
    assert report.total == 0
    assert report.stopped == "broker unavailable"
    assert left_in_sqs(aws) == 2


def test_with_the_broker_down_the_drain_receives_nothing_so_no_message_nears_its_dlq(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # Every receive counts towards the fallback queues' redrive policy (10, then the DLQ): a
    # drain that received first would park messages after about 20 minutes of outage.
    park(aws, message(Stakeholder.MEDIA), message(Stakeholder.ACADEMIC))
    down = rabbit(broker_vhost, port=1)
    drainer = draining(aws, down)

    reports = [drainer.drain() for _ in range(3)]

    assert [r.stopped for r in reports] == ["broker unavailable"] * 3
    counts = []
    for group in (Stakeholder.MEDIA, Stakeholder.ACADEMIC):
        (got,) = aws["sqs"].receive_message(
            QueueUrl=aws["queues"][("fallback", group)], AttributeNames=["All"]
        )["Messages"]
        counts.append(got["Attributes"]["ApproximateReceiveCount"])
    assert counts == ["1", "1"]  # this receive is each message's first


def refuses_publishes(vhost: str, queue: str) -> bool:
    """Whether ``queue`` nacks one of a few confirmed publishes (reject-publish at its max
    length); it is left empty either way."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(*AMQP, virtual_host=vhost))
    channel = connection.channel()
    channel.confirm_delivery()
    try:
        for _ in range(5):
            channel.basic_publish("", queue, b"probe", mandatory=True)
    except pika.exceptions.NackError:
        return True
    finally:
        channel.queue_purge(queue)
        connection.close()
    return False


def test_a_full_group_queue_stops_its_own_drain_not_the_other_groups(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # academic's work queue is full after about one message (a policy in the test's vhost): its
    # refusals must not keep government's messages, drained after it, in SQS.
    management(
        "PUT",
        f"policies/{urllib.parse.quote(broker_vhost, safe='')}/full",
        {"pattern": "^fabric\\.academic$", "definition": {"max-length": 1}, "apply-to": "queues"},
    )
    # Applied once the queue refuses a publish (within milliseconds; the management API's
    # "policy" field shows it only with the next statistics, up to seconds later).
    deadline = time.monotonic() + 10
    while not refuses_publishes(broker_vhost, "fabric.academic"):
        assert time.monotonic() < deadline, "the policy was not applied"
        time.sleep(0.05)
    academic = [message(Stakeholder.ACADEMIC) for _ in range(30)]
    government = [message(Stakeholder.GOVERNMENT) for _ in range(2)]
    park(aws, *academic, *government)
    broker = rabbit(broker_vhost)
    drainer = draining(aws, broker)

    report = drainer.drain()

    assert report.refused == ["fabric.academic"]
    assert report.moved["fabric.government"] == 2
    moved = report.moved["fabric.academic"]
    assert moved < len(academic)  # a quorum queue takes a burst in flight before it refuses
    found = in_rabbitmq(broker_vhost)
    assert sorted(found["fabric.government"]) == sorted(m.message_id for m in government)
    assert len(found["fabric.academic"]) == moved
    assert left_in_sqs(aws) == len(academic) - moved  # they wait in SQS for room


def test_correlation_id_and_reply_to_come_back_as_amqp_properties(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # The router publishes them as properties; SNS carries the body only, which holds them.
    message_id = str(uuid.uuid4())
    body = json.dumps(
        {
            "message_id": message_id,
            "topic": "donation.received",
            "correlation_id": "case-42",
            "reply_to": "fabric.business",
        }
    ).encode()
    park(
        aws,
        OutboundMessage(message_id, "donation.received", body, frozenset({Stakeholder.BUSINESS})),
    )
    broker = rabbit(broker_vhost)
    draining(aws, broker).drain()

    connection = pika.BlockingConnection(
        pika.ConnectionParameters(*AMQP, virtual_host=broker_vhost)
    )
    _, properties, _ = connection.channel().basic_get("fabric.business", auto_ack=True)
    connection.close()
    assert (properties.message_id, properties.correlation_id, properties.reply_to) == (
        message_id,
        "case-42",
        "fabric.business",
    )


def test_a_message_that_is_no_fabric_envelope_is_left_and_the_rest_are_drained(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # Sent to the emergency queue by hand (an operator's console): before, its parse error
    # failed every drain run, and the good emergencies beside it went to the DLQ with it.
    good = [message(Stakeholder.GOVERNMENT, emergency=True) for _ in range(3)]
    park(aws, *good)
    sqs = boto3.client("sqs", region_name=REGION)
    emergency = aws["queues"][("emergency", Stakeholder.GOVERNMENT)]
    sqs.send_message(QueueUrl=emergency, MessageBody="not an envelope")

    report = draining(aws, rabbit(broker_vhost)).drain()

    assert report.moved == {queue_name(Stakeholder.GOVERNMENT, emergency=True): 3}
    arrived = in_rabbitmq(broker_vhost)[queue_name(Stakeholder.GOVERNMENT, emergency=True)]
    assert sorted(arrived) == sorted(m.message_id for m in good)
    assert left_in_sqs(aws) == 1  # the stray one, for the queue's dead-letter queue


def test_a_receive_of_only_foreign_messages_does_not_end_the_queues_drain(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # Ten strays first, then an emergency: a receive that brought only strays read as an empty
    # queue, and the emergency behind them waited for the next run.
    sqs = boto3.client("sqs", region_name=REGION)
    emergency = aws["queues"][("emergency", Stakeholder.GOVERNMENT)]
    for i in range(10):
        sqs.send_message(QueueUrl=emergency, MessageBody=f"not an envelope {i}")
    alert = message(Stakeholder.GOVERNMENT, emergency=True)
    park(aws, alert)

    report = draining(aws, rabbit(broker_vhost)).drain()

    assert report.moved == {queue_name(Stakeholder.GOVERNMENT, emergency=True): 1}
    assert in_rabbitmq(broker_vhost)[queue_name(Stakeholder.GOVERNMENT, emergency=True)] == [
        alert.message_id
    ]


class _DeleteFails(SqsFallbackSource):
    def delete(self, queue: str, handles: Any) -> set[str]:
        return set()  # SQS refused the delete: the copies come back after their timeout


def test_a_copy_the_broker_confirmed_is_audited_drained_even_if_sqs_kept_it(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    parked = message(Stakeholder.MEDIA)
    park(aws, parked)
    audit = MemoryAuditSink()
    broker = rabbit(broker_vhost)
    drainer = Drainer(
        queues=fallback_queues(aws),
        source=_DeleteFails(
            lambda: boto3.client("sqs", region_name=REGION), long_poll_s=MOTO_POLL_S
        ),
        broker=broker,
        audit=audit,
        connect=broker.connect,
    )
    report = drainer.drain(max_messages=1)

    assert report.left == 1  # not deleted from SQS
    assert in_rabbitmq(broker_vhost)[queue_name(Stakeholder.MEDIA)] == [parked.message_id]
    assert [(r.event.value, r.message_id) for r in audit.records] == [
        ("drained", parked.message_id)
    ]


def test_a_copy_whose_drained_record_cannot_be_stored_stays_in_sqs_and_the_run_stops(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # Neither audit path takes the batch: a copy deleted from SQS now would be in its work queue
    # with no record of how it got there, and its body never archived (the compliance report
    # would count it "not drained"). Left in SQS, the next run moves it again, with its record.
    parked = [message(Stakeholder.MEDIA) for _ in range(3)]
    other = message(Stakeholder.ACADEMIC)
    park(aws, *parked, other)
    broker = rabbit(broker_vhost)
    source = _Recording(lambda: boto3.client("sqs", region_name=REGION), long_poll_s=MOTO_POLL_S)
    drainer = Drainer(
        queues=fallback_queues(aws),
        source=source,
        broker=broker,
        audit=MemoryAuditSink(available=False),
        connect=broker.connect,
    )
    report = drainer.drain()

    assert report.stopped == "audit unavailable"
    assert report.total == 0
    assert len(source.received) in (1, 3)  # one queue's batch, then the run stopped
    assert left_in_sqs(aws) == 4

    for url, handle in source.received:  # what the run took comes back at once
        aws["sqs"].change_message_visibility(
            QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=0
        )
    audit = MemoryAuditSink()
    again = draining(aws, broker, audit).drain()
    assert (again.stopped, again.total) == ("empty", 4)
    assert left_in_sqs(aws) == 0
    assert {r.message_id for r in audit.records} == {m.message_id for m in [*parked, other]}


class _Recording(SqsFallbackSource):
    def __init__(self, client_factory: Any, *, long_poll_s: int) -> None:
        super().__init__(client_factory, long_poll_s=long_poll_s)
        self.received: list[tuple[str, str]] = []

    def receive(self, queue: str, limit: int, *, wait: bool = True) -> Any:
        got = super().receive(queue, limit, wait=wait)
        self.received += [(queue, item.handle) for item in got]
        return got


def test_a_run_whose_deletes_fail_stops_instead_of_moving_every_queue_it_cannot_clear(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # A copy SQS did not delete comes back after its visibility timeout and is moved again: a
    # run that went on would put every fallback message into RabbitMQ twice (and count a
    # receive against each, towards its DLQ) while SQS refuses deletes.
    media = [message(Stakeholder.MEDIA) for _ in range(3)]
    academic = [message(Stakeholder.ACADEMIC) for _ in range(3)]
    park(aws, *media, *academic)
    broker = rabbit(broker_vhost)
    drainer = Drainer(
        queues=fallback_queues(aws),
        source=_DeleteFails(
            lambda: boto3.client("sqs", region_name=REGION), long_poll_s=MOTO_POLL_S
        ),
        broker=broker,
        audit=MemoryAuditSink(),
        connect=broker.connect,
    )
    report = drainer.drain()

    assert report.stopped == "fallback queue unavailable"
    moved = sum(len(ids) for ids in in_rabbitmq(broker_vhost).values())
    assert moved == 3  # the first batch, whose deletes failed; nothing after it
    assert report.left == 3


def test_what_sns_could_not_deliver_is_drained_from_the_subscription_dlq_in_either_form(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # SNS could not deliver these to the government emergency queue (a key or policy fault):
    # they sit in that subscription's DLQ. They were accepted (SNS stored them), so the drain
    # takes them to the work queue like the fallback queue's own messages.
    sub_dlq = aws["sqs"].create_queue(QueueName="fabric-test-emergency-government-sub-dlq")
    url = sub_dlq["QueueUrl"]
    raw, wrapped = (message(Stakeholder.GOVERNMENT, emergency=True) for _ in range(2))
    published = {
        MESSAGE_ID_ATTRIBUTE: raw.message_id,
        TOPIC_ATTRIBUTE: raw.topic,
        HEADERS_ATTRIBUTE: json.dumps(raw.headers),
    }
    aws["sqs"].send_message(  # as delivered raw
        QueueUrl=url,
        MessageBody=raw.body.decode(),
        MessageAttributes={
            name: {"DataType": "String", "StringValue": value} for name, value in published.items()
        },
    )
    notification = {  # as SNS's JSON notification, attributes inside
        "Type": "Notification",
        "MessageId": str(uuid.uuid4()),
        "TopicArn": aws["topics"]["emergency"],
        "Message": wrapped.body.decode(),
        "MessageAttributes": {
            MESSAGE_ID_ATTRIBUTE: {"Type": "String", "Value": wrapped.message_id},
            TOPIC_ATTRIBUTE: {"Type": "String", "Value": wrapped.topic},
            HEADERS_ATTRIBUTE: {"Type": "String", "Value": json.dumps(wrapped.headers)},
        },
    }
    aws["sqs"].send_message(QueueUrl=url, MessageBody=json.dumps(notification))
    broker = rabbit(broker_vhost)
    drainer = Drainer(
        queues=[FallbackQueue(url=url, group=Stakeholder.GOVERNMENT, emergency=True)],
        source=SqsFallbackSource(
            lambda: boto3.client("sqs", region_name=REGION), long_poll_s=MOTO_POLL_S
        ),
        broker=broker,
        audit=MemoryAuditSink(),
    )

    report = drainer.drain()

    assert (report.total, report.stopped) == (2, "empty")
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(*AMQP, virtual_host=broker_vhost)
    )
    channel = connection.channel()
    arrived = {}
    for _ in range(2):
        method, properties, body = channel.basic_get(
            queue_name(Stakeholder.GOVERNMENT, emergency=True), auto_ack=True
        )
        assert method is not None
        arrived[properties.message_id] = (body, properties.headers.get("fabric-audience"))
    connection.close()
    assert arrived == {
        raw.message_id: (raw.body, "all"),
        wrapped.message_id: (wrapped.body, "all"),  # the envelope, not SNS's wrapper
    }
    remaining = aws["sqs"].get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    assert sum(int(v) for v in remaining.values()) == 0
