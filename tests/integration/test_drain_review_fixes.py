"""The drain after review (moto SQS, and the real RabbitMQ where a test takes ``broker_vhost``):
an emergency queue found empty stays in turn, a stalled audit queue costs a run one confirm
timeout and not one a batch, a body it cannot read never stops a run, and what is not the
fabric's own message is left in SQS.

The tests without a broker use the fake clock of ``tests/unit/test_drain_looks.py``; they are
here because a second ``test_drain_review_fixes.py`` under ``tests/unit`` would clash with this
one's module name when the whole suite is collected."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from fabric import bootstrap
from fabric.adapters.memory import MemoryAuditSink, MemoryMetrics
from fabric.adapters.rabbitmq import RabbitMqTransport
from fabric.adapters.sns import MESSAGE_ID_ATTRIBUTE, TOPIC_ATTRIBUTE
from fabric.adapters.sqs import SqsFallbackSource
from fabric.audit import AuditEvent
from fabric.drain import RECHECK_SECONDS, Drainer, FallbackQueue
from fabric.ports import MessageKind, OutboundMessage, Outcome, Received
from fabric.settings import DrainSettings
from fabric.stakeholders import STAKEHOLDERS, Stakeholder
from fabric.topology import queue_name
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import AMQP
from tests.integration.faults import FaultProxy
from tests.integration.test_drain import draining, in_rabbitmq, left_in_sqs, message, park, rabbit
from tests.unit.test_drain_looks import (
    BATCH_SECONDS,
    BULK,
    EMERGENCY,
    MEDIA,
    Clock,
    TimedBroker,
    TimedSource,
    drainer,
    parked,
)

pytestmark = pytest.mark.integration

COMMUNITY = FallbackQueue(url="emergency-community", group=Stakeholder.COMMUNITY, emergency=True)
COMMUNITY_EMERGENCY = queue_name(Stakeholder.COMMUNITY, emergency=True)
ACADEMIC = queue_name(Stakeholder.ACADEMIC)
GOVERNMENT_EMERGENCY = queue_name(Stakeholder.GOVERNMENT, emergency=True)
# JSON nested deeper than Python's parser goes: json.loads raises RecursionError.
DEEP = "[" * 100_000 + "]" * 100_000


@dataclass
class LongPollSource(TimedSource):
    """A receive that waits (a long poll) and finds nothing takes a second, as on SQS."""

    def receive(self, queue: str, limit: int, *, wait: bool = True) -> list[Received]:
        taken = super().receive(queue, limit, wait=wait)
        if wait and not taken:
            self.clock.advance(1.0)
        return taken


@pytest.mark.parametrize("with_bulk", [False, True])
def test_an_emergency_reaching_a_queue_found_empty_waits_a_second_not_another_groups_backlog(
    with_bulk: bool,
) -> None:
    # Government's backlog takes the broker 6.25 s here (thousands of messages, whole runs, in
    # an outage's aftermath). Community's queue was empty at the first pass; its emergency
    # waited for all of government's, or for the next run when no bulk followed.
    clock = Clock()
    source, broker = TimedSource(clock=clock), TimedBroker(clock)
    source.send(EMERGENCY.url, *parked(250))
    if with_bulk:
        source.send(BULK.url, *parked(20))
    [alert] = parked()
    clock.at(1.0, lambda: source.send(COMMUNITY.url, alert))
    queues = [EMERGENCY, COMMUNITY] + ([BULK] if with_bulk else [])

    report = drainer(clock, source, broker, queues).drain()

    assert (report.stopped, report.left) == ("empty", 0)
    assert report.moved == {
        GOVERNMENT_EMERGENCY: 250,
        COMMUNITY_EMERGENCY: 1,
        **({MEDIA: 20} if with_bulk else {}),
    }
    # The look is due a second on; then one batch of each queue still in turn at most.
    assert broker.at[alert.message_id] - 1.0 <= RECHECK_SECONDS + 2 * BATCH_SECONDS
    government = [t for m, t in broker.at.items() if m != alert.message_id]
    assert max(government) > 5.0  # most of government's backlog was still to go then


def test_a_queue_found_empty_is_looked_at_without_waiting_at_most_once_a_second() -> None:
    # The cost of keeping it in turn: one quick receive a second while the others are busy.
    clock = Clock()
    source, broker = TimedSource(clock=clock), TimedBroker(clock)
    source.send(EMERGENCY.url, *parked(100))  # 2.5 s of broker time

    report = drainer(clock, source, broker, [EMERGENCY, COMMUNITY]).drain()

    assert (report.stopped, report.total) == ("empty", 100)
    looks = [
        when
        for when, (queue, wait) in zip(source.times, source.receives, strict=True)
        if queue == COMMUNITY.url and not wait
    ]
    assert looks == [1.0, 2.0]
    assert source.receives.count((COMMUNITY.url, True)) == 1  # the first pass, a long poll


def test_an_emergency_that_arrives_while_the_bulk_ends_moves_in_this_run() -> None:
    # Bulk from 1 s (the empty emergency queue's long poll) to 3.5 s, looks at 2 s and 3 s, then
    # the bulk queue's last, empty, long poll to 4.5 s: the emergency parked at 3.1 s went with
    # the next run, up to a minute later.
    clock = Clock()
    source, broker = LongPollSource(clock=clock), TimedBroker(clock)
    source.send(BULK.url, *parked(100))
    [alert] = parked()
    clock.at(3.1, lambda: source.send(EMERGENCY.url, alert))

    report = drainer(clock, source, broker, [EMERGENCY, BULK]).drain()

    assert (report.stopped, report.moved) == ("empty", {MEDIA: 100, GOVERNMENT_EMERGENCY: 1})
    assert broker.at[alert.message_id] > max(
        t for m, t in broker.at.items() if m != alert.message_id
    )
    assert source.queues[EMERGENCY.url] == []


def test_a_run_that_moved_no_bulk_takes_no_last_look() -> None:
    clock = Clock()
    source, broker = LongPollSource(clock=clock), TimedBroker(clock)

    report = drainer(clock, source, broker, [EMERGENCY, BULK]).drain()

    assert (report.stopped, report.total) == ("empty", 0)
    assert source.receives == [(EMERGENCY.url, True), (BULK.url, True)]


def test_a_body_nested_too_deeply_to_read_is_moved_as_is_and_the_run_goes_on() -> None:
    # The drain reads the correlation id and reply-to from the body: the parser's RecursionError
    # escaped the run, which moved nothing more, every run.
    clock = Clock()
    source, broker = TimedSource(clock=clock), TimedBroker(clock)
    message_id = str(uuid.uuid4())
    deep = Received("handle-deep", DEEP.encode(), message_id, "donation.received")
    source.send(EMERGENCY.url, deep, *parked(3))

    report = drainer(clock, source, broker, [EMERGENCY]).drain()

    assert (report.stopped, report.moved) == ("empty", {GOVERNMENT_EMERGENCY: 4})
    [moved] = [m for m in broker.inner.published if m.message_id == message_id]
    assert (moved.body, moved.correlation_id, moved.reply_to) == (DEEP.encode(), None, None)


class _Client:
    """SQS answering ``items`` to the first receive, then nothing."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.answers = [items]

    def receive_message(self, **_request: Any) -> dict[str, Any]:
        return {"Messages": self.answers.pop(0) if self.answers else []}


def _item(body: str, message_id: str | None = None, topic: str | None = None) -> dict[str, Any]:
    attributes = {
        name: {"DataType": "String", "StringValue": value}
        for name, value in ((MESSAGE_ID_ATTRIBUTE, message_id), (TOPIC_ATTRIBUTE, topic))
        if value is not None
    }
    return {
        "MessageId": str(uuid.uuid4()),
        "ReceiptHandle": f"handle-{uuid.uuid4()}",
        "Body": body,
        "MessageAttributes": attributes,
        "Attributes": {"ApproximateReceiveCount": "1"},
    }


def _envelope(message_id: str) -> str:
    return json.dumps({"message_id": message_id, "topic": "donation.received"})


@pytest.mark.parametrize(
    ("body", "attributes"),
    [
        # Nested too deeply for the parser: its RecursionError stopped the run (without the
        # attributes, the adapter reads the id from the body)...
        ('{"message_id": "x", "p": ' + DEEP + "}", False),
        # ...or, with them, the drain did, reading the reply-to.
        ('{"message_id": "x", "p": ' + DEEP + "}", True),
        # Not the fabric's envelope, with the fabric's attributes: it was moved to the group's
        # work queue and archived as that message.
        ("not json at all", True),
        ('["a", "list"]', True),
        ('{"message_id": "another", "topic": "donation.received"}', True),
    ],
)
def test_what_is_not_the_fabrics_message_is_left_in_the_queue_and_logged(
    body: str, attributes: bool, caplog: pytest.LogCaptureFixture
) -> None:
    message_id = str(uuid.uuid4())
    foreign = _item(body, message_id, "donation.received") if attributes else _item(body)
    fabric = _item(_envelope(message_id), message_id, "donation.received")
    source = SqsFallbackSource(lambda: _Client([foreign, fabric]))

    with caplog.at_level(logging.WARNING, logger="fabric.adapters.sqs"):
        received = source.receive("https://sqs/q", 10)

    assert [item.handle for item in received] == [fabric["ReceiptHandle"]]  # the other is left
    assert f"{foreign['MessageId']} in https://sqs/q is not a fabric message" in caplog.text


def test_the_fabrics_own_messages_still_pass_with_or_without_their_attributes() -> None:
    with_attributes, without = str(uuid.uuid4()), str(uuid.uuid4())
    source = SqsFallbackSource(
        lambda: _Client(
            [
                _item(_envelope(with_attributes), with_attributes, "donation.received"),
                _item(_envelope(without)),
            ]
        )
    )

    received = source.receive("https://sqs/q", 10)

    assert [(item.message_id, item.topic) for item in received] == [
        (with_attributes, "donation.received"),
        (without, "donation.received"),
    ]


def test_an_unreadable_body_leaves_no_record_behind() -> None:
    # The drain never saw it: no drained record archives it, nothing claims it moved.
    clock = Clock()
    audit = MemoryAuditSink()
    message_id = str(uuid.uuid4())
    client = _Client([_item("not json at all", message_id, "donation.received")])
    broker = TimedBroker(clock)
    run = Drainer(
        queues=[BULK],
        source=SqsFallbackSource(lambda: client),
        broker=broker,
        audit=audit,
        clock=clock,
    )

    report = run.drain()

    assert (report.stopped, report.total, report.left) == ("empty", 0, 0)
    assert audit.records == []
    assert broker.inner.published == []


class StalledAuditQueue:
    """The drain's broker transport, on a broker whose audit queue confirms nothing: while an
    audit batch is published the proxy forwards nothing (the transport waits out its confirm
    timeout, then drops the connection); the work queues confirm as usual."""

    def __init__(self, inner: RabbitMqTransport, proxy: FaultProxy) -> None:
        self.name = inner.name
        self.inner = inner
        self.proxy = proxy
        self.audit_batches = 0  # audit publishes that reached the broker

    def publish(
        self, messages: Iterable[OutboundMessage], *, meanwhile: Callable[[], None] | None = None
    ) -> list[Outcome]:
        batch = list(messages)
        if not (batch and batch[0].kind is MessageKind.AUDIT):
            return self.inner.publish(batch, meanwhile=meanwhile)
        self.audit_batches += 1
        self.proxy.blackhole()
        try:
            return self.inner.publish(batch, meanwhile=meanwhile)
        finally:
            self.proxy.restore()

    def connect(self) -> bool:
        return self.inner.connect()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    faults = FaultProxy(AMQP)
    yield faults
    faults.close()


def _drained_on_sqs(audit_queue: str) -> list[str]:
    """The message ids of the ``drained`` records in the SQS audit queue's batches."""
    sqs = boto3.client("sqs", region_name=REGION)
    found: list[str] = []
    while batch := sqs.receive_message(QueueUrl=audit_queue, MaxNumberOfMessages=10).get(
        "Messages", []
    ):
        for item in batch:
            records = json.loads(item["Body"])["records"]
            found += [r["message_id"] for r in records if r["event"] == AuditEvent.DRAINED.value]
            sqs.delete_message(QueueUrl=audit_queue, ReceiptHandle=item["ReceiptHandle"])
    return found


def test_a_stalled_audit_queue_costs_the_run_one_confirm_timeout_not_one_a_batch(
    aws: dict[str, Any], broker_vhost: str, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The drain as bootstrap wires it. Each audit batch waited out the tools' 5 s confirm
    # timeout before it went to the SQS audit queue: about two messages a second for the whole
    # run while the work queues were healthy.
    stalled: list[StalledAuditQueue] = []
    real = bootstrap._rabbit

    def stalling(*args: Any, **kwargs: Any) -> StalledAuditQueue:
        stalled.append(StalledAuditQueue(real(*args, **kwargs), proxy))
        return stalled[-1]

    monkeypatch.setattr(bootstrap, "_rabbit", stalling)
    secret = boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name=f"platform-{uuid.uuid4().hex[:8]}",
        SecretString=json.dumps({"username": "guest", "password": "guest"}),
    )["ARN"]
    audit_queue = aws["sqs"].create_queue(QueueName="fabric-test-audit")["QueueUrl"]
    fallback = aws["queues"][("fallback", Stakeholder.ACADEMIC)]
    settings = DrainSettings(
        environment="test",
        rabbitmq_host="127.0.0.1",
        rabbitmq_port=proxy.port,
        rabbitmq_tls=False,
        rabbitmq_vhost=broker_vhost,
        rabbitmq_secret_arn=secret,
        queues=((fallback, Stakeholder.ACADEMIC.value, False),),
        max_messages=10_000,
        max_seconds=60.0,
        audit_queue_url=audit_queue,
    )
    sent = [message(Stakeholder.ACADEMIC) for _ in range(30)]  # three batches
    park(aws, *sent)
    drainer = bootstrap.build_drainer(settings, metrics=MemoryMetrics())

    started = time.monotonic()
    report = drainer.drain()
    took = time.monotonic() - started

    assert (report.stopped, report.moved, report.left) == ("empty", {ACADEMIC: 30}, 0)
    [broker] = stalled
    assert broker.audit_batches == 1  # the others went straight to the SQS audit queue
    assert took < 12  # one 5 s timeout and a second's last long poll; it was three timeouts
    # Nothing lost: the batch that timed out (in doubt on the broker) went to SQS too.
    assert sorted(_drained_on_sqs(audit_queue)) == sorted(m.message_id for m in sent)
    assert sorted(in_rabbitmq(broker_vhost)[ACADEMIC]) == sorted(m.message_id for m in sent)
    assert left_in_sqs(aws) == 0


@pytest.mark.parametrize("with_attributes", [False, True])
def test_a_body_nested_too_deeply_stays_in_sqs_and_every_other_group_drains(
    aws: dict[str, Any], broker_vhost: str, with_attributes: bool
) -> None:
    # json.loads raised RecursionError out of the run: nothing moved, every run, for any group.
    url = aws["queues"][("emergency", Stakeholder.GOVERNMENT)]
    body = '{"message_id": "x", "topic": "donation.received", "p": ' + DEEP + "}"
    attributes = {
        MESSAGE_ID_ATTRIBUTE: {"DataType": "String", "StringValue": str(uuid.uuid4())},
        TOPIC_ATTRIBUTE: {"DataType": "String", "StringValue": "donation.received"},
    }
    aws["sqs"].send_message(
        QueueUrl=url, MessageBody=body, MessageAttributes=attributes if with_attributes else {}
    )
    others = [message(g, emergency=e) for g in STAKEHOLDERS for e in (False, True)]
    park(aws, *others)
    audit = MemoryAuditSink()

    report = draining(aws, rabbit(broker_vhost), audit).drain(max_seconds=30)

    assert (report.stopped, report.total) == ("empty", len(others))
    assert sorted(m for ids in in_rabbitmq(broker_vhost).values() for m in ids) == sorted(
        m.message_id for m in others
    )
    assert left_in_sqs(aws) == 1  # left for its DLQ, alarmed, as any unreadable body
    assert len(audit.records) == len(others)


def test_a_body_that_is_no_envelope_is_not_moved_for_the_attributes_it_carries(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # It reached fabric.media and was archived in a drained record as a message of topic
    # "whatever".
    url = aws["queues"][("fallback", Stakeholder.MEDIA)]
    aws["sqs"].send_message(
        QueueUrl=url,
        MessageBody="not json at all",
        MessageAttributes={
            MESSAGE_ID_ATTRIBUTE: {"DataType": "String", "StringValue": "anything"},
            TOPIC_ATTRIBUTE: {"DataType": "String", "StringValue": "whatever"},
        },
    )
    audit = MemoryAuditSink()

    report = draining(aws, rabbit(broker_vhost), audit).drain(max_seconds=30)

    assert (report.stopped, report.total) == ("empty", 0)
    assert in_rabbitmq(broker_vhost) == {}
    assert audit.records == []
    assert left_in_sqs(aws) == 1
