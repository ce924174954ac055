"""A copy the drain could not hand on at its last receive: audited ``dead-lettered`` as SQS moves
it to the fallback queue's DLQ (moto, with the stack's redrive policy, and the real RabbitMQ)."""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any

import boto3
import pika
import pytest

from fabric.adapters.memory import MemoryAuditSink
from fabric.adapters.sqs import SqsFallbackSource
from fabric.audit import AuditEvent
from fabric.drain import FALLBACK_MAX_RECEIVES, Drainer, FallbackQueue
from fabric.stakeholders import Stakeholder
from fabric.topology import queue_name
from tests.integration.aws_fallback import MOTO_POLL_S, REGION
from tests.integration.conftest import AMQP, management
from tests.integration.test_drain import message, park, rabbit, refuses_publishes

pytestmark = pytest.mark.integration

ACADEMIC = queue_name(Stakeholder.ACADEMIC)


def full(vhost: str) -> None:
    """academic's work queue full: it refuses what is published to it (reject-publish)."""
    management(
        "PUT",
        f"policies/{urllib.parse.quote(vhost, safe='')}/full",
        {"pattern": "^fabric\\.academic$", "definition": {"max-length": 1}, "apply-to": "queues"},
    )
    deadline = time.monotonic() + 10
    while not refuses_publishes(vhost, ACADEMIC):  # the policy is in force
        assert time.monotonic() < deadline, "the policy was not applied"
        time.sleep(0.05)
    connection = pika.BlockingConnection(pika.ConnectionParameters(*AMQP, virtual_host=vhost))
    channel = connection.channel()
    channel.confirm_delivery()
    # A quorum queue refuses once it is over its limit: fill it until it does.
    for _ in range(10):
        try:
            channel.basic_publish("", ACADEMIC, b"{}", mandatory=True)
        except pika.exceptions.NackError:
            break
    else:
        raise AssertionError("the work queue did not fill")
    connection.close()


def with_redrive_policy(aws: dict[str, Any], url: str) -> str:
    """``url`` redriven as the stack does (``FALLBACK_MAX_RECEIVES``, then ``<name>-dlq``), and
    visible again at once after a receive; the DLQ's URL."""
    dlq = aws["sqs"].create_queue(QueueName=url.rsplit("/", 1)[1] + "-dlq")["QueueUrl"]
    dlq_arn = aws["sqs"].get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    policy = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": FALLBACK_MAX_RECEIVES}
    aws["sqs"].set_queue_attributes(
        QueueUrl=url,
        Attributes={"RedrivePolicy": json.dumps(policy), "VisibilityTimeout": "0"},
    )
    return str(dlq)


def received(aws: dict[str, Any], url: str) -> list[str]:
    """Receive what ``url`` holds (one receive more for each); their message ids."""
    got = aws["sqs"].receive_message(QueueUrl=url, MaxNumberOfMessages=10)
    return [json.loads(m["Body"])["message_id"] for m in got.get("Messages", [])]


def test_a_copy_refused_at_its_last_receive_is_audited_dead_lettered_as_sqs_parks_it(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # Before, SQS moved such a copy to the DLQ with no record: the trail showed it accepted on
    # the fallback path, and nothing after.
    full(broker_vhost)
    refused = message(Stakeholder.ACADEMIC)
    park(aws, refused)
    url = aws["queues"][("fallback", Stakeholder.ACADEMIC)]
    dlq = with_redrive_policy(aws, url)
    for _ in range(FALLBACK_MAX_RECEIVES - 2):
        assert received(aws, url) == [refused.message_id]
    broker, audit = rabbit(broker_vhost), MemoryAuditSink()
    drainer = Drainer(
        queues=[  # as bootstrap builds it from the stack's names
            FallbackQueue(
                url, Stakeholder.ACADEMIC, emergency=False, max_receives=FALLBACK_MAX_RECEIVES
            )
        ],
        source=SqsFallbackSource(
            lambda: boto3.client("sqs", region_name=REGION), long_poll_s=MOTO_POLL_S
        ),
        broker=broker,
        audit=audit,
        connect=broker.connect,
    )

    first = drainer.drain()  # its receive 9 of 10: it comes back, no record
    assert (first.refused, audit.records) == ([ACADEMIC], [])
    second = drainer.drain()  # its last receive: SQS parks it next

    assert second.refused == [ACADEMIC]
    [record] = audit.records
    assert (record.event, record.message_id, record.reason, record.attempt, record.queues) == (
        AuditEvent.DEAD_LETTERED,
        refused.message_id,
        "drain-nacked",
        FALLBACK_MAX_RECEIVES,
        ("fabric-test-fallback-academic",),
    )
    assert received(aws, url) == []  # SQS moved it to the DLQ at this receive, as recorded
    assert received(aws, dlq) == [refused.message_id]
