"""The long-running consumer against the real local RabbitMQ: it never stops silently, and a
delivery it cannot read is settled with a reason instead of stopping the consume loop."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import boto3
import pika
import pika.exceptions
import pytest
from moto import mock_aws

from fabric import topology
from fabric.adapters.memory import MemoryAuditSink
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
from fabric.adapters.sns import HEADERS_ATTRIBUTE, MESSAGE_ID_ATTRIBUTE, TOPIC_ATTRIBUTE
from fabric.audit import AuditEvent, decode_audit_batch
from fabric.consumer import Delivery, MessageProcessor, sqs_batch_handler
from fabric.envelope import new_message_id
from fabric.stakeholders import Stakeholder
from tests.integration import test_dead_letters as dead_letters
from tests.integration.aws_fallback import REGION
from tests.integration.queue_waits import settled_empty

GROUP = Stakeholder.COMMUNITY
WORK = topology.queue_name(GROUP)
DLQ = topology.dead_letter_queue_name(GROUP)
amqp, settings = dead_letters.amqp, dead_letters.settings  # the broker's fixture and settings


def publish(channel: Any, message_id: str, headers: dict[str, Any] | None = None) -> None:
    channel.basic_publish(
        topology.REDELIVER_EXCHANGE,
        WORK,
        b'{"note": "not child data"}',
        pika.BasicProperties(
            message_id=message_id,
            type="community.update",
            delivery_mode=2,
            headers={"fabric-audience": "all", **(headers or {})},
        ),
        mandatory=True,
    )


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_consumer_the_broker_cancels_raises_instead_of_returning_as_if_done(
    broker_vhost: str, amqp: Any
) -> None:
    # RabbitMQ cancels a consumer (basic.cancel) when its queue is deleted or the node holding
    # it is lost. pika's consume generator then just ends, and run() returned its counts like a
    # finished run: a supervisor saw a clean exit while nothing consumed the queue any more.
    publish(amqp, "before-the-cancel")
    seen: list[str] = []
    outcome: list[object] = []
    stop = threading.Event()
    consumer = RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(lambda d: seen.append(d.message_id))
    )

    def consume() -> None:
        try:
            outcome.append(consumer.run(stop=stop))  # no limit: it runs until stopped
        except Exception as exc:  # the outcome under test
            outcome.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        wait_for(lambda: seen == ["before-the-cancel"])
        amqp.queue_delete(WORK)
        thread.join(10)
    finally:
        stop.set()
        thread.join(10)

    assert seen == ["before-the-cancel"]
    assert len(outcome) == 1
    assert isinstance(outcome[0], pika.exceptions.ConsumerCancelled), outcome


@pytest.mark.parametrize("forged", ["\u00b2", "1" * 5000])
def test_a_malformed_attempt_header_does_not_stop_the_consumer(
    broker_vhost: str, amqp: Any, forged: str
) -> None:
    # "²" passes str.isdigit() and 5,000 digits pass it too, but int() refuses both: the
    # consume loop raised on such a message, left it unacknowledged and stopped, and every
    # consumer run met it again first until the delivery limit parked it (and on the Amazon MQ
    # event source, every healthy message of its batch with it).
    publish(amqp, "forged-attempt", {topology.ATTEMPT_HEADER: forged})
    publish(amqp, "healthy")
    seen: list[tuple[str, int]] = []

    def handler(delivery: Delivery) -> None:
        seen.append((delivery.message_id, delivery.attempt))

    counts = RabbitMqConsumer(settings(broker_vhost), WORK, MessageProcessor(handler)).run(
        max_messages=2, idle_timeout_s=5
    )

    assert counts == {"done": 2}
    assert seen == [("forged-attempt", 1), ("healthy", 1)]
    settled_empty(amqp, WORK)


def test_a_handler_longer_than_the_heartbeat_keeps_the_connection_and_the_prefetched_messages(
    broker_vhost: str, amqp: Any
) -> None:
    # pika's blocking connection sends heartbeats only while the consumer is inside pika. A
    # handler that ran past about twice the heartbeat lost the connection: run() raised, and
    # the message and every prefetched one went back, one delivery nearer the delivery limit
    # (ten slow messages in a row parked healthy ones as delivery_limit).
    publish(amqp, "slow")
    publish(amqp, "prefetched")
    seen: list[tuple[str, bool]] = []

    def handler(delivery: Delivery) -> None:
        seen.append((delivery.message_id, delivery.redelivered))
        if delivery.message_id == "slow":
            time.sleep(7)  # the broker drops a silent client after about two heartbeats (2 s)

    quick = dataclasses.replace(settings(broker_vhost), heartbeat=2)
    counts = RabbitMqConsumer(quick, WORK, MessageProcessor(handler)).run(
        max_messages=2, idle_timeout_s=5
    )

    assert counts == {"done": 2}
    assert seen == [("slow", False), ("prefetched", False)]
    settled_empty(amqp, WORK)


# -- SQS ----------------------------------------------------------------------------------------


def sqs_event(queue_url: str, client: Any) -> dict[str, Any]:
    """What the SQS event source hands the function for what the queue holds now."""
    received = client.receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=10,
        AttributeNames=["All"],
        MessageAttributeNames=["All"],
    ).get("Messages", [])
    arn = client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    return {
        "Records": [
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": message["Attributes"],
                "messageAttributes": {
                    name: {"stringValue": value["StringValue"], "dataType": value["DataType"]}
                    for name, value in message.get("MessageAttributes", {}).items()
                },
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
            }
            for message in received
        ]
    }


def test_an_sqs_record_with_malformed_headers_is_failed_and_audited_not_lost_from_the_trail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fabric writes fabric-headers as a JSON object of strings. One that did not parse
    # raised before the record was decided: it failed on every receive, was never audited,
    # and SQS parked it after maxReceiveCount with no dead-lettered record in the trail.
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        client = boto3.client("sqs", region_name=REGION)
        url = client.create_queue(QueueName="fabric-test-fallback-community")["QueueUrl"]

        def send(message_id: str, headers: str) -> None:
            client.send_message(
                QueueUrl=url,
                MessageBody='{"note": "not child data"}',
                MessageAttributes={
                    MESSAGE_ID_ATTRIBUTE: {"DataType": "String", "StringValue": message_id},
                    TOPIC_ATTRIBUTE: {"DataType": "String", "StringValue": "community.update"},
                    HEADERS_ATTRIBUTE: {"DataType": "String", "StringValue": headers},
                },
            )

        # Valid ids: the toolkit records only those.
        garbled, not_strings, healthy = (new_message_id() for _ in range(3))
        send(garbled, '{"case-region": "north"')
        send(not_strings, '{"case-region": ["north"]}')
        send(healthy, '{"case-region":"north"}')
        seen: list[tuple[str, dict[str, str]]] = []
        audit = MemoryAuditSink()
        handle = sqs_batch_handler(
            MessageProcessor(lambda d: seen.append((d.message_id, dict(d.headers)))),
            audit=audit,
            consumer="consumer:community",
            max_receives=1,
        )

        event = sqs_event(url, client)
        ids = {
            r["messageAttributes"][MESSAGE_ID_ATTRIBUTE]["stringValue"]: r for r in event["Records"]
        }
        response = handle(event, None)

    assert seen == [(healthy, {"case-region": "north"})]
    assert {f["itemIdentifier"] for f in response["batchItemFailures"]} == {
        ids[garbled]["messageId"],
        ids[not_strings]["messageId"],
    }
    assert {r.message_id: (r.event, r.reason) for r in audit.records} == {
        garbled: (AuditEvent.DEAD_LETTERED, "malformed-headers"),
        healthy: (AuditEvent.DELIVERED, None),
        not_strings: (AuditEvent.DEAD_LETTERED, "malformed-headers"),
    }


def test_audit_records_the_audit_path_refused_reach_it_while_the_consumer_is_idle(
    broker_vhost: str, amqp: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The audit exchange is gone when the consumer settles its one message: the record is kept
    # back. Before, it went out only with the next settlement: a consumer that then got no
    # more messages held it for as long as the queue stayed quiet (or lost it when stopped),
    # and the trail could not show the copy delivered.
    amqp.exchange_delete(topology.AUDIT_EXCHANGE)
    message_id = new_message_id()
    publish(amqp, message_id)
    seen: list[str] = []
    stop = threading.Event()
    consumer = RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(lambda d: seen.append(d.message_id))
    )
    thread = threading.Thread(target=lambda: consumer.run(stop=stop), daemon=True)
    thread.start()
    try:
        wait_for(lambda: "could not be stored; 1 kept" in caplog.text)  # its record refused
        assert seen == [message_id]
        amqp.exchange_declare(topology.AUDIT_EXCHANGE, "topic", durable=True)
        amqp.queue_bind(topology.AUDIT_QUEUE, topology.AUDIT_EXCHANGE, "#")
        batches: list[bytes] = []

        def audited() -> bool:
            method, _, body = amqp.basic_get(topology.AUDIT_QUEUE, auto_ack=True)
            if method is not None:
                batches.append(body)
            return bool(batches)

        wait_for(audited, timeout=15)
    finally:
        stop.set()
        thread.join(10)

    assert len(batches) == 1, "the kept-back record did not reach the audit queue"
    (record,) = decode_audit_batch(batches[0]).records
    assert (record["event"], record["message_id"]) == ("delivered", message_id)
