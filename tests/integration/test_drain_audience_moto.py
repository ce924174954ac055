"""A group's fallback subscription without its filter (SNS has no IAM condition on a filter
policy): the drain still hands the group only what was published for it (moto SNS/SQS, the
real RabbitMQ)."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest

from fabric.adapters.memory import MemoryAuditSink
from fabric.adapters.sns import (
    AUDIENCE_ATTRIBUTE,
    HEADERS_ATTRIBUTE,
    MESSAGE_ID_ATTRIBUTE,
    TOPIC_ATTRIBUTE,
)
from fabric.adapters.sqs import SqsFallbackSource
from fabric.audit import AuditEvent
from fabric.drain import FALLBACK_MAX_RECEIVES, Drainer, FallbackQueue
from fabric.stakeholders import Stakeholder
from fabric.topology import queue_name
from tests.integration.aws_fallback import MOTO_POLL_S, REGION
from tests.integration.test_drain import (
    draining,
    in_rabbitmq,
    left_in_sqs,
    message,
    park,
    rabbit,
)
from tests.integration.test_drain_dead_letters import received, with_redrive_policy

pytestmark = pytest.mark.integration

ACADEMIC, MEDIA = queue_name(Stakeholder.ACADEMIC), queue_name(Stakeholder.MEDIA)


def unfiltered(aws: dict[str, Any], group: Stakeholder, *, raw: bool) -> str:
    """``group``'s fallback queue subscribed again without its filter, as a principal allowed
    ``sns:Unsubscribe`` and ``sns:Subscribe`` could: it gets every group's fallback messages
    (raw, or in SNS's JSON notification); its URL."""
    sns = boto3.client("sns", region_name=REGION)
    topic, url = aws["topics"]["fallback"], aws["queues"][("fallback", group)]
    arn = aws["sqs"].get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    (subscription,) = [
        s["SubscriptionArn"]
        for s in sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
        if s["Endpoint"] == arn
    ]
    sns.unsubscribe(SubscriptionArn=subscription)
    sns.subscribe(
        TopicArn=topic,
        Protocol="sqs",
        Endpoint=arn,
        Attributes={"RawMessageDelivery": "true" if raw else "false"},
    )
    return str(url)


def waiting(aws: dict[str, Any], url: str) -> int:
    attributes = aws["sqs"].get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return sum(int(value) for value in attributes.values())


@pytest.mark.parametrize("raw", [True, False])
def test_another_groups_message_in_an_unfiltered_queue_is_not_handed_to_that_group(
    aws: dict[str, Any], broker_vhost: str, raw: bool
) -> None:
    # Before, the drain moved academic's message into fabric.media: a child's data to the
    # wrong stakeholder, recorded as drained for media.
    media_url = unfiltered(aws, Stakeholder.MEDIA, raw=raw)
    academic_only = message(Stakeholder.ACADEMIC)
    media_only = message(Stakeholder.MEDIA)
    both = message(Stakeholder.ACADEMIC, Stakeholder.MEDIA)
    park(aws, academic_only, media_only, both)
    assert waiting(aws, media_url) == 3  # SNS did hand media's queue academic's message
    audit = MemoryAuditSink()

    report = draining(aws, rabbit(broker_vhost), audit).drain(max_seconds=30)

    arrived = in_rabbitmq(broker_vhost)
    assert sorted(arrived[MEDIA]) == sorted([media_only.message_id, both.message_id])
    assert sorted(arrived[ACADEMIC]) == sorted([academic_only.message_id, both.message_id])
    assert (report.stopped, report.misdelivered, report.left) == ("empty", 1, 1)
    assert report.moved == {ACADEMIC: 2, MEDIA: 2}
    # Not deleted: it stays in media's queue (a redrive policy would take it to the DLQ).
    assert waiting(aws, media_url) == 1
    assert left_in_sqs(aws) == 1
    # These queues have no redrive policy (``max_receives`` None), as a subscription's DLQ: the
    # queue keeps the copy, and the trail says so at its first receive.
    assert sorted((r.event, r.message_id, r.queues, r.attempt) for r in audit.records) == sorted(
        [
            (AuditEvent.DRAINED, academic_only.message_id, (ACADEMIC,), None),
            (AuditEvent.DRAINED, both.message_id, (ACADEMIC,), None),
            (AuditEvent.DRAINED, media_only.message_id, (MEDIA,), None),
            (AuditEvent.DRAINED, both.message_id, (MEDIA,), None),
            (
                AuditEvent.DEAD_LETTERED,
                academic_only.message_id,
                ("fabric-test-fallback-media",),
                1,
            ),
        ]
    )


def test_a_misdelivered_copy_back_at_every_receive_ends_in_the_dlq_and_the_rest_moves(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # Media's queue makes a received copy visible again at once (visibility timeout 0): the
    # drain meets academic's copy in every receive and goes on past it; SQS's redrive policy
    # takes it to the DLQ after its receives, within the run, and the trail says where it went
    # and why. Before, the run left media's queue after three batches of it alone.
    media_url = unfiltered(aws, Stakeholder.MEDIA, raw=True)
    dlq = with_redrive_policy(aws, media_url)
    academic_only = message(Stakeholder.ACADEMIC)
    media_messages = [message(Stakeholder.MEDIA) for _ in range(12)]
    park(aws, academic_only, *media_messages)
    broker, audit = rabbit(broker_vhost), MemoryAuditSink()
    drainer = Drainer(
        queues=[
            FallbackQueue(
                media_url, Stakeholder.MEDIA, emergency=False, max_receives=FALLBACK_MAX_RECEIVES
            ),
            FallbackQueue(
                aws["queues"][("fallback", Stakeholder.ACADEMIC)],
                Stakeholder.ACADEMIC,
                emergency=False,
                max_receives=FALLBACK_MAX_RECEIVES,
            ),
        ],
        source=SqsFallbackSource(
            lambda: boto3.client("sqs", region_name=REGION), long_poll_s=MOTO_POLL_S
        ),
        broker=broker,
        audit=audit,
        connect=broker.connect,
    )

    report = drainer.drain(max_seconds=30)

    assert (report.stopped, report.misdelivered, report.left) == ("empty", 1, 1)  # counted once
    assert report.moved == {MEDIA: len(media_messages), ACADEMIC: 1}
    arrived = in_rabbitmq(broker_vhost)
    assert arrived[ACADEMIC] == [academic_only.message_id]  # from academic's own queue
    assert sorted(arrived[MEDIA]) == sorted(m.message_id for m in media_messages)
    dead = [r for r in audit.records if r.event is AuditEvent.DEAD_LETTERED]
    assert [(r.message_id, r.reason, r.attempt, r.groups, r.queues) for r in dead] == [
        (
            academic_only.message_id,
            "drain-misdelivered",
            FALLBACK_MAX_RECEIVES,
            ("media",),
            ("fabric-test-fallback-media",),
        )
    ]
    assert dead[0].body_sha256 is None
    # Parked by SQS, as recorded: nothing lost, and in sight of FallbackDlqDepth.
    assert received(aws, dlq) == [academic_only.message_id]
    assert received(aws, media_url) == []


def test_a_misdelivered_copy_in_a_subscription_dlq_is_audited_once_and_kept(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # A subscription's DLQ has no redrive policy: it keeps the copy up to 14 days, so it has no
    # last receive. Before, the trail never said where academic's copy was.
    sub_dlq = aws["sqs"].get_queue_url(QueueName="fabric-test-fallback-media-sub-dlq")["QueueUrl"]
    aws["sqs"].set_queue_attributes(QueueUrl=sub_dlq, Attributes={"VisibilityTimeout": "0"})
    academic_only, media_only = message(Stakeholder.ACADEMIC), message(Stakeholder.MEDIA)
    for item in (academic_only, media_only):  # what SNS could not deliver, as delivered raw
        aws["sqs"].send_message(
            QueueUrl=sub_dlq,
            MessageBody=item.body.decode(),
            MessageAttributes={
                name: {"DataType": "String", "StringValue": value}
                for name, value in {
                    MESSAGE_ID_ATTRIBUTE: item.message_id,
                    TOPIC_ATTRIBUTE: item.topic,
                    HEADERS_ATTRIBUTE: json.dumps(item.headers),
                }.items()
            }
            | {
                AUDIENCE_ATTRIBUTE: {
                    "DataType": "String.Array",
                    "StringValue": json.dumps(sorted(group.value for group in item.audience)),
                }
            },
        )
    broker, audit = rabbit(broker_vhost), MemoryAuditSink()
    drainer = Drainer(
        queues=[FallbackQueue(sub_dlq, Stakeholder.MEDIA, emergency=False)],
        source=SqsFallbackSource(
            lambda: boto3.client("sqs", region_name=REGION), long_poll_s=MOTO_POLL_S
        ),
        broker=broker,
        audit=audit,
        connect=broker.connect,
    )

    # Back at every receive (visibility 0), and no redrive policy takes it away: the run goes
    # on until its time limit; a second run meets it again.
    runs = [drainer.drain(max_seconds=2), drainer.drain(max_seconds=1)]

    assert [(r.stopped, r.misdelivered, r.total) for r in runs] == [
        ("time limit", 1, 1),
        ("time limit", 1, 0),
    ]
    assert in_rabbitmq(broker_vhost)[MEDIA] == [media_only.message_id]
    dead = [r for r in audit.records if r.event is AuditEvent.DEAD_LETTERED]
    assert [(r.message_id, r.reason, r.attempt, r.groups, r.queues) for r in dead] == [
        (
            academic_only.message_id,
            "drain-misdelivered",
            1,
            ("media",),
            ("fabric-test-fallback-media-sub-dlq",),
        )
    ]
    assert dead[0].body_sha256 is None
    assert received(aws, sub_dlq) == [academic_only.message_id]  # kept, not moved
