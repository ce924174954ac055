"""The consumer toolkit's decisions and its two Lambda batch handlers (no broker needed)."""

from __future__ import annotations

import base64
import itertools
import json
import socket
import sys
import uuid
from collections import Counter
from typing import Any

import pytest

from fabric import consumer, metrics, topology
from fabric.adapters.memory import MemoryAuditSink, MemoryMetrics, MemoryTransport
from fabric.adapters.rabbitmq import RabbitSettings
from fabric.adapters.rabbitmq_consumer import consumer_settler
from fabric.adapters.sns import MESSAGE_ID_ATTRIBUTE, TOPIC_ATTRIBUTE
from fabric.audit import AuditEvent, decode_audit_batch
from fabric.audit_sink import TransportAuditSink
from fabric.consumer import (
    BatchFailed,
    Delivery,
    InProgress,
    MessageProcessor,
    Poison,
    RabbitMqSettler,
    Systemic,
    Verdict,
    rabbitmq_batch_handler,
    sqs_batch_handler,
)
from fabric.envelope import Reason, Rejection
from fabric.errors import DecryptionFailed, MessageRejected
from fabric.ports import Failure, Outcome
from fabric.stakeholders import Stakeholder

WORK = topology.queue_name(Stakeholder.MEDIA)


def delivery(message_id: str = "m-1", attempt: int = 1, queue: str = WORK) -> Delivery:
    return Delivery(
        message_id=message_id,
        topic="media.story.published",
        body=b"{}",
        queue=queue,
        attempt=attempt,
    )


def mid(name: str) -> str:
    """A message id in the envelope's syntax standing for ``name``: the toolkit records only
    those (``fabric.consumer.settlement_records``)."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, name))


def failing(exc: BaseException) -> Any:
    def handler(_delivery: Delivery) -> None:
        raise exc

    return handler


def test_a_failed_attempt_waits_in_the_tier_of_its_attempt_number() -> None:
    processor = MessageProcessor(failing(ValueError("x")), max_attempts=4)
    tiers = [processor.process(delivery(attempt=n)).tier for n in (1, 2, 3)]
    assert tiers == [0, 1, 2]
    last = processor.process(delivery(attempt=4))
    assert (last.verdict, last.reason, last.error) == (
        Verdict.DEAD_LETTER,
        "max-attempts",
        "ValueError",
    )


def test_poison_skips_the_retries_and_systemic_settles_nothing() -> None:
    assert (
        MessageProcessor(failing(Poison("no"))).process(delivery()).verdict is Verdict.DEAD_LETTER
    )
    assert MessageProcessor(failing(Systemic("db"))).process(delivery()).verdict is Verdict.SYSTEMIC


def test_a_delivery_without_message_id_is_parked_not_processed() -> None:
    calls: list[Delivery] = []
    decision = MessageProcessor(calls.append).process(delivery(message_id=""))
    assert (decision.verdict, decision.reason) == (Verdict.DEAD_LETTER, "no-message-id")
    assert calls == []


def test_the_settler_sends_retries_to_their_tier_and_dead_letters_to_the_group_dlq() -> None:
    transport = MemoryTransport()
    settler = RabbitMqSettler(lambda _group: transport)
    processor = MessageProcessor(failing(ValueError("x")), max_attempts=2)
    items = [
        (delivery("a", attempt=1), processor.process(delivery("a", attempt=1))),
        (delivery("b", attempt=2), processor.process(delivery("b", attempt=2))),
    ]
    assert settler.settle(items) == [True, True]
    retry, parked = transport.published
    assert retry.redeliver_to == topology.retry_queue_name(Stakeholder.MEDIA, 5)
    assert retry.headers[topology.ATTEMPT_HEADER] == "2"
    assert parked.redeliver_to == topology.dead_letter_queue_name(Stakeholder.MEDIA)
    assert parked.headers[topology.DEAD_LETTER_REASON_HEADER] == "max-attempts"


def amazon_mq_event(count: int) -> dict[str, Any]:
    messages = [
        {
            "basicProperties": {
                "messageId": f"m-{i}",
                "type": "media.story.published",
                "headers": {
                    "case-region": {"bytes": list(b"north")},
                    topology.ATTEMPT_HEADER: {"bytes": list(b"1")},
                },
            },
            "redelivered": False,
            "data": base64.b64encode(b'{"n": %d}' % i).decode(),
        }
        for i in range(count)
    ]
    return {"eventSource": "aws:rmq", "rmqMessagesByQueue": {f"{WORK}::/": messages}}


def test_the_amazon_mq_handler_isolates_a_bad_message_from_its_batch() -> None:
    seen: list[Delivery] = []

    def handler(item: Delivery) -> None:
        seen.append(item)
        if item.message_id == "m-2":
            raise ValueError("bad")

    transport = MemoryTransport()
    handle = rabbitmq_batch_handler(
        MessageProcessor(handler), RabbitMqSettler(lambda _g: transport)
    )
    assert handle(amazon_mq_event(5), None) == {"done": 4, "retry": 1, "dead-letter": 0}
    assert [d.message_id for d in seen] == ["m-0", "m-1", "m-2", "m-3", "m-4"]
    assert seen[0].headers["case-region"] == "north"
    assert seen[0].body == b'{"n": 0}'
    assert [m.message_id for m in transport.published] == ["m-2"]


def test_a_table_or_forged_attempt_header_does_not_fail_the_amazon_mq_batch() -> None:
    # A table header (no "bytes") raised KeyError, and "²" passed isdigit() but not int():
    # either failed the whole batch on every delivery, until the delivery limit parked the
    # healthy messages of the batch with it.
    event = amazon_mq_event(3)
    headers = event["rmqMessagesByQueue"][f"{WORK}::/"][1]["basicProperties"]["headers"]
    headers["case-meta"] = {"region": "north"}
    headers[topology.ATTEMPT_HEADER] = {"bytes": list("\u00b2".encode())}
    seen: list[tuple[str, int]] = []
    handle = rabbitmq_batch_handler(
        MessageProcessor(lambda d: seen.append((d.message_id, d.attempt))),
        RabbitMqSettler(lambda _g: MemoryTransport()),
    )

    assert handle(event, None) == {"done": 3, "retry": 0, "dead-letter": 0}
    assert seen == [("m-0", 1), ("m-1", 1), ("m-2", 1)]


def test_the_amazon_mq_handler_fails_the_whole_batch_when_a_retry_cannot_be_stored() -> None:
    transport = MemoryTransport(fail_ids={"m-1"})
    handle = rabbitmq_batch_handler(
        MessageProcessor(failing(ValueError("x"))), RabbitMqSettler(lambda _g: transport)
    )
    with pytest.raises(BatchFailed):
        handle(amazon_mq_event(3), None)


def test_the_amazon_mq_handler_fails_the_batch_on_a_systemic_error() -> None:
    handle = rabbitmq_batch_handler(
        MessageProcessor(failing(Systemic("db down"))),
        RabbitMqSettler(lambda _g: MemoryTransport()),
    )
    with pytest.raises(BatchFailed):
        handle(amazon_mq_event(2), None)


class _Invocation:
    """A Lambda context whose remaining time runs down with the handler's sleeps."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds
        self.slept: list[float] = []

    def get_remaining_time_in_millis(self) -> int:
        return int(self.left * 1000)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.left -= seconds


def test_the_amazon_mq_handler_waits_out_a_short_outage_within_the_invocation() -> None:
    # Each failed invocation is one more delivery of the batch; ten, and the queue's limit
    # parks healthy messages. A dependency back within the invocation costs none.
    outage = [Systemic("db down")] * 4
    done: list[str] = []

    def handler(delivery: Delivery) -> None:
        if outage:
            raise outage.pop()
        done.append(delivery.message_id)

    invocation = _Invocation(300)
    handle = rabbitmq_batch_handler(
        MessageProcessor(handler),
        RabbitMqSettler(lambda _g: MemoryTransport()),
        sleep=invocation.sleep,
    )

    assert handle(amazon_mq_event(2), invocation)["done"] == 2
    assert invocation.slept == [1.0, 2.0, 4.0, 8.0]
    assert len(done) == 2


def test_the_amazon_mq_handler_fails_the_batch_when_the_outage_outlasts_the_invocation() -> None:
    invocation = _Invocation(100)
    handle = rabbitmq_batch_handler(
        MessageProcessor(failing(Systemic("db down"))),
        RabbitMqSettler(lambda _g: MemoryTransport()),
        sleep=invocation.sleep,
    )
    with pytest.raises(BatchFailed):
        handle(amazon_mq_event(2), invocation)
    # 63 s of waits; the next (60 s) would not leave its 10 s margin in the 37 s left.
    assert invocation.slept == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_the_amazon_mq_handler_refuses_another_event_shape() -> None:
    handle = rabbitmq_batch_handler(
        MessageProcessor(lambda _d: None), RabbitMqSettler(lambda _g: MemoryTransport())
    )
    with pytest.raises(ValueError, match="Amazon MQ"):
        handle({"Records": []}, None)


def test_an_sqs_batch_of_ten_with_three_failures_reports_exactly_those_three() -> None:
    bad = {mid("m-2"), mid("m-5"), mid("m-9")}
    processed: list[str] = []

    def handler(item: Delivery) -> None:
        if item.message_id in bad:
            raise ValueError("bad")
        processed.append(item.message_id)

    records = [
        {
            "messageId": f"sqs-{i}",
            "receiptHandle": f"h-{i}",
            "body": json.dumps({"n": i}),
            "attributes": {"ApproximateReceiveCount": "1"},
            "messageAttributes": {
                MESSAGE_ID_ATTRIBUTE: {"stringValue": mid(f"m-{i}"), "dataType": "String"},
                TOPIC_ATTRIBUTE: {"stringValue": "media.story.published", "dataType": "String"},
            },
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:ap-southeast-3:123456789012:fabric-dev-fallback-media",
        }
        for i in range(10)
    ]
    audit = MemoryAuditSink()
    handle = sqs_batch_handler(MessageProcessor(handler), audit=audit, consumer="consumer:media")
    response = handle({"Records": records}, None)

    failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
    assert failed == {"sqs-2", "sqs-5", "sqs-9"}
    assert len(processed) == 7
    # Audited: seven delivered, three retried (SQS, not the toolkit, parks them later).
    events = {r.message_id: (r.event, r.source, r.attempt) for r in audit.records}
    assert events == {
        mid(f"m-{i}"): (
            AuditEvent.RETRIED if mid(f"m-{i}") in bad else AuditEvent.DELIVERED,
            "consumer:media",
            1,
        )
        for i in range(10)
    }


def test_the_sqs_entry_point_hands_the_invocations_context_to_idempotency() -> None:
    # With it, a record in progress stands for the invocation's remaining time; without it,
    # for 60 s, after which a copy of a message still being processed was processed again.
    seen: list[Any] = []

    class Recording:
        def run(self, handler: Any, delivery: Delivery, context: Any) -> None:
            seen.append(context)
            handler(delivery)

    record = {
        "messageId": "sqs-0",
        "receiptHandle": "h-0",
        "body": "{}",
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {
            MESSAGE_ID_ATTRIBUTE: {"stringValue": "m-0", "dataType": "String"},
            TOPIC_ATTRIBUTE: {"stringValue": "media.story.published", "dataType": "String"},
        },
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:ap-southeast-3:123456789012:fabric-dev-fallback-media",
    }
    context = object()
    processor = MessageProcessor(lambda _d: None, idempotency=Recording())  # type: ignore[arg-type]

    response = sqs_batch_handler(processor)({"Records": [record]}, context)

    assert response == {"batchItemFailures": []}
    assert seen == [context]


def test_the_sqs_entry_point_audits_a_failure_on_the_last_receive_as_dead_lettered() -> None:
    # SQS parks a record in its DLQ after maxReceiveCount receives: the trail must say so.
    def handler(delivery: Delivery) -> None:
        raise ValueError("poison")

    def record(i: int, receives: int) -> dict[str, Any]:
        return {
            "messageId": f"sqs-{i}",
            "receiptHandle": f"h-{i}",
            "body": "{}",
            "attributes": {"ApproximateReceiveCount": str(receives)},
            "messageAttributes": {
                MESSAGE_ID_ATTRIBUTE: {"stringValue": mid(f"m-{i}"), "dataType": "String"},
                TOPIC_ATTRIBUTE: {"stringValue": "media.story.published", "dataType": "String"},
            },
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:ap-southeast-3:123456789012:fabric-dev-fallback-media",
        }

    audit = MemoryAuditSink()
    handle = sqs_batch_handler(MessageProcessor(handler), audit=audit, max_receives=5)
    response = handle({"Records": [record(0, 4), record(1, 5)]}, None)

    assert {item["itemIdentifier"] for item in response["batchItemFailures"]} == {"sqs-0", "sqs-1"}
    events = {r.message_id: (r.event, r.attempt) for r in audit.records}
    assert events == {
        mid("m-0"): (AuditEvent.RETRIED, 4),
        mid("m-1"): (AuditEvent.DEAD_LETTERED, 5),
    }

    # A systemic failure (a dependency down) on the last receive is parked by SQS all the same.
    def unavailable(delivery: Delivery) -> None:
        raise Systemic("the case system is down")

    audit = MemoryAuditSink()
    handle = sqs_batch_handler(MessageProcessor(unavailable), audit=audit, max_receives=5)
    handle({"Records": [record(2, 5)]}, None)
    assert [(r.event, r.reason) for r in audit.records] == [
        (AuditEvent.DEAD_LETTERED, "max-receives")
    ]
    (parked,) = [r for r in audit.records if r.event is AuditEvent.DEAD_LETTERED]
    assert parked.reason
    with pytest.raises(ValueError, match="maxReceiveCount"):
        sqs_batch_handler(MessageProcessor(handler), max_receives=0)


class _HeldByACrashedCopy:
    """Idempotency whose record for every message is still "in progress": the consumer that
    held it died mid-handler, and the record stands until it expires."""

    def run(self, handler: Any, delivery: Delivery, context: Any = None) -> None:
        raise InProgress("another copy of this message is being processed")


def test_a_copy_held_by_a_crashed_consumer_is_retried_without_spending_an_attempt() -> None:
    # Before, each clash was a failed attempt: an emergency reached max-attempts after its
    # 1 s, 5 s and 30 s tiers and was parked before its handler ever ran again.
    emergency_queue = topology.queue_name(Stakeholder.GOVERNMENT, emergency=True)
    held: Any = _HeldByACrashedCopy()
    processor = MessageProcessor(failing(ValueError("never called")), held, 4)
    transport = MemoryTransport()
    settler = RabbitMqSettler(lambda _group: transport)
    for attempt in (1, 4, 9):  # also past max_attempts: a clash is never the message's fault
        held = delivery("alert-1", attempt=attempt, queue=emergency_queue)
        decision = processor.process(held)
        assert (decision.verdict, decision.error) == (Verdict.RETRY, "InProgress")
        assert settler.settle([(held, decision)]) == [True]
        (retry,) = transport.published
        assert retry.headers[topology.ATTEMPT_HEADER] == str(attempt)  # not attempt + 1
        transport.published.clear()


@pytest.mark.parametrize(
    "bad",
    [
        DecryptionFailed("ciphertext is corrupt or under another key"),
        MessageRejected(Rejection(reason=Reason.MALFORMED_JSON, message="not JSON")),
    ],
)
def test_a_message_that_cannot_be_opened_is_parked_at_once_not_retried(bad: Exception) -> None:
    # DecryptionFailed (open_payload) and MessageRejected (Delivery.envelope) never succeed on
    # retry: before, they went through every tier (5 s, 30 s, 300 s) as ordinary failures and
    # were parked as max-attempts, their real cause hidden.
    decision = MessageProcessor(failing(bad), max_attempts=4).process(delivery(attempt=1))
    assert (decision.verdict, decision.reason, decision.error) == (
        Verdict.DEAD_LETTER,
        "poison",
        type(bad).__name__,
    )


def test_audit_records_the_audit_path_refused_are_sent_again_with_the_next_batch() -> None:
    # Before, a refused audit batch was only logged while its messages were acknowledged:
    # settled messages with no record at all, the trail short of what happened.
    audit = MemoryAuditSink(available=False)
    settler = RabbitMqSettler(lambda _group: MemoryTransport(), audit=audit, consumer="c")
    done = MessageProcessor(lambda _d: None)

    assert settler.settle([(delivery(mid("a")), done.process(delivery(mid("a"))))]) == [True]
    assert audit.records == []
    audit.available = True
    assert settler.settle([(delivery(mid("b")), done.process(delivery(mid("b"))))]) == [True]

    assert [(r.message_id, r.event) for r in audit.records] == [
        (mid("a"), AuditEvent.DELIVERED),
        (mid("b"), AuditEvent.DELIVERED),
    ]
    settler.settle([(delivery(mid("c")), done.process(delivery(mid("c"))))])
    assert [r.message_id for r in audit.records] == [mid("a"), mid("b"), mid("c")], (
        "sent once when stored"
    )


def test_the_sqs_entry_point_sends_records_an_invocation_could_not_store_with_the_next() -> None:
    def record(i: int) -> dict[str, Any]:
        return {
            "messageId": f"sqs-{i}",
            "receiptHandle": f"h-{i}",
            "body": "{}",
            "attributes": {"ApproximateReceiveCount": "1"},
            "messageAttributes": {
                MESSAGE_ID_ATTRIBUTE: {"stringValue": mid(f"m-{i}"), "dataType": "String"},
                TOPIC_ATTRIBUTE: {"stringValue": "media.story.published", "dataType": "String"},
            },
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:ap-southeast-3:123456789012:fabric-dev-fallback-media",
        }

    audit = MemoryAuditSink(available=False)
    handle = sqs_batch_handler(MessageProcessor(lambda _d: None), audit=audit)
    assert handle({"Records": [record(0)]}, None) == {"batchItemFailures": []}
    audit.available = True
    handle({"Records": [record(1)]}, None)
    assert [(r.message_id, r.event) for r in audit.records] == [
        (mid("m-0"), AuditEvent.DELIVERED),
        (mid("m-1"), AuditEvent.DELIVERED),
    ]


def audited(audit: Any, **options: Any) -> RabbitMqSettler:
    """A settler whose retries always store, auditing to ``audit``."""
    return RabbitMqSettler(lambda _group: MemoryTransport(), audit=audit, consumer="c", **options)


def settle_handled(settler: RabbitMqSettler, *names: str) -> None:
    """Settles one handled delivery for each of ``names``, each in a settlement of its own."""
    done = MessageProcessor(lambda _d: None)
    for name in names:
        settler.settle([(delivery(mid(name)), done.process(delivery(mid(name))))])


def test_audit_records_the_audit_path_refused_are_counted_kept_or_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before, a refused consumer audit batch reached only the log: no metric to alarm on.
    monkeypatch.setattr(consumer, "MAX_UNSENT_AUDIT_RECORDS", 2)
    audit, sink = MemoryAuditSink(available=False), MemoryMetrics()
    settler = audited(audit, metrics=sink)
    done = MessageProcessor(lambda _d: None)

    settle_handled(settler, "a")
    assert sink.totals == {metrics.AUDIT_RECORDS_UNSENT: 1, metrics.AUDIT_RECORDS_LOST: 0}
    settler.settle([(delivery(mid(i)), done.process(delivery(mid(i)))) for i in ("b", "c")])
    # a, b and c refused: two kept for the next batch, the oldest dropped for good.
    assert sink.totals == {metrics.AUDIT_RECORDS_UNSENT: 3, metrics.AUDIT_RECORDS_LOST: 1}
    audit.available = True
    settle_handled(settler, "d")
    assert sink.calls == 2, "nothing counted once the audit path stores again"
    assert [r.message_id for r in audit.records] == [mid("b"), mid("c"), mid("d")]


class StoredButUnconfirmed(MemoryTransport):
    """Stores every publish; the first is answered TIMEOUT, as when its confirm was lost."""

    def publish(self, messages: Any, *, meanwhile: Any = None) -> list[Outcome]:
        outcomes = super().publish(messages, meanwhile=meanwhile)
        if len(self.published) == len(outcomes):  # the first call
            return [Outcome(o.message_id, failure=Failure.TIMEOUT) for o in outcomes]
        return outcomes


def test_a_kept_back_audit_batch_is_sent_again_under_its_own_batch_id() -> None:
    # Before, kept-back records went out merged into the next batch, under a new batch id: a
    # batch stored whose confirm was lost was written twice, while the audit writer drops a
    # batch id it already wrote.
    transport = StoredButUnconfirmed()
    settle_handled(audited(TransportAuditSink([transport], emitted_by="c")), "a", "b")

    first, again, later = transport.published
    assert again.message_id == first.message_id
    assert again.body == first.body
    assert [r["message_id"] for r in decode_audit_batch(later.body).records] == [mid("b")]


def test_kept_back_audit_batches_are_sent_again_once_due_without_a_settlement() -> None:
    now = [0.0]
    audit = MemoryAuditSink(available=False)
    settler = audited(audit, clock=lambda: now[0])
    settle_handled(settler, "a")  # kept
    audit.available = True

    now[0] = consumer.RESEND_FIRST_WAIT_S - 0.01
    settler.resend_audit()
    assert audit.records == []  # not due yet
    now[0] = consumer.RESEND_FIRST_WAIT_S
    settler.resend_audit()
    assert [r.message_id for r in audit.records] == [mid("a")]


def test_resends_the_audit_path_refuses_back_off() -> None:
    now = [0.0]
    tries: list[float] = []

    class Refusing(MemoryAuditSink):
        def emit(self, records: Any, bodies: Any = None, *, prepared: Any = None) -> bool:
            tries.append(now[0])
            return False

    settler = audited(Refusing(), clock=lambda: now[0])
    settle_handled(settler, "a")  # kept
    for tick in range(1, 2000):  # 200 s of an idle consumer's looks, ten a second
        now[0] = tick / 10
        settler.resend_audit()

    waits = [later - earlier for earlier, later in itertools.pairwise(tries)]
    assert waits[:7] == pytest.approx([1, 2, 4, 8, 16, 32, 60])
    assert max(waits) == pytest.approx(consumer.RESEND_MAX_WAIT_S)


def test_past_the_bound_only_the_oldest_batches_beyond_it_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A review found every kept batch but the newest dropped once the bound was passed by one
    # record: 10,000 records lost where one had to go.
    monkeypatch.setattr(consumer, "MAX_UNSENT_AUDIT_RECORDS", 5)
    audit, sink = MemoryAuditSink(available=False), MemoryMetrics()
    settler = audited(audit, metrics=sink)
    names = [str(i) for i in range(6)]
    settle_handled(settler, *names)  # one record each, as on an emergency queue (prefetch 1)

    assert sink.totals[metrics.AUDIT_RECORDS_LOST] == 1
    audit.available = True
    for _ in range(3):  # one kept batch, then two, then the last two
        settler.settle([])
    assert [r.message_id for r in audit.records] == [mid(name) for name in names[1:]]


class FullAuditQueue(MemoryTransport):
    """Counts publishes (``calls``) and stores only as many messages of each as ``room``
    allows (a ``reject-publish`` queue at its limit, which the writer frees a little at a
    time; None: room for all); nacks the rest."""

    room: int | None = 0
    calls: int = 0

    def publish(self, messages: Any, *, meanwhile: Any = None) -> list[Outcome]:
        self.calls += 1
        outcomes = []
        for message in messages:
            if self.room is None or self.room > 0:
                self.room = None if self.room is None else self.room - 1
                self.published.append(message)
                outcomes.append(Outcome(message.message_id, transport=self.name))
            else:
                outcomes.append(Outcome(message.message_id, failure=Failure.NACKED))
        return outcomes


def test_a_long_backlog_goes_out_in_a_few_publishes_not_a_round_trip_a_batch() -> None:
    # A review measured 2,000 kept one-record batches sent one publish (and confirm) each:
    # 4 s on a local broker, and over a minute with 1 ms of latency, during which the consumer
    # handled nothing and the broker dropped its connection for missed heartbeats.
    now = [0.0]
    transport = FullAuditQueue()
    settler = audited(TransportAuditSink([transport], emitted_by="c"), clock=lambda: now[0])
    settle_handled(settler, *(str(i) for i in range(1200)))  # all refused: no room
    transport.room, transport.calls = None, 0

    now[0] = consumer.RESEND_MAX_WAIT_S
    for _ in range(3):  # three looks of an idle consumer
        settler.resend_audit()

    assert transport.calls == 3  # 500, 500 and 200 batches, each chunk in one publish
    assert len(transport.published) == 1200
    settler.resend_audit()
    assert transport.calls == 3  # nothing left to send


@pytest.mark.parametrize("freed", [1, 5])
def test_a_full_audit_queue_that_frees_room_slowly_still_takes_the_backlog(freed: int) -> None:
    # A review found a 500-batch publish into a full queue stored in part, refused as a whole,
    # and sent again from its oldest batch: each freed place took a copy the writer drops, and
    # the backlog never shrank. Each batch stored now leaves the backlog.
    transport = FullAuditQueue()
    settler = audited(TransportAuditSink([transport], emitted_by="c"))
    settle_handled(settler, *(f"kept-{i}" for i in range(1000)))  # refused: the queue is full
    for i in range(300):  # the writer frees places before each settlement
        transport.room = (transport.room or 0) + freed
        settle_handled(settler, f"new-{i}")

    stored = Counter(message.message_id for message in transport.published)
    assert max(stored.values()) == 1  # no place spent on a copy
    assert len(stored) == min(300 * freed, 1300)  # each place freed took a batch till all went


def test_an_interrupt_at_any_line_of_a_send_loses_no_kept_batch() -> None:
    # A review found the refused batches of a send held only in a local variable for a few
    # lines, between taking the chunk off the backlog and putting the refused ones back: a
    # SIGTERM (SystemExit) there lost up to 500 batches, never stored.
    code = consumer._AuditBacklog._send.__code__
    lines = {
        line for _, _, line in code.co_lines() if line is not None and line > code.co_firstlineno
    }
    for line in sorted(lines):
        transport = FullAuditQueue()  # no room: every publish refused
        settler = audited(TransportAuditSink([transport], emitted_by="c"))
        settle_handled(settler, "kept-1", "kept-2", "kept-3")

        def interrupt(frame: Any, event: str, _arg: Any, at: int = line) -> Any:
            if frame.f_code is not code:
                return None

            def local(frame: Any, event: str, _arg: Any) -> Any:
                if event == "line" and frame.f_lineno == at:
                    raise KeyboardInterrupt
                return local

            return local

        previous = sys.gettrace()
        sys.settrace(interrupt)
        try:
            settle_handled(settler, "b")
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(previous)
        transport.room = None  # the path is back; the consumer's way out settles "b" again
        settle_handled(settler, "b")

        stored = {
            record["message_id"]
            for message in transport.published
            for record in decode_audit_batch(message.body).records
        }
        assert stored == {mid(name) for name in ("kept-1", "kept-2", "kept-3", "b")}, line


def test_an_interrupt_while_the_audit_batch_is_sent_keeps_the_records_kept_back() -> None:
    # Before, the kept-back records were taken out of the backlog before the audit path was
    # called: a KeyboardInterrupt there (a SIGTERM during a settlement) lost them for good,
    # while the consumer's second settlement on the way out sent only the current batch again.
    class InterruptOnce(MemoryAuditSink):
        interrupt = False

        def emit(self, records: Any, bodies: Any = None, *, prepared: Any = None) -> bool:
            if self.interrupt:
                self.interrupt = False
                raise KeyboardInterrupt
            return super().emit(records, bodies, prepared=prepared)

    audit = InterruptOnce(available=False)
    settler = RabbitMqSettler(lambda _group: MemoryTransport(), audit=audit, consumer="c")
    done = MessageProcessor(lambda _d: None)

    settler.settle([(delivery(mid("a")), done.process(delivery(mid("a"))))])  # refused: kept
    audit.available, audit.interrupt = True, True
    with pytest.raises(KeyboardInterrupt):
        settler.settle([(delivery(mid("b")), done.process(delivery(mid("b"))))])
    # the consumer's way out settles the interrupted group again
    settler.settle([(delivery(mid("b")), done.process(delivery(mid("b"))))])
    assert [r.message_id for r in audit.records] == [mid("a"), mid("b")]


def test_the_ready_made_settler_counts_audit_records_it_could_not_send() -> None:
    # consumer_settler is what RabbitMqConsumer and the Amazon MQ Lambdas use; without a way
    # to pass metrics, their refused audit records reached only the log.
    with socket.socket() as probe:  # a loopback port nothing listens on: the broker is down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = RabbitSettings("127.0.0.1", port, lambda: ("guest", "guest"), connect_timeout=0.5)
    sink = MemoryMetrics()
    settler = consumer_settler(settings, "fabric.media", consumer="c", metrics=sink)
    done = MessageProcessor(lambda _d: None)
    settler.settle([(delivery("a"), done.process(delivery("a")))])
    assert sink.totals == {metrics.AUDIT_RECORDS_UNSENT: 1, metrics.AUDIT_RECORDS_LOST: 0}


def test_the_sqs_entry_point_counts_audit_records_the_audit_path_refused() -> None:
    record = {
        "messageId": "sqs-0",
        "receiptHandle": "h-0",
        "body": "{}",
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {
            MESSAGE_ID_ATTRIBUTE: {"stringValue": "m-0", "dataType": "String"},
            TOPIC_ATTRIBUTE: {"stringValue": "media.story.published", "dataType": "String"},
        },
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:ap-southeast-3:123456789012:fabric-dev-fallback-media",
    }
    sink = MemoryMetrics()
    handle = sqs_batch_handler(
        MessageProcessor(lambda _d: None), audit=MemoryAuditSink(available=False), metrics=sink
    )
    assert handle({"Records": [record]}, None) == {"batchItemFailures": []}
    assert sink.totals == {metrics.AUDIT_RECORDS_UNSENT: 1, metrics.AUDIT_RECORDS_LOST: 0}
