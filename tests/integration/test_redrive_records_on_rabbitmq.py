"""A group's user parks a message with free text in its id, type and reason header in its own
DLQ (through its retry exchange, which the topology lets it publish to); the redrive function,
wired as deployed, puts it back as it is, and its ``redriven`` record on the broker's audit
exchange holds none of that text (the real local RabbitMQ, moto for the secret and ledger)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pika
import pytest
from moto import mock_aws

from fabric import topology
from fabric.adapters.management import ManagementClient
from fabric.audit import decode_audit_batch
from fabric.redrive import RedrivePlan
from fabric.routing import default_routing_table
from fabric.stakeholders import Stakeholder
from fabric.topology import user_name
from fabric.topology_apply import apply_topology
from tests.integration.aws_audit import create_idempotency_table
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import AMQP, GUEST, MANAGEMENT

pytestmark = pytest.mark.integration

GROUP = Stakeholder.MEDIA
WORK = topology.queue_name(GROUP)
DLQ = topology.dead_letter_queue_name(GROUP)
CHILD = "Jane Doe"  # stands for child data: it must reach no audit record
MESSAGE_ID = f"{CHILD} lives at 12 Jalan Melati, Bogor"
TYPE = f"{CHILD}'s case note"
REASON = f"{CHILD} was hit by her father"
BODY = b'{"note": "the trail keeps a body only as its SHA-256"}'


@pytest.fixture
def group_user(vhost: str) -> Iterator[tuple[str, str]]:
    """The generated topology in the test's vhost with the group's user only, renamed for this
    test (users are broker-wide): (name, password). Deleted afterwards."""
    group = user_name(GROUP)
    name, password = f"t{vhost.removeprefix('fabric-test-')}-{group}", uuid.uuid4().hex
    document = topology.definitions(default_routing_table(), vhost=vhost)
    document["users"] = [{**u, "name": name} for u in document["users"] if u["name"] == group]
    document["permissions"] = [
        {**p, "user": name} for p in document["permissions"] if p["user"] == group
    ]
    client = ManagementClient(MANAGEMENT, "guest", "guest")
    apply_topology(client, document, passwords={name: password}, vhost=vhost)
    yield name, password
    client.delete_user(name)


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


def settled_depth(channel: Any, queue: str, expected: int, timeout: float = 5.0) -> int:
    """The depth once it is ``expected`` (or after ``timeout``): letters a run gives back return
    to a quorum queue asynchronously, just after the run's channel closes."""
    deadline = time.monotonic() + timeout
    while (found := queue_depth(channel, queue)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def queue_depth(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def connect(vhost: str, user: tuple[str, str]) -> Any:
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            *AMQP, virtual_host=vhost, credentials=pika.PlainCredentials(*user)
        )
    )
    channel = connection.channel()
    channel.confirm_delivery()
    return channel


def test_a_letter_a_group_parked_with_free_text_goes_back_and_its_record_holds_none_of_it(
    vhost: str, group_user: tuple[str, str], moto_aws: None
) -> None:
    from fabric.bootstrap import build_redrive
    from fabric.settings import RedriveSettings

    group = connect(vhost, group_user)
    group.basic_publish(
        topology.retry_exchange_name(GROUP),
        DLQ,
        BODY,
        pika.BasicProperties(
            message_id=MESSAGE_ID,
            type=TYPE,
            delivery_mode=2,
            headers={"fabric-audience": "all", topology.DEAD_LETTER_REASON_HEADER: REASON},
        ),
        mandatory=True,
    )
    group.connection.close()
    create_idempotency_table(boto3.client("dynamodb"), "fabric-test-idempotency")
    secret = boto3.client("secretsmanager").create_secret(
        Name="platform", SecretString=json.dumps({"username": "guest", "password": "guest"})
    )["ARN"]
    runtime = build_redrive(
        RedriveSettings(
            environment="test",
            rabbitmq_host=AMQP[0],
            rabbitmq_port=AMQP[1],
            rabbitmq_tls=False,
            rabbitmq_vhost=vhost,
            rabbitmq_secret_arn=secret,
            idempotency_table="fabric-test-idempotency",
            sqs_dead_letter_queues=(),
            max_seconds=60.0,
        )
    )
    platform = connect(vhost, GUEST)

    # The operator's dry run shows the letter as it is, to find and judge it by.
    dry = runtime.redriver.run(runtime.queue("rabbitmq", DLQ), RedrivePlan(dry_run=True))
    assert [(i.message_id, i.topic, i.reason) for i in dry.listed] == [(MESSAGE_ID, TYPE, REASON)]
    assert settled_depth(platform, DLQ, 1) == 1

    report = runtime.redriver.run(runtime.queue("rabbitmq", DLQ))

    assert (report.moved, report.stopped) == (1, "empty")
    method, properties, body = platform.basic_get(WORK, auto_ack=True)
    assert method is not None, "the letter is back in its work queue"
    assert (properties.message_id, properties.type, body) == (MESSAGE_ID, TYPE, BODY)
    method, properties, batch = platform.basic_get(topology.AUDIT_QUEUE, auto_ack=True)
    assert method is not None
    assert properties.user_id == "guest"  # the platform's record, which the writer trusts
    (record,) = decode_audit_batch(batch).records
    assert (record["event"], record["message_id"], record.get("topic"), record["reason"]) == (
        "redriven",
        None,
        None,
        "unknown",
    )
    assert (record["transport"], record["queues"]) == (DLQ, [WORK])
    assert CHILD.encode() not in batch
    platform.connection.close()
