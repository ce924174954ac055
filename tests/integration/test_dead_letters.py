"""Dead-letter drills on the real local RabbitMQ (and moto's DynamoDB for idempotency).

Retries with spacing, dead letters after exactly the limit, the broker's own delivery limit, a
missing DLQ, a consumer that dies before acking, one side effect for duplicate and concurrent
deliveries, and redrive runs (filters, dry run, interrupted and re-run).
"""

from __future__ import annotations

import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import pika
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from fabric import topology
from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
from fabric.adapters.rabbitmq_dlq import RabbitMqDeadLetterQueue
from fabric.audit import AuditEvent, decode_audit_batch
from fabric.bootstrap import exchange_for
from fabric.consumer import Delivery, Idempotency, MessageProcessor, Poison, Systemic, Verdict
from fabric.envelope import new_message_id
from fabric.ports import DeadLetter
from fabric.redrive import RedriveFilter, RedrivePlan, Redriver
from fabric.stakeholders import Stakeholder
from tests.integration.aws_audit import create_idempotency_table
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import AMQP, GUEST, management
from tests.integration.queue_waits import depth, settled_depth, settled_empty
from tests.message_ids import msg_id

GROUP = Stakeholder.COMMUNITY
WORK = topology.queue_name(GROUP)
DLQ = topology.dead_letter_queue_name(GROUP)
EMERGENCY_WORK = topology.queue_name(GROUP, emergency=True)
EMERGENCY_DLQ = topology.dead_letter_queue_name(GROUP, emergency=True)


def settings(vhost: str) -> RabbitSettings:
    """The consumers' and the redrive's broker settings. No test here measures the connect or
    the confirm timeout: both are wide (the confirm timeout the tools', ``bootstrap``), so an
    AMQP handshake or a confirm slowed by a busy shared broker is not taken for an outage."""
    return RabbitSettings(
        host=AMQP[0],
        port=AMQP[1],
        credentials=lambda: GUEST,
        vhost=vhost,
        connect_timeout=10,
        confirm_timeout=5,
    )


@pytest.fixture
def amqp(broker_vhost: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            *AMQP, virtual_host=broker_vhost, credentials=pika.PlainCredentials(*GUEST)
        )
    )
    channel = connection.channel()
    channel.confirm_delivery()
    yield channel
    connection.close()


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An idempotency table of the infra's schema (``id``, TTL ``expiration``) in moto."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        client = boto3.client("dynamodb", region_name=REGION)
        create_idempotency_table(client, "fabric-test-idempotency")
        yield "fabric-test-idempotency"


def publish(channel: Any, queue: str, message_id: str, *, topic: str = "community.update") -> None:
    channel.basic_publish(
        topology.REDELIVER_EXCHANGE,
        queue,
        b'{"note": "not child data"}',
        pika.BasicProperties(
            message_id=message_id,
            type=topic,
            delivery_mode=2,
            headers={"fabric-audience": "all", "case-region": "north"},
        ),
        mandatory=True,
    )


def drain_ids(channel: Any, queue: str) -> list[str]:
    ids = []
    while True:
        method, properties, _ = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return ids
        ids.append(properties.message_id)


def dead_letter_queue(vhost: str, queue: str = DLQ) -> RabbitMqDeadLetterQueue:
    origin = RabbitMqTransport(settings(vhost), exchange_for=exchange_for)
    return RabbitMqDeadLetterQueue(settings(vhost), queue, origin=origin)


# -- retries and dead letters -----------------------------------------------------------------


def test_poison_message_is_retried_with_growing_spacing_then_dead_lettered_after_the_limit(
    broker_vhost: str, amqp: Any
) -> None:
    attempts: list[float] = []

    def handler(_delivery: Delivery) -> None:
        attempts.append(time.monotonic())
        raise ValueError("cannot parse")

    publish(amqp, EMERGENCY_WORK, "poison-1")
    consumer = RabbitMqConsumer(
        settings(broker_vhost), EMERGENCY_WORK, MessageProcessor(handler, max_attempts=3)
    )
    counts = consumer.run(max_messages=3, idle_timeout_s=15)

    assert len(attempts) == 3, "exactly max_attempts attempts"
    assert counts == {"retry": 2, "dead-letter": 1}
    first_gap, second_gap = attempts[1] - attempts[0], attempts[2] - attempts[1]
    tiers = topology.EMERGENCY_RETRY_TIERS_SECONDS
    assert first_gap >= tiers[0] - 0.1
    assert second_gap >= tiers[1] - 0.1
    assert second_gap > first_gap
    settled_empty(
        amqp,
        EMERGENCY_WORK,
        *(topology.retry_queue_name(GROUP, seconds, emergency=True) for seconds in tiers),
    )
    method, properties, _ = amqp.basic_get(EMERGENCY_DLQ, auto_ack=True)
    assert method is not None
    assert properties.message_id == "poison-1"
    assert properties.headers[topology.DEAD_LETTER_REASON_HEADER] == "max-attempts"
    assert properties.headers[topology.ERROR_HEADER] == "ValueError"
    assert properties.headers["case-region"] == "north", "application headers travel along"


def test_a_consumer_that_keeps_crashing_hits_the_broker_delivery_limit(
    broker_vhost: str, amqp: Any
) -> None:
    publish(amqp, WORK, "crash-loop")
    for _ in range(topology.DELIVERY_LIMIT + 1):
        method, _, _ = amqp.basic_get(WORK)
        if method is None:
            break
        amqp.basic_nack(method.delivery_tag, requeue=True)  # what a crashed consumer leaves
    settled_depth(amqp, DLQ, 1)  # the broker dead-letters it in the background

    letters = dead_letter_queue(broker_vhost).peek(10)

    assert [letter.message_id for letter in letters] == ["crash-loop"]
    assert letters[0].reason == "delivery_limit"
    assert letters[0].origin == WORK
    assert letters[0].dead_lettered_at is not None
    settled_empty(amqp, WORK)


def test_a_dependency_outage_pauses_the_consumer_without_using_up_the_delivery_limit(
    broker_vhost: str, amqp: Any
) -> None:
    # More systemic failures in a row than the queue's delivery limit (10): handed back each
    # time, the message would be dead-lettered as delivery_limit while nothing is wrong with it.
    publish(amqp, WORK, "alert-during-outage")
    failures: list[str] = []

    def handler(delivery: Delivery) -> None:
        if len(failures) < 12:
            failures.append(delivery.message_id)
            raise Systemic("the database is down")

    consumer = RabbitMqConsumer(
        settings(broker_vhost),
        WORK,
        MessageProcessor(handler),
        backoff_s=0.001,
        max_backoff_s=0.01,
    )
    counts = consumer.run(max_messages=1, idle_timeout_s=5)

    assert counts == {"systemic": 12, "done": 1}
    settled_empty(amqp, DLQ, WORK)


def test_a_missing_dlq_keeps_the_message_in_its_work_queue(broker_vhost: str, amqp: Any) -> None:
    vhost = urllib.parse.quote(broker_vhost, safe="")
    management("DELETE", f"queues/{vhost}/{DLQ}")
    publish(amqp, WORK, "nowhere-to-park")

    def poison(_delivery: Delivery) -> None:
        raise ValueError("bad")

    consumer = RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(poison, max_attempts=1), backoff_s=0
    )
    counts = consumer.run(max_messages=1, idle_timeout_s=5)

    assert counts == {"systemic": 1}, "the park was refused, so nothing was settled"
    settled_depth(amqp, WORK, 1)  # handed back: it reaches the quorum queue a moment later
    assert drain_ids(amqp, WORK) == ["nowhere-to-park"]


def test_a_retried_and_a_parked_message_keep_their_reply_to_and_correlation_id(
    broker_vhost: str, amqp: Any
) -> None:
    # Before, the toolkit's republish dropped reply_to: a request that failed once lost the
    # address its answer goes to, though the redrive kept it for what it moved.
    amqp.basic_publish(
        topology.REDELIVER_EXCHANGE,
        EMERGENCY_WORK,
        b"{}",
        pika.BasicProperties(
            message_id="request-1",
            type="community.update",
            correlation_id="case-7",
            reply_to="fabric.government",
            delivery_mode=2,
            headers={"fabric-audience": "all"},
        ),
        mandatory=True,
    )
    seen: list[tuple[str | None, str | None]] = []

    def handler(delivery: Delivery) -> None:
        seen.append((delivery.correlation_id, delivery.reply_to))
        raise ValueError("the case system refused it")

    consumer = RabbitMqConsumer(
        settings(broker_vhost), EMERGENCY_WORK, MessageProcessor(handler, max_attempts=2)
    )
    assert consumer.run(max_messages=2, idle_timeout_s=5) == {"retry": 1, "dead-letter": 1}

    assert seen == [("case-7", "fabric.government")] * 2, "the retried copy keeps them"
    method, properties, _ = amqp.basic_get(EMERGENCY_DLQ, auto_ack=True)
    assert method is not None
    assert (properties.correlation_id, properties.reply_to) == ("case-7", "fabric.government")


def test_the_consumer_audits_what_it_settled_on_the_audit_exchange_as_its_user(
    broker_vhost: str, amqp: Any
) -> None:
    fine, broken = new_message_id(), new_message_id()  # the toolkit records only valid ids

    def handler(delivery: Delivery) -> None:
        if delivery.message_id != fine:
            raise ValueError("cannot parse")

    publish(amqp, WORK, fine)
    publish(amqp, WORK, broken)
    consumer = RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(handler, max_attempts=1)
    )
    assert consumer.run(max_messages=2, idle_timeout_s=5) == {"done": 1, "dead-letter": 1}

    batches = []
    while True:
        method, properties, body = amqp.basic_get(topology.AUDIT_QUEUE, auto_ack=True)
        if method is None:
            break
        assert properties.user_id == GUEST[0]  # validated by the broker: the publisher
        batches.append(decode_audit_batch(body))
    records = {r["message_id"]: r for b in batches for r in b.records}
    assert records[fine]["event"] == "delivered"
    assert records[fine]["queues"] == [WORK]
    assert records[broken]["event"] == "dead-lettered"
    assert (records[broken]["reason"], records[broken]["queues"]) == ("max-attempts", [DLQ])
    assert {r["emitted_by"] for r in records.values()} == {f"consumer:{GROUP}"}


def test_the_consumer_settles_a_window_of_messages_with_one_audit_batch(
    broker_vhost: str, amqp: Any
) -> None:
    ids = [new_message_id() for _ in range(10)]  # the toolkit records only valid ids
    for message_id in ids:
        publish(amqp, WORK, message_id)
    consumer = RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(lambda _d: None), prefetch=20
    )
    assert consumer.run(max_messages=10, idle_timeout_s=5) == {"done": 10}

    settled_empty(amqp, WORK)  # every one acknowledged
    batches = []
    while (got := amqp.basic_get(topology.AUDIT_QUEUE, auto_ack=True))[0] is not None:
        batches.append(decode_audit_batch(got[2]))
    assert sorted(r["message_id"] for b in batches for r in b.records) == sorted(ids)
    assert len(batches) < len(ids)  # not one audit publish (and confirm) per message


def test_a_consumer_stopped_mid_window_acknowledges_only_what_it_settled(
    broker_vhost: str, amqp: Any
) -> None:
    # The group's acknowledgement covers every delivery up to its last tag: the 25 the broker
    # has already pushed into the prefetch window, unhandled, must not be among them.
    ids = [f"window-{i:02d}" for i in range(30)]
    for message_id in ids:
        publish(amqp, WORK, message_id)
    handled: list[str] = []
    consumer = RabbitMqConsumer(
        settings(broker_vhost),
        WORK,
        MessageProcessor(lambda delivery: handled.append(delivery.message_id)),
        prefetch=20,
    )

    assert consumer.run(max_messages=5, idle_timeout_s=5) == {"done": 5}

    assert handled == ids[:5]
    assert settled_depth(amqp, WORK, 25) == 25
    assert sorted(drain_ids(amqp, WORK)) == ids[5:]


def test_a_group_with_one_unsettled_message_acknowledges_the_others_and_requeues_it(
    broker_vhost: str, amqp: Any
) -> None:
    vhost = urllib.parse.quote(broker_vhost, safe="")
    management("DELETE", f"queues/{vhost}/{DLQ}")
    publish(amqp, WORK, "fine")
    publish(amqp, WORK, "nowhere-to-park")

    def handler(delivery: Delivery) -> None:
        if delivery.message_id != "fine":
            raise ValueError("bad")

    consumer = RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(handler, max_attempts=1), backoff_s=0
    )

    assert consumer.run(max_messages=2, idle_timeout_s=5) == {"done": 1, "systemic": 1}
    assert settled_depth(amqp, WORK, 1) == 1
    assert drain_ids(amqp, WORK) == ["nowhere-to-park"]


def test_a_consumer_that_dies_before_acking_gets_it_again_and_processes_once(
    broker_vhost: str, amqp: Any, table: str
) -> None:
    side_effects: list[str] = []

    class Died(BaseException):
        """The process is killed between its handler and its ack."""

    class DiesBeforeAck(MessageProcessor):
        def process(self, delivery: Delivery, context: Any = None) -> Any:
            super().process(delivery, context)
            raise Died

    def handler(delivery: Delivery) -> None:
        side_effects.append(delivery.message_id)

    publish(amqp, WORK, "once-only")
    with pytest.raises(Died):
        RabbitMqConsumer(
            settings(broker_vhost),
            WORK,
            DiesBeforeAck(handler, idempotency=Idempotency(table, consumer="drill")),
        ).run(max_messages=1, idle_timeout_s=5)
    counts = RabbitMqConsumer(
        settings(broker_vhost),
        WORK,
        MessageProcessor(handler, idempotency=Idempotency(table, consumer="drill")),
    ).run(max_messages=1, idle_timeout_s=5)

    assert counts == {"done": 1}
    assert side_effects == ["once-only"]
    settled_empty(amqp, WORK)


def test_the_same_message_twice_and_concurrently_has_one_side_effect(table: str) -> None:
    side_effects: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def slow(delivery: Delivery) -> None:
        inside.set()
        release.wait(5)
        side_effects.append(delivery.message_id)

    delivery = Delivery(message_id="dup-1", topic="t", body=b"{}", queue=WORK)
    # Two instances, as two Lambda environments would be: their own store, the same table.
    first = MessageProcessor(slow, idempotency=Idempotency(table, consumer="drill"))
    second = MessageProcessor(slow, idempotency=Idempotency(table, consumer="drill"))
    results: dict[str, Verdict] = {}
    worker = threading.Thread(target=lambda: results.update(a=first.process(delivery).verdict))
    worker.start()
    assert inside.wait(5)
    concurrent = second.process(delivery)
    release.set()
    worker.join(5)
    later = second.process(delivery)

    assert results["a"] is Verdict.DONE
    assert concurrent.verdict is Verdict.RETRY, "the concurrent copy is retried later"
    assert later.verdict is Verdict.DONE
    assert side_effects == ["dup-1"]


class _SuccessNotSaved:
    """A DynamoDB client whose first ``update_item`` (Powertools' save of the COMPLETED
    record, after the handler returned) fails, as a throttle or a network error would."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.failures = 1

    def update_item(self, **arguments: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise ClientError(
                {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "x"}},
                "UpdateItem",
            )
        return self._client.update_item(**arguments)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_a_handler_that_finished_is_settled_done_when_its_record_cannot_be_saved(
    broker_vhost: str, amqp: Any, table: str
) -> None:
    # Before, the failed save was Systemic: the consumer held the message and tried it again,
    # met the record still "in progress", sent it to a retry tier, and ran the handler a second
    # time once that record expired (emergency_timeout_s here): the side effect done twice.
    side_effects: list[str] = []
    client = _SuccessNotSaved(boto3.client("dynamodb", region_name=REGION))
    idempotency = Idempotency(table, consumer="drill", client=client, emergency_timeout_s=1)
    publish(amqp, EMERGENCY_WORK, "saved-late")

    counts = RabbitMqConsumer(
        settings(broker_vhost),
        EMERGENCY_WORK,
        MessageProcessor(lambda d: side_effects.append(d.message_id), idempotency=idempotency),
        backoff_s=0.01,
        max_backoff_s=0.01,
    ).run(max_messages=10, idle_timeout_s=4)

    assert client.failures == 0, "the save did fail"
    assert side_effects == ["saved-late"]
    assert counts == {"done": 1}
    settled_empty(amqp, EMERGENCY_WORK)


# -- redrive ----------------------------------------------------------------------------------


def park(
    channel: Any,
    count: int,
    *,
    prefix: str,
    topic: str = "community.update",
    at: int | None = None,
) -> list[str]:
    """Dead letters as the consumer toolkit parks them (through the group's retry exchange),
    dead-lettered at ``at`` (epoch seconds; default an hour ago); their ids, in order."""
    at = int(time.time()) - 3600 if at is None else at
    ids = [msg_id(f"{prefix}-{i:04d}") for i in range(count)]
    for message_id in ids:
        channel.basic_publish(
            topology.retry_exchange_name(GROUP),
            DLQ,
            b'{"note": "not child data"}',
            pika.BasicProperties(
                message_id=message_id,
                type=topic,
                delivery_mode=2,
                headers={
                    "fabric-audience": "all",
                    topology.DEAD_LETTER_REASON_HEADER: "max-attempts",
                    topology.DEAD_LETTERED_AT_HEADER: str(at),
                    topology.ATTEMPT_HEADER: "4",
                },
            ),
            mandatory=True,
        )
    return ids


def test_redrive_moves_matching_letters_back_to_their_work_queue_with_audit(
    broker_vhost: str, amqp: Any
) -> None:
    moved_ids = park(amqp, 5, prefix="case", topic="community.case.update")
    kept_ids = park(amqp, 3, prefix="media", topic="community.media.story")
    audit = MemoryAuditSink()

    report = Redriver(ledger=MemoryRedriveLedger(), audit=audit).run(
        dead_letter_queue(broker_vhost),
        RedrivePlan(selection=RedriveFilter(topics=("community.case.#",))),
    )

    assert (report.scanned, report.matched, report.moved) == (8, 5, 5)
    method, properties, _ = amqp.basic_get(WORK, auto_ack=True)
    assert method is not None
    assert properties.headers[topology.REDRIVES_HEADER] == "1"
    assert topology.ATTEMPT_HEADER not in properties.headers, "a redriven message starts afresh"
    assert sorted([properties.message_id, *drain_ids(amqp, WORK)]) == sorted(moved_ids)
    assert settled_depth(amqp, DLQ, len(kept_ids)) == len(kept_ids)
    assert sorted(drain_ids(amqp, DLQ)) == sorted(kept_ids), "the rest is given back untouched"
    assert [r.message_id for r in audit.records] == moved_ids
    assert {r.event for r in audit.records} == {AuditEvent.REDRIVEN}


def test_redrive_dry_run_lists_and_moves_nothing(broker_vhost: str, amqp: Any) -> None:
    ids = park(amqp, 4, prefix="dry")

    report = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
        dead_letter_queue(broker_vhost),
        RedrivePlan(
            selection=RedriveFilter(reasons=frozenset({"max-attempts"}), older_than_s=600),
            dry_run=True,
        ),
    )

    assert [item.message_id for item in report.listed] == ids
    assert all(item.age_s is not None and item.age_s >= 3600 for item in report.listed)
    assert report.moved == 0
    settled_empty(amqp, WORK)
    assert settled_depth(amqp, DLQ, 4) == 4


def test_an_interrupted_redrive_rerun_delivers_every_message_exactly_once(
    broker_vhost: str, amqp: Any
) -> None:
    ids = park(amqp, 300, prefix="bulk")
    ledger, audit = MemoryRedriveLedger(), MemoryAuditSink()

    class Killed(BaseException):
        """The run is killed after its second batch was put back and before it was removed."""

    class KilledMidway(RabbitMqDeadLetterQueue):
        removes = 0

        def remove(self, letters: list[DeadLetter]) -> set[str]:  # type: ignore[override]
            self.removes += 1
            if self.removes == 2:
                raise Killed
            return super().remove(letters)

    origin = RabbitMqTransport(settings(broker_vhost), exchange_for=exchange_for)
    with pytest.raises(Killed):
        Redriver(ledger=ledger, audit=audit).run(
            KilledMidway(settings(broker_vhost), DLQ, origin=origin)
        )
    assert settled_depth(amqp, WORK, 200) == 200
    assert settled_depth(amqp, DLQ, 200) == 200, "the killed run gave back what it held"
    rerun = Redriver(ledger=ledger, audit=audit).run(dead_letter_queue(broker_vhost))

    assert rerun.already_moved == 100, "the killed batch is only removed, not sent again"
    assert rerun.moved == 100
    arrived = drain_ids(amqp, WORK)
    assert sorted(arrived) == sorted(ids), "every message exactly once at the destination"
    settled_empty(amqp, DLQ)
    assert sorted(r.message_id or "" for r in audit.records) == sorted(ids)


def test_two_dead_letter_copies_of_one_message_go_back_once(broker_vhost: str, amqp: Any) -> None:
    # Two copies of one letter, dead-lettered at the same second with one message id and one
    # redrive count (the ledger's key): the second is taken for the first, already moved.
    # (Copies a crashed consumer parks again carry a later time, and both go back.)
    at = int(time.time()) - 3600
    (twin,) = park(amqp, 1, prefix="twin", at=at)
    park(amqp, 1, prefix="twin", at=at)
    audit = MemoryAuditSink()

    report = Redriver(ledger=MemoryRedriveLedger(), audit=audit).run(
        dead_letter_queue(broker_vhost)
    )

    assert (report.moved, report.already_moved) == (1, 1)
    assert drain_ids(amqp, WORK) == [twin]
    settled_empty(amqp, DLQ)
    assert [r.message_id for r in audit.records] == [twin]


def test_a_poison_letter_parked_again_during_a_run_is_not_sent_round_again(
    broker_vhost: str, amqp: Any
) -> None:
    # The consumer parks the redriven letter again at once; before, the same run met the new
    # copy at the DLQ's tail and sent it round again, up to max_messages times.
    (poison_id,) = park(amqp, 1, prefix="still-poison")
    handled: list[str] = []

    def poison(delivery: Delivery) -> None:
        handled.append(delivery.message_id)
        raise Poison("still cannot be parsed")

    stop = threading.Event()
    consumer = RabbitMqConsumer(settings(broker_vhost), WORK, MessageProcessor(poison))
    worker = threading.Thread(target=lambda: consumer.run(stop=stop, idle_timeout_s=20))
    worker.start()
    try:
        report = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
            dead_letter_queue(broker_vhost), RedrivePlan(max_messages=5, rate_per_s=2)
        )
        deadline = time.monotonic() + 5
        while not handled and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(10)

    assert report.moved == 1
    assert handled == [poison_id]
    assert settled_depth(amqp, DLQ, 1) == 1, "parked again, for a later run"


def test_letters_without_a_message_id_are_each_moved_not_taken_for_one_another(
    broker_vhost: str, amqp: Any
) -> None:
    bodies = [b'{"note": "first"}', b'{"note": "second"}', b'{"note": "third"}']
    for body in bodies:  # what the toolkit parks as no-message-id
        amqp.basic_publish(
            topology.retry_exchange_name(GROUP),
            DLQ,
            body,
            pika.BasicProperties(
                delivery_mode=2,
                headers={"fabric-audience": "all", topology.DEAD_LETTER_REASON_HEADER: "x"},
            ),
            mandatory=True,
        )
    ledger = MemoryRedriveLedger()
    redriver = Redriver(ledger=ledger, audit=MemoryAuditSink())

    # One letter a run, as batches and reruns meet them: each is new to the ledger.
    reports = [
        redriver.run(dead_letter_queue(broker_vhost), RedrivePlan(max_messages=1)) for _ in bodies
    ]

    assert [(r.moved, r.already_moved) for r in reports] == [(1, 0)] * 3
    arrived = []
    while (got := amqp.basic_get(WORK, auto_ack=True))[0] is not None:
        arrived.append(got[2])
    assert sorted(arrived) == sorted(bodies)
    settled_empty(amqp, DLQ)


def test_a_redriven_letter_keeps_its_correlation_id_and_reply_to(
    broker_vhost: str, amqp: Any
) -> None:
    amqp.basic_publish(
        topology.retry_exchange_name(GROUP),
        DLQ,
        b"{}",
        pika.BasicProperties(
            message_id="with-reply",
            type="community.update",
            correlation_id="case-42",
            reply_to="fabric.community",
            delivery_mode=2,
            headers={"fabric-audience": "all", topology.DEAD_LETTER_REASON_HEADER: "poison"},
        ),
        mandatory=True,
    )

    Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
        dead_letter_queue(broker_vhost)
    )

    _, properties, _ = amqp.basic_get(WORK, auto_ack=True)
    assert (properties.message_id, properties.correlation_id, properties.reply_to) == (
        "with-reply",
        "case-42",
        "fabric.community",
    )


def test_a_message_dead_lettered_again_after_a_redrive_can_be_redriven_again(
    broker_vhost: str, amqp: Any
) -> None:
    park(amqp, 1, prefix="again")
    ledger = MemoryRedriveLedger()
    redriver = Redriver(ledger=ledger, audit=MemoryAuditSink())
    assert redriver.run(dead_letter_queue(broker_vhost)).moved == 1

    def still_broken(_delivery: Delivery) -> None:
        raise ValueError("still broken")

    RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(still_broken, max_attempts=1)
    ).run(max_messages=1, idle_timeout_s=5)
    second = redriver.run(dead_letter_queue(broker_vhost))

    assert second.moved == 1
    _, properties, _ = amqp.basic_get(WORK, auto_ack=True)
    assert properties.headers[topology.REDRIVES_HEADER] == "2"


def test_age_filter_skips_letters_newer_than_asked(broker_vhost: str, amqp: Any) -> None:
    park(amqp, 2, prefix="old")
    now = datetime.now(UTC).timestamp()
    amqp.basic_publish(
        topology.retry_exchange_name(GROUP),
        DLQ,
        b"{}",
        pika.BasicProperties(
            message_id=f"new-{uuid.uuid4().hex[:6]}",
            type="community.update",
            delivery_mode=2,
            headers={topology.DEAD_LETTERED_AT_HEADER: str(int(now))},
        ),
        mandatory=True,
    )

    report = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
        dead_letter_queue(broker_vhost),
        RedrivePlan(selection=RedriveFilter(older_than_s=600)),
    )

    assert report.moved == 2
    assert settled_depth(amqp, DLQ, 1) == 1


def test_a_pause_ends_when_the_broker_takes_the_message_back(
    broker_vhost: str, amqp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The broker closes the channel during a long pause (as consumer_timeout does) and hands
    # the message back: the consumer must stop, not keep running the handler for a message it
    # no longer holds, looking healthy while it consumes nothing.
    from fabric.adapters import rabbitmq_consumer

    opened = rabbitmq_consumer.open_blocking_connection
    channels: list[Any] = []

    def opening(parameters: Any) -> Any:
        connection = opened(parameters)
        make_channel, sleep = connection.channel, connection.sleep

        def channel() -> Any:
            channels.append(make_channel())
            return channels[-1]

        def sleeping(seconds: float) -> None:
            if channels[-1].is_open:  # a channel error: the broker closes the channel
                channels[-1].basic_publish("fabric.test.no-such-exchange", "x", b"")
            sleep(seconds)

        connection.channel, connection.sleep = channel, sleeping
        return connection

    monkeypatch.setattr(rabbitmq_consumer, "open_blocking_connection", opening)
    publish(amqp, WORK, "held-during-outage")
    calls: list[str] = []

    def handler(delivery: Delivery) -> None:
        calls.append(delivery.message_id)
        if len(calls) < 10:  # the outage ends after ten tries
            raise Systemic("the database is down")

    consumer = RabbitMqConsumer(
        settings(broker_vhost), WORK, MessageProcessor(handler), backoff_s=0.1, max_backoff_s=0.1
    )
    with pytest.raises(pika.exceptions.AMQPError):
        consumer.run(max_messages=1, idle_timeout_s=3)
    assert len(calls) <= 2  # the first try, and at most the one under way as it closed
    assert depth(amqp, WORK) == 1  # back in its queue, for the next consumer
