"""Review fixes of the consumer toolkit, on the real local RabbitMQ (and moto's DynamoDB): a
message whose AMQP properties are not UTF-8 (a group's user can publish one into its own work
queue), and emergencies prefetched behind a hung handler of another instance. The parts that
need no broker come first."""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from typing import Any

import boto3
import pika
import pytest

from fabric import topology
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
from fabric.audit import decode_audit_batch
from fabric.consumer import (
    Delivery,
    Idempotency,
    MessageProcessor,
    Systemic,
    Verdict,
    rabbitmq_delivery,
)
from fabric.envelope import new_message_id
from fabric.errors import MessageRejected
from fabric.stakeholders import Stakeholder
from tests.integration import test_dead_letters as dead_letters
from tests.integration import test_overflow_redrive
from tests.integration.aws_audit import create_idempotency_table
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import management
from tests.integration.queue_waits import depth, settled_empty

moto_aws = test_overflow_redrive.moto_aws  # a fixture: moto, in this region
GROUP = Stakeholder.COMMUNITY
WORK = topology.queue_name(GROUP)
DLQ = topology.dead_letter_queue_name(GROUP)
EMERGENCY = topology.queue_name(GROUP, emergency=True)
ALERT = "child-safety.incident.reported"
amqp, settings = dead_letters.amqp, dead_letters.settings  # the broker's fixture and settings


def publish(channel: Any, queue: str, message_id: str | bytes, **properties: Any) -> None:
    """A message as the group's own user can put it in its work queue; ``properties`` may hold
    bytes that are not UTF-8 (pika sends them as they are)."""
    headers = {"fabric-audience": "all", **properties.pop("headers", {})}
    channel.basic_publish(
        topology.REDELIVER_EXCHANGE,
        queue,
        b'{"note": "not child data"}',
        pika.BasicProperties(
            message_id=message_id,
            type=properties.pop("type", "community.update"),
            delivery_mode=2,
            headers=headers,
            **properties,
        ),
        mandatory=True,
    )


def audit_events(channel: Any) -> list[tuple[str, str | None, str | None]]:
    """(event, message id, reason) of every record in ``fabric.audit``, taken off."""
    found = []
    while (got := channel.basic_get(topology.AUDIT_QUEUE, auto_ack=True))[0] is not None:
        for record in decode_audit_batch(got[2]).records:
            found.append((record["event"], record.get("message_id"), record.get("reason")))
    return found


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


class Running:
    """A consumer's ``run(stop=...)`` on a thread; ``outcome`` holds its counts or exception."""

    def __init__(self, consumer: RabbitMqConsumer) -> None:
        self.stop = threading.Event()
        self.outcome: list[object] = []
        self._thread = threading.Thread(target=self._run, args=(consumer,), daemon=True)
        self._thread.start()

    def _run(self, consumer: RabbitMqConsumer) -> None:
        try:
            self.outcome.append(consumer.run(stop=self.stop))
        except Exception as exc:  # the outcome under test
            self.outcome.append(exc)

    def end(self) -> object:
        self.stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "the consumer ended once stopped"
        return self.outcome[0]


@pytest.fixture
def aws(moto_aws: None) -> Any:
    """moto's DynamoDB, with an idempotency table of the infra's schema named ``idem``."""
    client = boto3.client("dynamodb", region_name=REGION)
    create_idempotency_table(client, "idem")
    return client


# -- without a broker --------------------------------------------------------------------------


def test_amqp_properties_that_are_not_text_are_taken_as_absent() -> None:
    # pika gives a short string that is not UTF-8 as bytes. A header name in bytes raised
    # (``startswith``) before the handler, at every delivery; a message id in bytes raised in
    # the settlement. Now such a property is absent, and a message without an id is parked as
    # ``no-message-id``, as one that never had one.
    delivery = rabbitmq_delivery(
        EMERGENCY,
        message_id=b"\xff" + b"a" * 31,
        topic=b"\xfe",
        body=b"{}",
        headers={b"\xff\xfe": "x", "case-region": "north", "fabric-attempt": "2"},
        correlation_id=b"\xfd",
        reply_to=b"\xfc",
    )

    assert delivery.message_id == ""
    assert delivery.topic == ""
    assert delivery.correlation_id is None
    assert delivery.reply_to is None
    assert delivery.headers == {"case-region": "north", "fabric-attempt": "2"}
    assert delivery.attempt == 2
    decision = MessageProcessor(lambda _delivery: None).process(delivery)
    assert (decision.verdict, decision.reason) == (Verdict.DEAD_LETTER, "no-message-id")


def test_a_message_id_the_idempotency_key_cannot_hash_is_bad_input_not_a_table_outage(
    aws: Any,
) -> None:
    # Powertools hashes the key before it calls the table and wraps the TypeError of a key that
    # is not text in IdempotencyPersistenceLayerError: taken for an unreachable table, the
    # consumer paused on the message for good while the table was healthy.
    ran: list[object] = []
    idempotency = Idempotency("idem", consumer="alerts", client=aws)
    odd = Delivery(message_id=b"\xff-not-text", topic="t", body=b"{}", queue=EMERGENCY)  # type: ignore[arg-type]

    with pytest.raises(MessageRejected):
        idempotency.run(ran.append, odd)
    decision = MessageProcessor(ran.append, idempotency=idempotency).process(odd)

    assert decision.verdict is Verdict.DEAD_LETTER, "parked, not paused on"
    assert (decision.reason, decision.error) == ("poison", "MessageRejected")
    assert ran == [], "the handler never ran"


def test_a_table_that_cannot_be_reached_is_still_systemic(aws: Any) -> None:
    # The other side of the test above: an error of the table itself still pauses the consumer.
    idempotency = Idempotency("no-such-table", consumer="alerts", client=aws)
    message = Delivery(message_id=new_message_id(), topic="t", body=b"{}", queue=EMERGENCY)

    with pytest.raises(Systemic):
        idempotency.run(lambda _delivery: None, message)


# -- properties that are not UTF-8 ------------------------------------------------------------


def test_properties_that_are_not_utf8_neither_stop_the_consumer_nor_lose_its_queue_mates(
    broker_vhost: str, amqp: Any
) -> None:
    # A header name, type, correlation id or reply-to that is not UTF-8 came from pika as bytes:
    # the header name raised before the handler at every run, until the delivery limit
    # dead-lettered the message and every one prefetched with it, without an audit record.
    odd, healthy = new_message_id(), [new_message_id() for _ in range(3)]
    publish(
        amqp,
        WORK,
        odd,
        type=b"\xff",
        correlation_id=b"\xfe",
        reply_to=b"\xfd",
        headers={b"\xff\xfe": "x", "case-region": "north"},
    )
    for message_id in healthy:
        publish(amqp, WORK, message_id)
    seen: dict[str, Delivery] = {}

    def handler(delivery: Delivery) -> None:
        seen[delivery.message_id] = delivery

    counts = RabbitMqConsumer(settings(broker_vhost), WORK, MessageProcessor(handler)).run(
        idle_timeout_s=1
    )

    assert counts == {"done": 4}
    assert set(seen) == {odd, *healthy}
    got = seen[odd]
    assert (got.topic, got.correlation_id, got.reply_to) == ("", None, None)
    assert got.headers == {"fabric-audience": "all", "case-region": "north"}
    assert sorted(audit_events(amqp)) == sorted(
        ("delivered", message_id, None) for message_id in [odd, *healthy]
    )
    settled_empty(amqp, WORK, DLQ)


@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotency", "no-idempotency"])
def test_a_message_id_that_is_not_utf8_is_parked_with_its_record(
    broker_vhost: str, amqp: Any, aws: Any, idempotent: bool
) -> None:
    # With Idempotency, hashing the key raised a TypeError that Powertools wraps as a
    # persistence error: taken for an unreachable table, the consumer paused on the message for
    # good. Without, the settlement raised at every run, and the delivery limit dead-lettered
    # the message and its queue-mates without an audit record.
    publish(amqp, WORK, b"\xff" + b"a" * 35)
    healthy = [new_message_id() for _ in range(3)]
    for message_id in healthy:
        publish(amqp, WORK, message_id)
    handled: list[str] = []
    idempotency = Idempotency("idem", consumer="community", client=aws) if idempotent else None
    processor = MessageProcessor(lambda d: handled.append(d.message_id), idempotency=idempotency)
    running = Running(RabbitMqConsumer(settings(broker_vhost), WORK, processor, max_backoff_s=1))

    wait_for(lambda: len(handled) == 3 and depth(amqp, DLQ) == 1, timeout=10)
    outcome = running.end()

    assert outcome == {"dead-letter": 1, "done": 3}
    assert sorted(handled) == sorted(healthy)
    method, properties, _ = amqp.basic_get(DLQ, auto_ack=True)
    assert method is not None
    assert properties.headers[topology.DEAD_LETTER_REASON_HEADER] == "no-message-id"
    assert ("dead-lettered", None, "no-message-id") in audit_events(amqp)
    settled_empty(amqp, WORK, DLQ)


# -- emergency prefetch -----------------------------------------------------------------------


def test_emergencies_do_not_wait_behind_a_hung_emergency_handler_of_another_instance(
    broker_vhost: str, amqp: Any
) -> None:
    # With a prefetch of 20, the instance whose handler hung held about half the emergencies
    # published after it, for as long as it hung (its heartbeats kept the connection), while
    # the other instance idled.
    hang = new_message_id()
    hung, release = threading.Event(), threading.Event()
    done: dict[str, float] = {}

    def handler(delivery: Delivery) -> None:
        if delivery.message_id == hang:
            hung.set()
            release.wait(30)
        done[delivery.message_id] = time.monotonic()

    instances = [
        Running(RabbitMqConsumer(settings(broker_vhost), EMERGENCY, MessageProcessor(handler)))
        for _ in range(2)
    ]
    try:
        time.sleep(0.5)  # both consume
        publish(amqp, EMERGENCY, hang, type=ALERT)
        assert hung.wait(10)
        alerts = [new_message_id() for _ in range(6)]
        for message_id in alerts:
            publish(amqp, EMERGENCY, message_id, type=ALERT)

        wait_for(lambda: all(m in done for m in alerts), timeout=5)
        assert [m for m in alerts if m not in done] == [], "handled while the other hangs"
    finally:
        release.set()
        outcomes = [instance.end() for instance in instances]
    assert sum((Counter(o) for o in outcomes if isinstance(o, Counter)), Counter()) == {"done": 7}


def test_a_prefetch_given_is_kept_and_a_work_queue_keeps_its_default(
    broker_vhost: str, amqp: Any
) -> None:
    # The broker's view of each consumer: 1 on an emergency queue unless told, 20 on a work
    # queue, and what the caller gives.
    processor = MessageProcessor(lambda _delivery: None)
    instances = {
        (EMERGENCY, None): 1,
        (topology.queue_name(Stakeholder.MEDIA, emergency=True), 5): 5,
        (WORK, None): 20,
    }
    running = [
        Running(RabbitMqConsumer(settings(broker_vhost), queue, processor, prefetch=prefetch))
        for queue, prefetch in instances
    ]
    vhost = urllib.parse.quote(broker_vhost, safe="")

    def prefetches() -> dict[str, int]:
        consumers = management("GET", f"consumers/{vhost}")
        return {c["queue"]["name"]: c["prefetch_count"] for c in consumers}

    try:
        expected = {queue: count for (queue, _), count in instances.items()}
        wait_for(lambda: prefetches() == expected, timeout=10)
        assert prefetches() == expected
    finally:
        for instance in running:
            instance.end()
