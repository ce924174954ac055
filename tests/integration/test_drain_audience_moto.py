"""A group's fallback subscription without its filter (SNS has no IAM condition on a filter
policy): the drain still hands the group only what was published for it (moto SNS/SQS, the
real RabbitMQ)."""

from __future__ import annotations

from typing import Any

import boto3
import pytest

from fabric.adapters.memory import MemoryAuditSink
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
    # Not deleted: it stays in media's queue (its redrive policy takes it to the DLQ).
    assert waiting(aws, media_url) == 1
    assert left_in_sqs(aws) == 1
    assert sorted((r.event, r.message_id, r.queues) for r in audit.records) == sorted(
        [
            (AuditEvent.DRAINED, academic_only.message_id, (ACADEMIC,)),
            (AuditEvent.DRAINED, both.message_id, (ACADEMIC,)),
            (AuditEvent.DRAINED, media_only.message_id, (MEDIA,)),
            (AuditEvent.DRAINED, both.message_id, (MEDIA,)),
        ]
    )


def test_a_misdelivered_copy_ends_in_the_dlq_audited_and_the_drain_never_goes_round(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # Media's queue makes a received copy visible again at once (visibility timeout 0): the
    # drain meets academic's copy in each receive, and must still end its runs and move the
    # rest; at its last receive the trail says where it went and why.
    media_url = unfiltered(aws, Stakeholder.MEDIA, raw=True)
    dlq = with_redrive_policy(aws, media_url)
    academic_only = message(Stakeholder.ACADEMIC)
    park(aws, academic_only)
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
    media_messages = [message(Stakeholder.MEDIA) for _ in range(3)]

    runs, parked = [], []
    for run in range(FALLBACK_MAX_RECEIVES):
        if run == 1:
            park(aws, *media_messages)  # arrive while the foreign copy keeps coming back
        runs.append(drainer.drain(max_seconds=20))
        parked = received(aws, dlq)
        if parked:
            break

    assert all(report.stopped == "empty" for report in runs)  # never "time limit"
    assert 1 < len(runs) < FALLBACK_MAX_RECEIVES
    assert [report.misdelivered for report in runs] == [1] * len(runs)  # once a run
    assert sum(report.total for report in runs) == 1 + len(media_messages)
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
    assert parked == [academic_only.message_id]
    assert received(aws, media_url) == []
