"""The redrive of ``fabric.overflow`` puts each letter back in its terminal queue (the real local
RabbitMQ).

The generated topology is applied with a terminal delivery limit of 3 (as in
``test_overflow_rabbitmq.py``), so a few hand-backs take a letter of a DLQ, ``fabric.unrouted``
or ``fabric.audit`` into the overflow queue. Each test has a vhost of its own.
"""

from __future__ import annotations

import io
import json
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pika
import pytest
from moto import mock_aws

from fabric import topology
from fabric.adapters.management import ManagementClient
from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.adapters.rabbitmq_dlq import RabbitMqDeadLetterQueue
from fabric.adapters.rabbitmq_overflow import RETURNS_HEADER, RabbitMqOverflowQueue
from fabric.audit import AuditEvent, decode_audit_batch
from fabric.bootstrap import exchange_for
from fabric.redrive import RedriveFilter, RedrivePlan, Redriver
from fabric.routing import default_routing_table
from fabric.stakeholders import Stakeholder
from fabric.topology_apply import apply_topology
from tests.integration.aws_audit import create_idempotency_table
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import AMQP, GUEST, MANAGEMENT, management
from tests.integration.queue_waits import settled_depth, settled_empty, unheld_depth
from tests.message_ids import msg_id

pytestmark = pytest.mark.integration

LIMIT = 3
GROUP = Stakeholder.COMMUNITY
WORK = topology.queue_name(GROUP)
DLQ = topology.dead_letter_queue_name(GROUP)
OVERFLOW = topology.OVERFLOW_QUEUE
BODY = b'{"note": "not child data"}'


@pytest.fixture
def overflow_vhost(vhost: str) -> str:
    """The generated topology, terminal delivery limit lowered, without its broker-wide users."""
    document = topology.definitions(
        default_routing_table(), vhost=vhost, terminal_delivery_limit=LIMIT
    )
    document["users"], document["permissions"] = [], []
    apply_topology(
        ManagementClient(MANAGEMENT, "guest", "guest"), document, passwords={}, vhost=vhost
    )
    return vhost


def connect(vhost: str, user: tuple[str, str] = GUEST) -> Any:
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            *AMQP, virtual_host=vhost, credentials=pika.PlainCredentials(*user)
        )
    )
    channel = connection.channel()
    channel.confirm_delivery()
    return channel


@pytest.fixture
def amqp(overflow_vhost: str) -> Iterator[Any]:
    channel = connect(overflow_vhost)
    yield channel
    channel.connection.close()


def settings(vhost: str) -> RabbitSettings:
    return RabbitSettings(host=AMQP[0], port=AMQP[1], credentials=lambda: GUEST, vhost=vhost)


def overflow(channel: Any, queue: str) -> None:
    """Hand ``queue``'s letters back (as repeated peeks do) until the broker moves them on."""
    for _ in range(LIMIT + 3):
        unheld_depth(channel, queue)  # the letters handed back are back, or moved on
        tags = []
        while (method := channel.basic_get(queue, auto_ack=False)[0]) is not None:
            tags.append(method.delivery_tag)
        if not tags:
            break
        for tag in tags:
            channel.basic_nack(tag, requeue=True)
    settled_empty(channel, queue)


def take(channel: Any, queue: str) -> dict[str, tuple[Any, bytes]]:
    """Every letter of ``queue``, by message id, held unacknowledged."""
    found: dict[str, tuple[Any, bytes]] = {}
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return found
        found[properties.message_id] = (properties, body)


def the_overflow_queue(vhost: str) -> RabbitMqOverflowQueue:
    return RabbitMqOverflowQueue(settings(vhost))


def redriven(audit: MemoryAuditSink, queue: str) -> list[tuple[str, str, tuple[str, ...]]]:
    return sorted(
        (r.message_id or "", r.reason or "", r.queues)
        for r in audit.records
        if r.event is AuditEvent.REDRIVEN and r.transport == queue
    )


def fill_the_overflow_queue(channel: Any) -> float:
    """Four letters, one of each kind, overflowed from three terminal queues; returns when the
    rejected one was dead-lettered."""
    # Dead-lettered by the broker: its reason and time are only in x-death.
    channel.basic_publish(
        topology.REDELIVER_EXCHANGE,
        WORK,
        BODY,
        pika.BasicProperties(
            message_id=msg_id("rejected-1"),
            type="community.case.update",
            correlation_id="corr-1",
            reply_to="reply.queue",
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            headers={"fabric-audience": "all", "case-region": "north", "case-count": 7},
        ),
        mandatory=True,
    )
    method, _, _ = channel.basic_get(WORK, auto_ack=False)
    channel.basic_reject(method.delivery_tag, requeue=False)
    rejected_at = time.time()
    # Parked by the consumer toolkit: reason and time in its own headers.
    channel.basic_publish(
        topology.retry_exchange_name(GROUP),
        DLQ,
        BODY,
        pika.BasicProperties(
            message_id=msg_id("parked-1"),
            type="community.case.close",
            delivery_mode=2,
            headers={
                "fabric-audience": "all",
                topology.DEAD_LETTER_REASON_HEADER: "poison",
                topology.DEAD_LETTERED_AT_HEADER: str(int(rejected_at) - 3600),
            },
        ),
        mandatory=True,
    )
    channel.basic_publish(
        topology.UNROUTED_EXCHANGE,
        "nobody.listens",
        BODY,
        pika.BasicProperties(
            message_id=msg_id("unrouted-1"),
            type="nobody.listens",
            delivery_mode=2,
            headers={"fabric-audience": "all"},
        ),
        mandatory=True,
    )
    # An audit batch as the router publishes it: user-id checked by the broker, read by the
    # audit writer (the batch id is the message id, the publisher the user-id).
    channel.basic_publish(
        topology.AUDIT_EXCHANGE,
        "router",
        b'{"records": []}',
        pika.BasicProperties(
            message_id=msg_id("batch-1"),
            user_id="guest",
            content_type="application/json",
            delivery_mode=2,
        ),
        mandatory=True,
    )
    assert settled_depth(channel, DLQ, 2) == 2
    overflow(channel, DLQ)
    overflow(channel, topology.UNROUTED_QUEUE)
    overflow(channel, topology.AUDIT_QUEUE)
    assert settled_depth(channel, OVERFLOW, 4) == 4
    return rejected_at


def test_the_overflow_redrive_puts_every_letter_back_where_it_came_from_once(
    overflow_vhost: str, amqp: Any
) -> None:
    rejected_at = fill_the_overflow_queue(amqp)
    ledger, audit = MemoryRedriveLedger(), MemoryAuditSink()
    redriver = Redriver(ledger=ledger, audit=audit)

    # A dry run lists each letter with the queue it goes back to, and moves nothing.
    listed = redriver.run(the_overflow_queue(overflow_vhost), RedrivePlan(dry_run=True)).listed
    assert sorted((i.message_id, i.reason, i.origin) for i in listed) == sorted(
        [
            (msg_id("batch-1"), "delivery_limit", topology.AUDIT_QUEUE),
            (msg_id("parked-1"), "poison", DLQ),
            (msg_id("rejected-1"), "rejected", DLQ),
            (msg_id("unrouted-1"), "delivery_limit", topology.UNROUTED_QUEUE),
        ]
    )
    assert settled_depth(amqp, OVERFLOW, 4) == 4
    settled_empty(amqp, DLQ, topology.UNROUTED_QUEUE, topology.AUDIT_QUEUE)
    assert audit.records == []

    # Filters: by topic, only the unrouted letter goes.
    first = redriver.run(
        the_overflow_queue(overflow_vhost),
        RedrivePlan(selection=RedriveFilter(topics=("nobody.#",))),
    )
    assert (first.matched, first.moved, first.stopped) == (1, 1, "empty")
    assert settled_depth(amqp, OVERFLOW, 3) == 3
    assert settled_depth(amqp, topology.UNROUTED_QUEUE, 1) == 1

    rest = redriver.run(the_overflow_queue(overflow_vhost))
    assert (rest.moved, rest.already_moved, rest.stopped) == (3, 0, "empty")
    settled_empty(amqp, OVERFLOW)
    assert redriven(audit, OVERFLOW) == sorted(
        [
            (msg_id("batch-1"), "delivery_limit", (topology.AUDIT_QUEUE,)),
            (msg_id("parked-1"), "poison", (DLQ,)),
            (msg_id("rejected-1"), "rejected", (DLQ,)),
            (msg_id("unrouted-1"), "delivery_limit", (topology.UNROUTED_QUEUE,)),
        ]
    )

    # The audit batch, as the audit writer's event source will read it.
    assert settled_depth(amqp, topology.AUDIT_QUEUE, 1) == 1
    _, properties, body = amqp.basic_get(topology.AUDIT_QUEUE, auto_ack=True)
    assert (properties.message_id, properties.user_id, body) == (
        msg_id("batch-1"),
        "guest",
        b'{"records": []}',
    )
    assert (properties.content_type, properties.delivery_mode) == ("application/json", 2)

    # The DLQ letters, as they were, with their original reason and time in headers (RabbitMQ
    # 4.x ignores the x-death a client publishes).
    assert settled_depth(amqp, DLQ, 2) == 2
    letters = take(amqp, DLQ)
    rejected, body = letters[msg_id("rejected-1")]
    assert body == BODY
    assert (rejected.type, rejected.correlation_id, rejected.reply_to) == (
        "community.case.update",
        "corr-1",
        "reply.queue",
    )
    assert (rejected.content_type, rejected.content_encoding, rejected.delivery_mode) == (
        "application/json",
        "utf-8",
        2,
    )
    headers = rejected.headers
    assert (headers["case-region"], headers["case-count"], headers["fabric-audience"]) == (
        "north",
        7,
        "all",
    )
    assert headers[topology.DEAD_LETTER_REASON_HEADER] == "rejected"
    assert abs(int(headers[topology.DEAD_LETTERED_AT_HEADER]) - rejected_at) < 5
    assert headers[RETURNS_HEADER] == "1"
    parked = letters[msg_id("parked-1")][0].headers
    assert parked[topology.DEAD_LETTER_REASON_HEADER] == "poison"
    assert parked[topology.DEAD_LETTERED_AT_HEADER] == str(int(rejected_at) - 3600)
    amqp.basic_nack(0, multiple=True, requeue=True)

    # From there the ordinary DLQ redrive takes them to the work queue, with their reasons.
    dlq = RabbitMqDeadLetterQueue(
        settings(overflow_vhost),
        DLQ,
        origin=RabbitMqTransport(settings(overflow_vhost), exchange_for=exchange_for),
    )
    assert settled_depth(amqp, DLQ, 2) == 2
    assert redriver.run(dlq).moved == 2
    assert redriven(audit, DLQ) == sorted(
        [(msg_id("parked-1"), "poison", (WORK,)), (msg_id("rejected-1"), "rejected", (WORK,))]
    )
    assert settled_depth(amqp, WORK, 2) == 2
    at_work = take(amqp, WORK)
    assert sorted(at_work) == sorted([msg_id("parked-1"), msg_id("rejected-1")])
    properties, body = at_work[msg_id("rejected-1")]
    assert (body, properties.correlation_id, properties.reply_to) == (BODY, "corr-1", "reply.queue")
    assert properties.headers["case-region"] == "north"
    assert properties.headers[topology.REDRIVES_HEADER] == "1"

    # The unrouted letter overflows a second time: a new occurrence, moved again, not taken for
    # the one the ledger knows (and removed).
    overflow(amqp, topology.UNROUTED_QUEUE)
    again = redriver.run(the_overflow_queue(overflow_vhost))
    assert (again.moved, again.already_moved) == (1, 0)
    assert settled_depth(amqp, topology.UNROUTED_QUEUE, 1) == 1
    _, properties, body = amqp.basic_get(topology.UNROUTED_QUEUE, auto_ack=True)
    assert (properties.message_id, body, properties.headers[RETURNS_HEADER]) == (
        msg_id("unrouted-1"),
        BODY,
        "2",
    )
    assert [r[0] for r in redriven(audit, OVERFLOW)].count(msg_id("unrouted-1")) == 2
    settled_empty(amqp, OVERFLOW)


def test_one_message_overflowed_from_two_dlqs_goes_back_to_both(
    overflow_vhost: str, amqp: Any
) -> None:
    # One message routed to two groups, parked by both: two letters, not twins.
    other_dlq = topology.dead_letter_queue_name(Stakeholder.GOVERNMENT)
    for queue in (DLQ, other_dlq):
        amqp.basic_publish(
            topology.OVERFLOW_EXCHANGE,
            queue,
            BODY,
            pika.BasicProperties(message_id="shared-1", delivery_mode=2),
            mandatory=True,
        )
    assert settled_depth(amqp, OVERFLOW, 2) == 2

    report = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
        the_overflow_queue(overflow_vhost)
    )

    assert (report.moved, report.already_moved) == (2, 0)
    assert settled_depth(amqp, DLQ, 1) == 1
    assert settled_depth(amqp, other_dlq, 1) == 1
    settled_empty(amqp, OVERFLOW)


@pytest.fixture
def other_user(overflow_vhost: str) -> Iterator[tuple[str, str]]:
    """A broker user of this test only (users are broker-wide), deleted afterwards."""
    name, password = f"fabric-test-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    quoted = urllib.parse.quote(name, safe="")
    management("PUT", f"users/{quoted}", {"password": password, "tags": ""})
    management(
        "PUT",
        f"permissions/{urllib.parse.quote(overflow_vhost, safe='')}/{quoted}",
        {"configure": "", "write": ".*", "read": ""},
    )
    yield name, password
    management("DELETE", f"users/{quoted}")


def test_letters_that_cannot_go_back_stay_in_the_overflow_queue(
    overflow_vhost: str, amqp: Any, other_user: tuple[str, str]
) -> None:
    def letter(channel: Any, routing_key: str, message_id: str, user: str | None = None) -> None:
        channel.basic_publish(
            topology.OVERFLOW_EXCHANGE,
            routing_key,
            BODY,
            pika.BasicProperties(message_id=message_id, user_id=user, delivery_mode=2),
            mandatory=True,
        )

    # A group's audit batch: only that group's user may publish it with its user-id.
    consumer = connect(overflow_vhost, other_user)
    letter(consumer, topology.AUDIT_QUEUE, msg_id("their-batch"), user=other_user[0])
    consumer.connection.close()
    letter(amqp, "fabric.retired.dlq", msg_id("orphan-1"))  # a queue the topology no longer has
    letter(amqp, topology.UNROUTED_QUEUE, msg_id("fine-1"))
    assert settled_depth(amqp, OVERFLOW, 3) == 3
    audit = MemoryAuditSink()
    redriver = Redriver(ledger=MemoryRedriveLedger(), audit=audit)

    dry = redriver.run(the_overflow_queue(overflow_vhost), RedrivePlan(dry_run=True))
    assert (dry.matched, dry.left) == (1, 2)
    stays = {item.message_id: item.stays for item in dry.listed}
    assert stays[msg_id("fine-1")] is None
    assert "'fabric.retired.dlq' is not a terminal queue" in str(stays[msg_id("orphan-1")])
    assert f"published as '{other_user[0]}'" in str(stays[msg_id("their-batch")])

    for _ in range(2):  # every run moves what it can, and counts and lists the rest
        report = redriver.run(the_overflow_queue(overflow_vhost))
        assert (report.stopped, report.left) == ("empty", 2)
        assert sorted(item.message_id for item in report.listed) == sorted(
            [msg_id("orphan-1"), msg_id("their-batch")]
        )
        assert settled_depth(amqp, OVERFLOW, 2) == 2
    assert [r.message_id for r in audit.records] == [msg_id("fine-1")]
    assert settled_depth(amqp, topology.UNROUTED_QUEUE, 1) == 1
    settled_empty(amqp, topology.AUDIT_QUEUE)
    assert sorted(take(amqp, OVERFLOW)) == sorted([msg_id("orphan-1"), msg_id("their-batch")])


def test_letters_that_stay_are_read_a_batch_at_a_time_and_do_not_hide_the_rest(
    overflow_vhost: str, amqp: Any
) -> None:
    # A long audit-writer outage overflows many batches that cannot go back: a run must not
    # read them all at once, and must still reach the letters behind them.
    for i in range(250):
        amqp.basic_publish(
            topology.OVERFLOW_EXCHANGE,
            "fabric.retired.dlq",
            BODY,
            pika.BasicProperties(message_id=f"orphan-{i}", delivery_mode=2),
            mandatory=True,
        )
    amqp.basic_publish(
        topology.OVERFLOW_EXCHANGE,
        topology.UNROUTED_QUEUE,
        BODY,
        pika.BasicProperties(message_id="behind-1", delivery_mode=2),
        mandatory=True,
    )
    assert settled_depth(amqp, OVERFLOW, 251) == 251
    looking = the_overflow_queue(overflow_vhost)
    assert [letter.stays is not None for letter in looking.peek(100)] == [True] * 100
    assert settled_depth(amqp, OVERFLOW, 151) == 151, "one peek holds what it returns, no more"
    looking.release()

    report = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
        the_overflow_queue(overflow_vhost)
    )

    assert (report.moved, report.left, report.stopped) == (1, 250, "empty")
    assert len(report.listed) == 100, "the first hundred that stay are listed, all are counted"
    assert settled_depth(amqp, topology.UNROUTED_QUEUE, 1) == 1
    assert settled_depth(amqp, OVERFLOW, 250) == 250


def test_one_message_overflowed_from_two_dlqs_in_far_apart_batches_goes_back_to_both(
    overflow_vhost: str, amqp: Any
) -> None:
    # The same message parked by two groups, their DLQs overflowing at different times: the
    # second letter comes more than a peek batch later, and is a letter of its own.
    other_dlq = topology.dead_letter_queue_name(Stakeholder.GOVERNMENT)

    def letter(queue: str, message_id: str) -> None:
        amqp.basic_publish(
            topology.OVERFLOW_EXCHANGE,
            queue,
            BODY,
            pika.BasicProperties(message_id=message_id, delivery_mode=2),
            mandatory=True,
        )

    letter(DLQ, "shared-1")
    for i in range(120):
        letter(topology.UNROUTED_QUEUE, f"filler-{i}")
    letter(other_dlq, "shared-1")
    assert settled_depth(amqp, OVERFLOW, 122) == 122

    report = Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()).run(
        the_overflow_queue(overflow_vhost)
    )

    assert (report.moved, report.stopped) == (122, "empty")
    assert settled_depth(amqp, other_dlq, 1) == 1
    settled_empty(amqp, OVERFLOW)


def test_a_letter_its_queue_does_not_take_stays_in_the_overflow_queue(
    overflow_vhost: str, amqp: Any
) -> None:
    # The return exchange lost its binding to fabric.audit: the letter comes back unroutable.
    vhost = urllib.parse.quote(overflow_vhost, safe="")
    return_exchange = urllib.parse.quote(topology.OVERFLOW_RETURN_EXCHANGE, safe="")
    audit_queue = urllib.parse.quote(topology.AUDIT_QUEUE, safe="")
    management("DELETE", f"bindings/{vhost}/e/{return_exchange}/q/{audit_queue}/{audit_queue}")
    amqp.basic_publish(
        topology.OVERFLOW_EXCHANGE,
        topology.AUDIT_QUEUE,
        b"batch",
        pika.BasicProperties(message_id="batch-1", delivery_mode=2),
        mandatory=True,
    )
    assert settled_depth(amqp, OVERFLOW, 1) == 1
    audit = MemoryAuditSink()

    report = Redriver(ledger=MemoryRedriveLedger(), audit=audit).run(
        the_overflow_queue(overflow_vhost)
    )

    assert (report.moved, report.stopped) == (0, "origin unavailable")
    assert settled_depth(amqp, OVERFLOW, 1) == 1, "not acknowledged: it stays"
    assert audit.records == []


@pytest.fixture
def moto_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield


def deployed_redrive(
    vhost: str, port: int = AMQP[1], login: tuple[str, str] = ("guest", "guest")
) -> Any:
    """The redrive function's runtime as it is wired (in moto): a secret with ``login`` (guest's,
    unless a test logs in as a generated user), the DynamoDB ledger, audit records to the
    broker's audit exchange; the broker on ``port`` (a fault proxy's, say)."""
    from fabric.bootstrap import build_redrive
    from fabric.settings import RedriveSettings

    create_idempotency_table(boto3.client("dynamodb"), "fabric-test-idempotency")
    secret = boto3.client("secretsmanager").create_secret(
        Name="redrive", SecretString=json.dumps({"username": login[0], "password": login[1]})
    )["ARN"]
    return build_redrive(
        RedriveSettings(
            environment="test",
            rabbitmq_host=AMQP[0],
            rabbitmq_port=port,
            rabbitmq_tls=False,
            rabbitmq_vhost=vhost,
            rabbitmq_secret_arn=secret,
            idempotency_table="fabric-test-idempotency",
            sqs_dead_letter_queues=(),
            max_seconds=60.0,
        )
    )


def test_the_redrive_function_takes_the_overflow_queue(
    overflow_vhost: str, amqp: Any, moto_aws: None
) -> None:
    """As the function is wired."""
    runtime = deployed_redrive(overflow_vhost)
    amqp.basic_publish(
        topology.UNROUTED_EXCHANGE, "", BODY, pika.BasicProperties(message_id=msg_id("u-1"))
    )
    overflow(amqp, topology.UNROUTED_QUEUE)

    report = runtime.redriver.run(runtime.queue("rabbitmq", OVERFLOW)).to_dict()

    assert (report["queue"], report["moved"], report["stopped"]) == (OVERFLOW, 1, "empty")
    assert settled_depth(amqp, topology.UNROUTED_QUEUE, 1) == 1
    settled_empty(amqp, OVERFLOW)
    assert settled_depth(amqp, topology.AUDIT_QUEUE, 1) == 1
    _, properties, body = amqp.basic_get(topology.AUDIT_QUEUE, auto_ack=True)
    assert properties.user_id == "guest"  # the platform user: a record the writer trusts
    (record,) = decode_audit_batch(body).records
    assert (record["event"], record["message_id"], record["transport"], record["queues"]) == (
        "redriven",
        msg_id("u-1"),
        OVERFLOW,
        [topology.UNROUTED_QUEUE],
    )
    with pytest.raises(ValueError, match="not a dead-letter queue"):
        runtime.queue("rabbitmq", "fabric.elsewhere")


def test_the_runbook_says_which_letters_stay_and_fails(overflow_vhost: str, amqp: Any) -> None:
    # An operator who runs the redrive must not read "stopped: empty" as "all moved back".
    from fabric.bootstrap import RedriveRuntime
    from scripts import runbook
    from tests.integration.test_sqs_redrive import RedriveFunction

    for routing_key, message_id in (("fabric.retired.dlq", "orphan-1"), (DLQ, "fine-1")):
        amqp.basic_publish(
            topology.OVERFLOW_EXCHANGE,
            routing_key,
            BODY,
            pika.BasicProperties(message_id=message_id, delivery_mode=2),
            mandatory=True,
        )
    assert settled_depth(amqp, OVERFLOW, 2) == 2
    runtime = RedriveRuntime(
        redriver=Redriver(ledger=MemoryRedriveLedger(), audit=MemoryAuditSink()),
        settings=None,  # type: ignore[arg-type]
        open_queue=lambda _source, _name: the_overflow_queue(overflow_vhost),
    )
    out = io.StringIO()
    status = runbook.redrive(
        "test",
        client={"lambda": RedriveFunction(runtime)}.__getitem__,
        request={"source": "rabbitmq", "queue": OVERFLOW},
        chunk=10,
        out=out,
    )

    assert status == 1
    assert "orphan-1" in out.getvalue()
    assert "stays: its routing key 'fabric.retired.dlq' is not a terminal queue" in out.getvalue()
    assert "1 matching letter(s) cannot go back by themselves" in out.getvalue()
    assert "summary: moved 1, stopped: empty" in out.getvalue()
    assert settled_depth(amqp, DLQ, 1) == 1
