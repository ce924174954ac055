"""The router's publish budget on the real broker: a broker that confirms slowly but steadily
(credit-based flow control under load, a slow disk) never lets a confirm timeout pass, and
without a bound on the whole call it held a router call of 500 messages for 500 confirms, far
past the function's 30 s timeout (killed: no answer, no audit record).

The broker's confirms are slowed down in a proxy between the router and the broker, which hands
them to the router one delivery tag at a time, at a steady pace.
"""

from __future__ import annotations

import json
import queue
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from fabric.adapters import sns
from fabric.adapters.rabbitmq import RabbitMqTransport
from fabric.bootstrap import _ROUTER_PUBLISH_BUDGET, _boto3_client, _rabbit, build_router_runtime
from fabric.ports import Failure, OutboundMessage
from fabric.settings import RouterSettings
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import AMQP
from tests.integration.faults import BASIC_ACK, FaultProxy, Frame
from tests.integration.test_failover_drills import donation, stored_everywhere
from tests.integration.test_rabbitmq_transport import messages, quorum_queue, transport

pytestmark = pytest.mark.integration
ROUTER_BUDGET_S = _ROUTER_PUBLISH_BUDGET
SLACK_S = 1.0  # the connection, and the close of a connection that timed out, on a slow host


class PacedConfirms(FaultProxy):
    """A ``FaultProxy`` that hands the client the broker's confirms one delivery tag at a time,
    ``interval`` apart, as a broker that stores one message per ``interval`` would; everything
    else the broker sends keeps its place among them (a return still comes before its ack)."""

    def __init__(self, target: tuple[str, int], interval: float) -> None:
        super().__init__(target)
        self.interval = interval
        self._outboxes: dict[socket.socket, queue.Queue[Frame]] = {}

    def _forward(
        self, units: list[tuple[bytes, Frame | None]], *, to_client: bool, client: socket.socket
    ) -> bool:
        if not to_client:
            return super()._forward(units, to_client=to_client, client=client)
        outbox = self._outboxes.get(client)
        if outbox is None:
            outbox = self._outboxes[client] = queue.Queue()
            threading.Thread(target=self._hand_over, args=(client, outbox), daemon=True).start()
        for _raw, frame in units:
            assert frame is not None  # the broker sends no preamble: every unit is a frame
            outbox.put(frame)
        return True

    def _hand_over(self, client: socket.socket, outbox: queue.Queue[Frame]) -> None:
        handed: set[tuple[int, int]] = set()  # (channel, delivery tag) confirmed to the client
        while not self._stop.is_set():
            try:
                frame = outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if frame.method == BASIC_ACK:
                tag, bits = struct.unpack_from(">QB", frame.payload, 4)
                first = 1 if bits & 1 else tag  # multiple: every tag up to this one
                sends = [
                    _ack(frame.channel, t)
                    for t in range(first, tag + 1)
                    if (frame.channel, t) not in handed
                ]
                handed.update((frame.channel, t) for t in range(first, tag + 1))
            else:
                sends = [_encode(frame)]
            for data in sends:
                if frame.method == BASIC_ACK:
                    time.sleep(self.interval)
                try:
                    client.sendall(data)
                except OSError:
                    return


def _encode(frame: Frame) -> bytes:
    return (
        struct.pack(">BHI", frame.kind, frame.channel, len(frame.payload)) + frame.payload + b"\xce"
    )


def _ack(channel: int, tag: int) -> bytes:
    """A ``basic.ack`` of one delivery tag."""
    return _encode(Frame(1, channel, struct.pack(">HHQB", *BASIC_ACK, tag, 0)))


@pytest.fixture
def paced() -> Iterator[PacedConfirms]:
    # A confirm every 0.1 s: five times inside the router's confirm timeout (0.5 s), so the
    # progress watchdog never fires, and 500 messages take 50 s.
    proxy = PacedConfirms(AMQP, interval=0.1)
    yield proxy
    proxy.close()


def router_settings(aws: dict[str, Any], port: int, vhost: str) -> RouterSettings:
    """The router's settings for the broker on loopback ``port`` as guest, with its secret,
    messages key and audit queue in moto."""
    secret = boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name=f"router-{uuid.uuid4().hex[:8]}",
        SecretString=json.dumps({"username": "guest", "password": "guest"}),
    )["ARN"]
    audit_queue = boto3.client("sqs", region_name=REGION).create_queue(
        QueueName=f"fabric-test-audit-{uuid.uuid4().hex[:8]}"
    )["QueueUrl"]
    return RouterSettings(
        environment="test",
        rabbitmq_host="127.0.0.1",
        rabbitmq_port=port,
        rabbitmq_tls=False,
        rabbitmq_vhost=vhost,
        rabbitmq_secret_arn=secret,
        messages_key_arn=boto3.client("kms", region_name=REGION).create_key()["KeyMetadata"]["Arn"],
        identity_claim="fabric:group",
        ingest_queue_prefix="fabric-test-ingest-",
        fallback_topic_arn=aws["topics"]["fallback"],
        emergency_topic_arn=aws["topics"]["emergency"],
        audit_queue_url=audit_queue,
    )


def test_a_broker_that_confirms_slowly_but_steadily_holds_a_publish_only_for_its_budget(
    vhost: str, channel: Any, paced: PacedConfirms, aws: dict[str, Any]
) -> None:
    # The router's broker settings as fabric.bootstrap makes them, publishing to a test exchange.
    quorum_queue(channel, "work", "ingress")
    wired = _rabbit(router_settings(aws, paced.port, vhost), _boto3_client)
    broker = RabbitMqTransport(wired.settings, exchange_for=lambda _m: "ingress")
    assert broker.publish(messages(1))[0].stored
    assert not broker.out_of_budget  # what the breaker reads: a call that fitted its budget
    stored = 1
    for _call in range(2):  # the next call, on a new connection, is bounded as well
        batch = messages(500)
        started = time.monotonic()
        outcomes = broker.publish(batch)
        took = time.monotonic() - started
        assert took < ROUTER_BUDGET_S + SLACK_S, f"the call took {took:.1f} s"
        assert broker.out_of_budget  # the breaker blames no queue for the unconfirmed tail
        # What the broker confirmed in time is stored; the rest is a timeout (not unavailable:
        # the breaker opens only the queues those waited on), for the router to send to the
        # fallback.
        assert [o.message_id for o in outcomes] == [m.message_id for m in batch]
        confirmed = [o for o in outcomes if o.stored]
        assert 0 < len(confirmed) < 500
        assert {o.failure for o in outcomes if not o.stored} == {Failure.TIMEOUT}
        stored += len(confirmed)
    # Unconfirmed is not lost: the broker may well have stored those too.
    assert channel.queue_declare("work", passive=True).method.message_count >= stored


def test_a_router_call_on_a_broker_that_confirms_slowly_answers_every_message(
    broker_vhost: str, paced: PacedConfirms, aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # moto's SNS stores a message in about 10 ms, 40 ms on a loaded host: SNS's own budget
    # (8 s, shown elsewhere) is widened so that what it stores in time is not what is tested.
    monkeypatch.setattr(sns, "PUBLISH_BUDGET_S", 15.0)
    router = build_router_runtime(router_settings(aws, paced.port, broker_vhost)).router
    sent = [donation() for _ in range(200)]
    started = time.monotonic()
    results = router.route(sent, source="community").results
    took = time.monotonic() - started
    # Inside 15 s, where the broker alone took 20 s: the broker's budget, and SNS taking the
    # rest.
    assert took < 15, f"the call took {took:.1f} s"
    assert {r.status for r in results} == {"accepted"}
    # What the broker confirmed in time is on RabbitMQ, the rest went to SNS/SQS.
    on_broker = sum(r.transport == "rabbitmq" for r in results)
    assert 0 < on_broker < len(sent)


def test_a_healthy_call_of_500_is_not_cut_short_by_the_budget(
    broker_vhost: str, aws: dict[str, Any]
) -> None:
    router = build_router_runtime(router_settings(aws, AMQP[1], broker_vhost)).router
    router.route([donation()], source="community")  # the connection is open: the call is warm
    sent = [donation() for _ in range(500)]
    results = router.route(sent, source="community").results
    assert [(r.status, r.transport) for r in results] == [("accepted", "rabbitmq")] * 500
    assert {m["message_id"] for m in sent} <= stored_everywhere(broker_vhost, aws)


def test_time_the_caller_spends_preparing_messages_is_not_spent_from_the_budget(
    vhost: str, channel: Any
) -> None:
    # The router prepares messages inside the publish call (validation, encryption, a KMS call
    # for a new data key that may take seconds): that is its own stage of a call, bounded on its
    # own, and a slow key service must not send the broker's messages to the fallback.
    quorum_queue(channel, "work", "ingress")
    sender = transport(vhost, "ingress", publish_budget=1.0)
    batch = messages(120)

    def prepared() -> Iterator[OutboundMessage]:
        for index, message in enumerate(batch):
            if index in (1, 60, 119):  # a slow step: in the first chunk, a later one, the last
                time.sleep(1.2)
            yield message

    try:
        outcomes = sender.publish(prepared())
    finally:
        sender.close()
    assert [o.failure for o in outcomes if not o.stored] == []
    assert channel.queue_declare("work", passive=True).method.message_count == 120
