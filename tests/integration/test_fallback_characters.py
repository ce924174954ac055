"""Text SQS refuses never travels the fallback path raw: router → SNS → SQS → drain → RabbitMQ.

SQS takes only the characters XML 1.0 allows in a message body and in attribute values; JSON
allows U+FFFE and U+FFFF in a string as well. moto stores whatever it is sent, so the tests
check each character of what SQS holds the way AWS would.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import boto3
import pika
import pytest

from fabric.adapters.memory import MemoryAuditSink
from fabric.adapters.sqs import SqsFallbackSource
from fabric.drain import Drainer, FallbackQueue
from fabric.envelope import Envelope, validate_envelope
from fabric.stakeholders import Stakeholder
from tests.integration.aws_fallback import MOTO_POLL_S, REGION, bootstrapped_router
from tests.integration.conftest import AMQP
from tests.integration.test_drain import rabbit

pytestmark = pytest.mark.integration

# The characters SQS takes (its SendMessage reference: #x9 | #xA | #xD | #x20 to #xD7FF |
# #xE000 to #xFFFD | #x10000 to #x10FFFF); AWS refuses a body with any other, or stores it
# with U+FFFD in its place.
_SQS_TEXT = re.compile("[\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]*")
_GROUPS = (Stakeholder.BUSINESS, Stakeholder.COMMUNITY)  # donation.# in the routing table


def held_in_sqs(aws: dict[str, Any], group: Stakeholder) -> dict[str, Any]:
    """The one message in ``group``'s fallback queue, left visible for the drain."""
    (held,) = aws["sqs"].receive_message(
        QueueUrl=aws["queues"][("fallback", group)],
        MessageAttributeNames=["All"],
        VisibilityTimeout=0,
    )["Messages"]
    return dict(held)


def test_noncharacters_reach_the_stakeholder_queue_through_the_fallback_with_the_same_value(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    sent: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "topic": "donation.pledge.received",
        "payload": {"note\uffff": "a\ufffeb", "marks": ["\uffff", "\ufffd", "😀"]},
        "headers": {"memo": "x\uffff\ufffe"},
        "correlation_id": "pledge-\ufffe",
    }
    router = bootstrapped_router(aws, port=1)  # nothing listens on port 1: RabbitMQ is down

    (result,) = router.route([sent], source="community").results

    assert (result.status, result.transport) == ("accepted", "fallback")
    for group in _GROUPS:
        held = held_in_sqs(aws, group)
        assert _SQS_TEXT.fullmatch(held["Body"]), "AWS would refuse this body"
        for name, attribute in held["MessageAttributes"].items():
            assert _SQS_TEXT.fullmatch(attribute["StringValue"]), f"AWS would refuse {name}"

    report = Drainer(  # the two queues that hold it: each empty queue costs a 1 s receive
        queues=[FallbackQueue(aws["queues"][("fallback", g)], g, emergency=False) for g in _GROUPS],
        source=SqsFallbackSource(
            lambda: boto3.client("sqs", region_name=REGION), long_poll_s=MOTO_POLL_S
        ),
        broker=rabbit(broker_vhost),
        audit=MemoryAuditSink(),
    ).drain()

    assert (report.total, report.stopped) == (2, "empty")
    envelope = validate_envelope(sent, "community")
    assert isinstance(envelope, Envelope)
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(*AMQP, virtual_host=broker_vhost)
    )
    try:
        for group in _GROUPS:
            _, properties, body = connection.channel().basic_get(
                f"fabric.{group.value}", auto_ack=True
            )
            # The bytes RabbitMQ would have taken from the router directly, and the same value.
            assert body == envelope.to_json_bytes()
            assert json.loads(body)["payload"] == sent["payload"]
            assert properties.headers["memo"] == "x\uffff\ufffe"
            assert properties.correlation_id == "pledge-\ufffe"
    finally:
        connection.close()
