"""With the broker down and SNS (or the SQS audit queue) taking connections but never
answering, a router call still answers within the fallback's (or the audit path's) budget: not
after the client's timeouts on every request, which would outlast the function's 30 s."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryMetrics, MemoryTransport
from fabric.adapters.memory_cipher import LocalCipher
from fabric.adapters.sns import SnsFallbackTransport
from fabric.adapters.sqs_audit import SqsAuditTransport
from fabric.audit import AuditEvent
from fabric.audit_sink import AUDIT_TOPIC, TransportAuditSink
from fabric.bootstrap import RouterRuntime, _boto3_client
from fabric.entrypoints import dispatch
from fabric.metrics import AUDIT_RECORDS_LOST
from fabric.ports import Failure, MessageKind, OutboundMessage
from fabric.router import Router
from fabric.routing import default_routing_table
from fabric.settings import RouterSettings
from fabric.stakeholders import Stakeholder
from tests.silent_endpoint import silent_endpoint

FALLBACK = "arn:aws:sns:ap-southeast-3:111111111111:fabric-test-fallback"
EMERGENCY = "arn:aws:sns:ap-southeast-3:111111111111:fabric-test-emergency"
FUNCTION = "arn:aws:lambda:ap-southeast-3:111111111111:function:fabric-test-router"
AUDIT_QUEUE = "https://sqs.ap-southeast-3.amazonaws.com/111111111111/fabric-test-audit"
BUDGET_S = 1.0
SLACK_S = 0.5  # thread start-up and the router's own work, on a slow host


@pytest.fixture
def silent_sns(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[socket.socket]]:
    """An AWS endpoint (SNS, SQS alike) that takes every TCP connection and never answers, as
    the router's clients reach it (``fabric.bootstrap``: connect 1 s, read 2 s, 2 attempts);
    yields the connections it took. Closed at the end, which also ends the requests the
    transports gave up on."""
    with silent_endpoint() as (port, taken):
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-southeast-3")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setattr("fabric.adapters.sns.PUBLISH_BUDGET_S", BUDGET_S)
        monkeypatch.setattr("fabric.adapters.sqs_audit.PUBLISH_BUDGET_S", BUDGET_S)
        yield taken


def client_made_now(service: str) -> Callable[[], Any]:
    """A client factory whose client is built here, before the timed call, as a warm container
    has it: building one lazily inside the transport's worker thread takes up to seconds on a
    loaded host (so the request would not reach the endpoint within the budget), and a thread
    the transport abandoned would build it later still, against the next test's endpoint."""
    client = _boto3_client(service)
    return lambda: client


def fallback() -> SnsFallbackTransport:
    return SnsFallbackTransport(
        fallback_topic_arn=FALLBACK,
        emergency_topic_arn=EMERGENCY,
        client_factory=client_made_now("sns"),
    )


def outbound(*, emergency: bool) -> OutboundMessage:
    message_id = str(uuid.uuid4())
    return OutboundMessage(
        message_id,
        "t.x",
        json.dumps({"message_id": message_id, "payload": {}}).encode(),
        frozenset({Stakeholder.GOVERNMENT}),
        emergency=emergency,
    )


def audit_part() -> OutboundMessage:
    return OutboundMessage(
        str(uuid.uuid4()), AUDIT_TOPIC, b'{"records": []}', frozenset(), kind=MessageKind.AUDIT
    )


def test_an_sns_that_never_answers_costs_the_publish_its_budget_not_every_requests_timeouts(
    silent_sns: list[socket.socket],
) -> None:
    # Four requests: about 16 s at the client's own bounds, each of them paid in turn.
    messages = [outbound(emergency=False) for _ in range(30)] + [outbound(emergency=True)]

    transport = fallback()
    started = time.monotonic()
    outcomes = transport.publish(messages)
    elapsed = time.monotonic() - started

    assert elapsed < BUDGET_S + SLACK_S
    assert [o.failure for o in outcomes] == [Failure.UNAVAILABLE] * len(messages)
    assert [o.message_id for o in outcomes] == [m.message_id for m in messages]
    # The emergency, last in the call, was the request sent first (and left waiting).
    first = silent_sns[0]
    first.settimeout(1.0)
    assert b"emergency" in first.recv(65536)


def test_an_sqs_audit_queue_that_never_answers_costs_the_publish_its_budget_and_one_request(
    silent_sns: list[socket.socket],
) -> None:
    parts = [audit_part() for _ in range(5)]  # about 20 s at the client's own bounds

    transport = SqsAuditTransport(AUDIT_QUEUE, client_made_now("sqs"))
    started = time.monotonic()
    outcomes = transport.publish(parts)
    elapsed = time.monotonic() - started

    assert elapsed < BUDGET_S + SLACK_S
    assert [o.failure for o in outcomes] == [Failure.UNAVAILABLE] * len(parts)
    assert [o.message_id for o in outcomes] == [p.message_id for p in parts]
    # Only the first part was sent (and is still waiting for its read timeout): the others,
    # past the budget, were not sent at all.
    time.sleep(0.3)  # the listener's accept loop looks every 0.1 s
    assert len(silent_sns) == 1


def test_the_router_answers_503_with_a_result_and_an_audit_record_for_every_message(
    silent_sns: list[socket.socket],
) -> None:
    alert = {
        "topic": "child-safety.incident.reported",
        "priority": "emergency",
        "classification": "restricted",
        "payload": {"case": "C-1"},
    }
    pledges = [{"topic": "donation.pledge.received", "payload": {"n": i}} for i in range(40)]
    messages = [{"message_id": str(uuid.uuid4()), **message} for message in [*pledges, alert]]
    audit = MemoryAuditSink()
    router = Router(
        table=default_routing_table(),
        transports=[MemoryTransport(failure=Failure.UNAVAILABLE), fallback()],  # broker down
        cipher=LocalCipher(),
        audit=audit,
        environment="test",
    )
    request = {
        "version": "2.0",
        "routeKey": "POST /v1/messages",
        "requestContext": {"authorizer": {"jwt": {"claims": {"fabric:group": "community"}}}},
        "body": json.dumps({"messages": messages}),
        "isBase64Encoded": False,
    }

    started = time.monotonic()
    response = dispatch(request, FUNCTION, RouterRuntime(router, settings()))
    elapsed = time.monotonic() - started

    assert elapsed < BUDGET_S + SLACK_S
    assert response["statusCode"] == 503
    body = json.loads(response["body"])
    ids = [str(m["message_id"]) for m in messages]
    assert [r["message_id"] for r in body["results"]] == ids
    assert {(r["status"], r["reason"]) for r in body["results"]} == {("rejected", "unavailable")}
    assert sorted(r.message_id or "" for r in audit.records) == sorted(ids)
    assert {(r.event, r.reason) for r in audit.records} == {(AuditEvent.REJECTED, "unavailable")}


def test_an_sqs_audit_queue_that_never_answers_costs_the_call_its_budget_and_the_answer_stands(
    silent_sns: list[socket.socket],
) -> None:
    # RabbitMQ down, SNS well, the SQS audit queue silent: the audit batch of 40 messages with
    # 10 KB bodies is three parts, each about 4 s at the client's own bounds, one after another.
    messages = [
        {
            "message_id": str(uuid.uuid4()),
            "topic": "media.story.published",
            "payload": {"t": "x" * 10_000},
        }
        for _ in range(40)
    ]
    broker = MemoryTransport(failure=Failure.UNAVAILABLE)
    audit_queue = SqsAuditTransport(AUDIT_QUEUE, client_made_now("sqs"))
    metrics = MemoryMetrics()
    router = Router(
        table=default_routing_table(),
        transports=[broker, MemoryTransport(name="fallback")],
        cipher=LocalCipher(),
        audit=TransportAuditSink([broker, audit_queue], emitted_by="router"),
        environment="test",
        metrics=metrics,
    )
    request = {
        "version": "2.0",
        "routeKey": "POST /v1/messages",
        "requestContext": {"authorizer": {"jwt": {"claims": {"fabric:group": "government"}}}},
        "body": json.dumps({"messages": messages}),
        "isBase64Encoded": False,
    }

    started = time.monotonic()
    response = dispatch(request, FUNCTION, RouterRuntime(router, settings()))
    elapsed = time.monotonic() - started

    assert elapsed < BUDGET_S + SLACK_S
    # The messages are stored: the producer is told so, whatever became of their records.
    assert response["statusCode"] == 202
    body = json.loads(response["body"])
    assert [r["message_id"] for r in body["results"]] == [m["message_id"] for m in messages]
    assert {(r["status"], r["transport"]) for r in body["results"]} == {("accepted", "fallback")}
    # The records are counted lost: an accepted and a fallback record a message.
    assert metrics.totals[AUDIT_RECORDS_LOST] == 2 * len(messages)


def settings() -> RouterSettings:
    return RouterSettings(
        environment="test",
        rabbitmq_host="unused",
        rabbitmq_port=5671,
        rabbitmq_tls=True,
        rabbitmq_vhost="/",
        rabbitmq_secret_arn="unused",  # noqa: S106 (an ARN, and never read here)
        messages_key_arn="unused",
        identity_claim="fabric:group",
        ingest_queue_prefix="fabric-test-ingest-",
        fallback_topic_arn=FALLBACK,
        emergency_topic_arn=EMERGENCY,
    )
