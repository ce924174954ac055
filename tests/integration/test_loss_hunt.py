"""Faults at exact points of a publish and of failover, with the real broker and moto.

What must hold at every point: a message reported stored is stored (a duplicate is allowed, a
false ``stored`` never), and a transport that failed over comes back once the broker is well.
"""

from __future__ import annotations

import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pika
import pytest

from fabric.adapters.memory import MemoryAuditSink
from fabric.adapters.memory_cipher import LocalCipher
from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.adapters.sns import SnsFallbackTransport
from fabric.breaker import BreakerTransport, State
from fabric.ports import Failure, OutboundMessage
from fabric.router import Router
from fabric.routing import default_routing_table
from fabric.stakeholders import Stakeholder
from fabric.topology import queue_name
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import AMQP, management
from tests.integration.faults import (
    BASIC_ACK,
    BASIC_PUBLISH,
    BASIC_RETURN,
    CHANNEL_CLOSE,
    CONNECTION_BLOCKED,
    FaultProxy,
    Frame,
    is_method,
)
from tests.integration.private_node import PrivateNode, private_node
from tests.integration.test_drain import draining, left_in_sqs, message, park
from tests.integration.test_drain import rabbit as drain_rabbit
from tests.integration.test_failover_drills import accepted, donation, stored_everywhere

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    """A private node for the drills that raise a resource alarm (never on the shared broker)."""
    with private_node() as started:
        yield started


def transport(port: int, vhost: str, **overrides: Any) -> RabbitMqTransport:
    settings = RabbitSettings(
        "127.0.0.1",
        port,
        lambda: ("guest", "guest"),
        vhost=vhost,
        connect_timeout=1.0,
        connection_name=f"fabric-hunt-{uuid.uuid4().hex[:8]}",
        **overrides,
    )
    return RabbitMqTransport(settings, exchange_for=lambda _m: "ingress")


def messages(count: int) -> list[OutboundMessage]:
    return [
        OutboundMessage(str(uuid.uuid4()), "work.item", b'{"n": %d}' % n, frozenset())
        for n in range(count)
    ]


def work_queue(port: int, vhost: str) -> pika.BlockingConnection:
    """An ``ingress`` exchange whose every message goes to the quorum queue ``work``; returns
    the (open) connection, for reading the queue."""
    connection = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", port, virtual_host=vhost)
    )
    channel = connection.channel()
    channel.exchange_declare("ingress", "topic", durable=True)
    channel.queue_declare("work", durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind("work", "ingress", "#")
    return connection


def in_queue(connection: pika.BlockingConnection) -> list[str]:
    channel = connection.channel()
    found = []
    while (got := channel.basic_get("work", auto_ack=True))[0] is not None:
        found.append(got[1].message_id)
    channel.close()
    return found


def state_of(breaker: BreakerTransport) -> State:
    """The breaker's state now (a call, so that type narrowing does not carry across calls)."""
    return breaker.state


def memory_alarm(node: PrivateNode) -> bool:
    return "memory" in node.ctl("eval", "rabbit_alarm:get_alarms().").stdout


def wait_for(condition: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(0.1)


def test_a_block_notice_read_while_a_timed_out_connection_closes_does_not_keep_rabbitmq_off(
    node: PrivateNode,
) -> None:
    # The broker is slow (no confirm within the timeout) and then raises a memory alarm: its
    # connection.blocked reaches the client while the transport is already closing that
    # connection. The notice used to mark the transport itself blocked, and nothing but a new
    # connection cleared the mark, which a blocked transport never opened: after the alarm was
    # gone, every call failed over without asking the broker and the breaker's probe never
    # closed it, until the Lambda container was recycled.
    vhost = f"fabric-hunt-{uuid.uuid4().hex[:12]}"
    node.add_vhost(vhost)
    reader = work_queue(node.amqp_port, vhost)
    proxy = FaultProxy(("127.0.0.1", node.amqp_port))
    breaker = BreakerTransport(transport(proxy.port, vhost), open_seconds=0.3)
    try:
        before = messages(3)
        assert all(o.stored for o in breaker.publish(before))  # warm: a publishing connection
        # What the broker says from now on (its confirms, its block notice) reaches the client
        # only once the client starts closing the channel, after its confirm timeout.
        proxy.hold_replies(until=is_method(CHANNEL_CLOSE))
        try:
            node.ctl("set_vm_memory_high_watermark", "0.000001")
            wait_for(lambda: memory_alarm(node), within=10, what="the memory alarm")
            during = breaker.publish(messages(3))
            # Its queue was stored in before: presumed healthy for that one timeout. The next
            # call, timed out or blocked, opens the breaker, whose probe must close it later.
            during += breaker.publish(messages(3))
        finally:
            node.ctl("set_vm_memory_high_watermark", "0.4", check=False)
        assert {o.failure for o in during} <= {Failure.TIMEOUT, Failure.UNAVAILABLE}
        assert breaker.state is not State.CLOSED
        assert any(  # the drill happened as meant: the notice reached the closing connection
            to_client and frame.method == CONNECTION_BLOCKED for to_client, frame in proxy.seen
        )
        wait_for(lambda: not memory_alarm(node), within=10, what="clearing the memory alarm")
        proxy.restore()

        # The broker is well again: within a few probes RabbitMQ stores messages again.
        after: list[OutboundMessage] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            batch = messages(1)
            after += batch
            if breaker.publish(batch)[0].stored:
                break
            time.sleep(0.1)
        assert state_of(breaker) is State.CLOSED, f"{len(after)} probes, none reached RabbitMQ"
        assert after[-1].message_id in in_queue(reader)
    finally:
        breaker.close()
        proxy.close()
        reader.close()
        node.delete_vhost(vhost)


# --- the connection cut at exact points of a publish (shared broker, through the proxy) -------


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    faults = FaultProxy(AMQP)
    yield faults
    faults.close()


def is_body(frame: Frame) -> bool:
    return frame.kind == 3


def ack_after_return() -> Any:
    """Matches the first ``basic.ack`` after a ``basic.return``: the cut falls between a
    returned message's return and its ack."""
    seen_return = False

    def match(frame: Frame) -> bool:
        nonlocal seen_return
        seen_return = seen_return or frame.method == BASIC_RETURN
        return seen_return and frame.method == BASIC_ACK

    return match


CUTS = {
    # (matcher, to_client, nth)
    "before-the-first-confirm": (is_method(BASIC_ACK), True, 1),
    "before-the-third-confirm": (is_method(BASIC_ACK), True, 3),
    "after-a-publish-method-before-its-body": (is_body, False, 7),
    "before-the-tenth-publish": (is_method(BASIC_PUBLISH), False, 10),
}


@pytest.mark.parametrize("cut", list(CUTS))
def test_a_connection_cut_at_any_point_of_a_publish_reports_stored_only_what_is_stored(
    vhost: str, proxy: FaultProxy, cut: str
) -> None:
    # Stored-reported messages must be in the queue; the ones whose confirm was lost are
    # published again on a second connection (a duplicate at most, never a loss).
    matcher, to_client, nth = CUTS[cut]
    reader = work_queue(AMQP[1], vhost)
    sender = transport(proxy.port, vhost, confirm_window=5)
    batch = messages(40)
    proxy.cut_before(matcher, to_client=to_client, nth=nth)
    outcomes = sender.publish(batch)
    stored = in_queue(reader)
    sender.close()
    reader.close()

    assert proxy.attempts == 2, "the cut did not happen"
    assert [o.message_id for o in outcomes] == [m.message_id for m in batch]
    assert all(o.stored for o in outcomes), {o.failure for o in outcomes}
    assert set(stored) == {m.message_id for m in batch}  # duplicates allowed, no loss


def test_a_cut_between_a_return_and_its_confirm_never_counts_the_returned_message_stored(
    vhost: str, proxy: FaultProxy
) -> None:
    reader = work_queue(AMQP[1], vhost)
    reader.channel().queue_unbind("work", "ingress", "#")
    reader.channel().queue_bind("work", "ingress", "work.item")
    sender = transport(proxy.port, vhost)
    good = messages(5)
    nowhere = OutboundMessage(str(uuid.uuid4()), "no.queue", b"{}", frozenset())
    proxy.cut_before(ack_after_return(), to_client=True)
    outcomes = sender.publish([*good[:2], nowhere, *good[2:]])
    stored = in_queue(reader)
    sender.close()
    reader.close()

    assert proxy.attempts == 2, "the cut did not happen"
    returned = outcomes[2]
    assert not returned.stored
    assert returned.failure is Failure.RETURNED  # again on the second connection
    assert all(o.stored for i, o in enumerate(outcomes) if i != 2)
    assert set(stored) == {m.message_id for m in good}


def test_when_the_second_connection_fails_too_the_unconfirmed_are_unavailable_not_stored(
    vhost: str, proxy: FaultProxy
) -> None:
    reader = work_queue(AMQP[1], vhost)
    sender = transport(proxy.port, vhost, confirm_window=5)
    batch = messages(30)
    proxy.cut_before(is_method(BASIC_ACK), to_client=True, nth=2, then_refuse=True)
    started = time.monotonic()
    outcomes = sender.publish(batch)
    elapsed = time.monotonic() - started
    stored = set(in_queue(reader))
    reader.close()

    confirmed = {o.message_id for o in outcomes if o.stored}
    assert 0 < len(confirmed) < len(batch)
    assert confirmed <= stored  # never a false "stored"
    assert {o.failure for o in outcomes if not o.stored} == {Failure.UNAVAILABLE}
    assert proxy.attempts == 2  # one reconnect, refused: no third try
    assert elapsed < 2.0


def test_confirms_that_come_after_the_confirm_timeout_are_not_taken_by_the_next_call(
    vhost: str, proxy: FaultProxy
) -> None:
    # The late confirms reach the client while it drops the timed-out connection: the
    # messages are then failed-but-stored (a duplicate through the fallback), and the next
    # call's messages get their own confirms on a new connection, none of the old ones.
    reader = work_queue(AMQP[1], vhost)
    sender = transport(proxy.port, vhost)
    assert all(o.stored for o in sender.publish(messages(2)))
    proxy.hold_replies(until=is_method(CHANNEL_CLOSE))
    late = sender.publish(messages(10))
    nxt = messages(10)
    after = sender.publish(nxt)
    stored = set(in_queue(reader))
    sender.close()
    reader.close()

    assert {o.failure for o in late} == {Failure.TIMEOUT}
    assert any(to_client and f.method == BASIC_ACK for to_client, f in proxy.seen)
    assert all(o.stored for o in after)
    assert {m.message_id for m in nxt} <= stored


# --- the fallback path and the drain (moto; AWS faults through botocore's event hooks) --------


def test_an_entry_sns_refuses_in_a_publish_batch_is_rejected_never_accepted(
    broker_vhost: str, proxy: FaultProxy, aws: dict[str, Any]
) -> None:
    # RabbitMQ is gone; SNS stores two of the three entries of the PublishBatch and reports the
    # third failed (a throttled or KMS-refused entry), and refuses it again when it is sent once
    # more alone: that one must come back "unavailable" with its rejected record, the others
    # accepted on the fallback path.
    refused: list[str] = []

    def fail_one_entry(parsed: dict[str, Any], **_: Any) -> None:
        # The batch's second entry; in the retry, the entry sent again (alone).
        entry = parsed["Successful"].pop(1 if not refused else 0)
        refused.append(entry["Id"])
        parsed.setdefault("Failed", []).append(
            {"Id": entry["Id"], "Code": "KMSThrottling", "SenderFault": False}
        )

    def sns_client() -> Any:
        client = boto3.client("sns", region_name=REGION)
        client.meta.events.register("after-call.sns.PublishBatch", fail_one_entry)
        return client

    audit = MemoryAuditSink()
    router = Router(
        table=default_routing_table(),
        transports=[
            BreakerTransport(transport(proxy.port, broker_vhost)),
            SnsFallbackTransport(
                fallback_topic_arn=aws["topics"]["fallback"],
                emergency_topic_arn=aws["topics"]["emergency"],
                client_factory=sns_client,
            ),
        ],
        cipher=LocalCipher(),
        audit=audit,
        environment="test",
    )
    proxy.refuse()
    sent = [donation() for _ in range(3)]
    results = router.route(sent, source="business").results

    assert refused == ["1", "1"]  # refused, and refused again when sent once more
    assert [(r.status, r.transport or r.reason) for r in results] == [
        ("accepted", "fallback"),
        ("rejected", "unavailable"),
        ("accepted", "fallback"),
    ]
    events = {(r.message_id, r.event.value) for r in audit.records}
    assert (sent[1]["message_id"], "rejected") in events
    assert (sent[1]["message_id"], "accepted") not in events
    proxy.restore()
    assert set(accepted(results)) <= stored_everywhere(broker_vhost, aws)


def test_a_drained_copy_the_broker_returns_stays_in_sqs_and_the_other_groups_drain(
    aws: dict[str, Any], broker_vhost: str
) -> None:
    # The media work queue is gone (an operator deleted it): the redeliver exchange returns the
    # copy, then acks it. That copy must stay in SQS, with no drained record; the academic
    # group's copy behind it is still drained.
    media, academic = message(Stakeholder.MEDIA), message(Stakeholder.ACADEMIC)
    park(aws, media, academic)
    queue = urllib.parse.quote(queue_name(Stakeholder.MEDIA), safe="")
    management("DELETE", f"queues/{urllib.parse.quote(broker_vhost, safe='')}/{queue}")
    audit = MemoryAuditSink()
    broker = drain_rabbit(broker_vhost)
    report = draining(aws, broker, audit).drain()
    broker.close()

    assert report.refused == [queue_name(Stakeholder.MEDIA)]
    assert report.total == 1
    reader = pika.BlockingConnection(pika.ConnectionParameters(*AMQP, virtual_host=broker_vhost))
    method, properties, _ = reader.channel().basic_get(
        queue_name(Stakeholder.ACADEMIC), auto_ack=True
    )
    reader.close()
    assert method is not None
    assert properties.message_id == academic.message_id
    assert [(r.event.value, r.message_id) for r in audit.records] == [
        ("drained", academic.message_id)
    ]
    assert left_in_sqs(aws) == 1  # the media copy, back after its visibility timeout
