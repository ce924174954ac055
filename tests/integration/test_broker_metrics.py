"""The broker metrics function on the real local RabbitMQ: the generated topology in the test's
vhost with its monitor user, the monitor's secret in moto, and the real handler, whose EMF
lines must carry each dead-letter queue's depth as the broker counts it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pika
import pytest
from moto import mock_aws

from fabric.adapters.management import ManagementClient
from fabric.broker_depth import NAMESPACE, QUEUE_DEPTH, QUEUES_UNMEASURED
from fabric.errors import ManagementRequestRejected
from fabric.routing import default_routing_table
from fabric.stakeholders import Stakeholder
from fabric.topology import (
    DEAD_LETTER_EXCHANGE,
    MONITOR_USER,
    OVERFLOW_QUEUE,
    dead_letter_queue_name,
    definitions,
    queue_name,
)
from fabric.topology_apply import apply_topology
from tests.conftest import load_handler
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import AMQP, GUEST, MANAGEMENT, management

DLQS = [dead_letter_queue_name(g, emergency=e) for e in (False, True) for g in Stakeholder]
MEASURED = [*DLQS, OVERFLOW_QUEUE]


def _apply_with_monitor(vhost: str) -> tuple[str, str]:
    """A fresh ``vhost`` (guest may do anything in it) with the generated topology and only its
    monitor user (renamed: users are broker-wide); returns the monitor's (user, password)."""
    path = urllib.parse.quote(vhost, safe="")
    management("PUT", f"vhosts/{path}")
    management("PUT", f"permissions/{path}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    monitor = f"{vhost}-monitor"
    password = uuid.uuid4().hex
    document = definitions(default_routing_table(), vhost=vhost)
    document["users"] = [
        {**u, "name": monitor} for u in document["users"] if u["name"] == MONITOR_USER
    ]
    document["permissions"] = [
        {**p, "user": monitor} for p in document["permissions"] if p["user"] == MONITOR_USER
    ]
    apply_topology(
        ManagementClient(MANAGEMENT, *GUEST), document, passwords={monitor: password}, vhost=vhost
    )
    return monitor, password


def _remove(vhost: str, monitor: str) -> None:
    """Delete the vhost and the monitor user, whichever of them exists."""
    for kind, name in (("vhosts", vhost), ("users", monitor)):
        try:
            management("DELETE", f"{kind}/{urllib.parse.quote(name, safe='')}")
        except urllib.error.HTTPError as gone:
            if gone.code != 404:
                raise


@pytest.fixture(scope="module")
def applied(request: pytest.FixtureRequest) -> Iterator[dict[str, tuple[str, str, str]]]:
    """For each test of the module that takes ``fabric``, by node id: a vhost with the topology
    and its monitor ``(vhost, monitor, password)``, all applied before the first such test
    starts. A new queue has no depth until the broker's statistics sample it (every 5 s, a
    quorum queue later still): the samples are taken while the tests before run."""
    made: dict[str, tuple[str, str, str]] = {}
    try:
        for item in request.session.items:
            if (
                isinstance(item, pytest.Function)
                and item.module is request.module
                and "fabric" in item.fixturenames
            ):
                vhost = f"fabric-test-{uuid.uuid4().hex[:12]}"
                made[item.nodeid] = (vhost, f"{vhost}-monitor", "")  # removed if apply fails
                made[item.nodeid] = (vhost, *_apply_with_monitor(vhost))
        yield made
    finally:
        for vhost, monitor, _password in made.values():
            _remove(vhost, monitor)


@pytest.fixture
def fabric(
    request: pytest.FixtureRequest,
    applied: dict[str, tuple[str, str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[SimpleNamespace]:
    """The topology in a vhost of the test's own with only its monitor user (see ``applied``),
    its secret in moto, and the handler imported with the stack's variables."""
    vhost, monitor, password = applied.pop(request.node.nodeid)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    try:
        with mock_aws():
            import boto3

            secrets = boto3.client("secretsmanager", region_name=REGION)
            secret = secrets.create_secret(
                Name="monitor", SecretString=json.dumps({"username": monitor, "password": password})
            )["ARN"]
            for name, value in {
                "FABRIC_ENV": "test",
                "MANAGEMENT_URL": MANAGEMENT,
                "MONITOR_SECRET_ARN": secret,
                "RABBITMQ_VHOST": vhost,
                "BROKER_DEPTH_QUEUES": json.dumps(MEASURED),
            }.items():
                monkeypatch.setenv(name, value)
            yield SimpleNamespace(
                handler=load_handler("broker_metrics", monkeypatch),
                vhost=vhost,
                monitor=monitor,
                password=password,
                secrets=secrets,
                secret=secret,
            )
    finally:
        _remove(vhost, monitor)


def dead_letter(vhost: str, work_queue: str, count: int) -> None:
    """``count`` messages dead-lettered from ``work_queue``, as the broker's dead-letter exchange
    routes them into its DLQ (published as guest, confirmed)."""
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            *AMQP, virtual_host=vhost, credentials=pika.PlainCredentials(*GUEST)
        )
    )
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for index in range(count):
            channel.basic_publish(
                DEAD_LETTER_EXCHANGE,
                work_queue,
                f"letter {index}".encode(),
                pika.BasicProperties(delivery_mode=2),
                mandatory=True,
            )
    finally:
        connection.close()


def sampled(vhost: str, expected: dict[str, int]) -> None:
    """Wait until the management statistics (sampled every few seconds) report ``expected``."""
    deadline = time.monotonic() + 30
    while True:
        listed = {
            q["name"]: q.get("messages")
            for q in management("GET", f"queues/{urllib.parse.quote(vhost, safe='')}")
        }
        if all(listed.get(name) == count for name, count in expected.items()):
            return
        assert time.monotonic() < deadline, f"statistics never reported {expected}: {listed}"
        time.sleep(0.5)


def emitted(output: str) -> tuple[dict[str, int], list[int]]:
    """The EMF lines of a run: QueueDepth per queue, and the QueuesUnmeasured values."""
    depths: dict[str, int] = {}
    unmeasured: list[int] = []
    for line in output.splitlines():
        document = json.loads(line)
        (directive,) = document["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == NAMESPACE
        assert document["Environment"] == "test"
        if QUEUE_DEPTH in document:
            assert directive["Dimensions"] == [["Environment", "Queue"]]
            depths[document["Queue"]] = document[QUEUE_DEPTH]
        else:
            assert directive["Dimensions"] == [["Environment"]]
            unmeasured.append(document[QUEUES_UNMEASURED])
    return depths, unmeasured


def test_the_metric_of_each_dead_letter_queue_is_its_depth_on_the_broker(
    fabric: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    government = queue_name(Stakeholder.GOVERNMENT, emergency=True)
    media = queue_name(Stakeholder.MEDIA)
    dead_letter(fabric.vhost, government, 3)
    dead_letter(fabric.vhost, media, 1)
    expected = dict.fromkeys(MEASURED, 0)
    expected[dead_letter_queue_name(Stakeholder.GOVERNMENT, emergency=True)] = 3
    expected[dead_letter_queue_name(Stakeholder.MEDIA)] = 1
    sampled(fabric.vhost, expected)
    capsys.readouterr()

    answer = fabric.handler.handler({"source": "aws.events"}, None)

    depths, unmeasured = emitted(capsys.readouterr().out)
    assert depths == expected
    assert unmeasured == [0]
    assert answer == {"depths": expected, "missing": [], "unsampled": []}


def test_a_dead_letter_queue_deleted_by_hand_is_counted_unmeasured_and_named(
    fabric: SimpleNamespace, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    deleted = dead_letter_queue_name(Stakeholder.COMMUNITY, emergency=True)
    management("DELETE", f"queues/{urllib.parse.quote(fabric.vhost, safe='')}/{deleted}")
    sampled(fabric.vhost, {name: 0 for name in MEASURED if name != deleted})
    capsys.readouterr()

    answer = fabric.handler.handler({}, None)

    depths, unmeasured = emitted(capsys.readouterr().out)
    assert set(depths) == set(MEASURED) - {deleted}
    assert unmeasured == [1]
    assert answer["missing"] == [deleted]
    assert deleted in caplog.text


def test_after_a_password_rotation_a_warm_function_reads_the_new_password_and_measures(
    fabric: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    sampled(fabric.vhost, dict.fromkeys(MEASURED, 0))
    fabric.handler.handler({}, None)  # warm: the old password is cached
    rotated = uuid.uuid4().hex
    management(
        "PUT",
        f"users/{urllib.parse.quote(fabric.monitor, safe='')}",
        {"password": rotated, "tags": "management"},
    )
    fabric.secrets.put_secret_value(
        SecretId=fabric.secret,
        SecretString=json.dumps({"username": fabric.monitor, "password": rotated}),
    )
    capsys.readouterr()

    answer = fabric.handler.handler({}, None)

    assert answer["depths"] == dict.fromkeys(MEASURED, 0)
    assert emitted(capsys.readouterr().out)[1] == [0]


def test_the_monitor_user_lists_the_queues_and_can_do_nothing_else(
    fabric: SimpleNamespace,
) -> None:
    """Least privilege on the real broker: tag ``management`` with permissions matching no name
    lists the vhost's queues, and cannot read, publish, change or delete anything."""
    dead_letter(fabric.vhost, queue_name(Stakeholder.ACADEMIC), 1)
    monitor = ManagementClient(MANAGEMENT, fabric.monitor, fabric.password)
    assert {q["name"] for q in monitor.list_queues(fabric.vhost)} >= set(MEASURED)
    dlq = dead_letter_queue_name(Stakeholder.ACADEMIC)
    for attempt in (
        lambda: monitor.delete_queue(fabric.vhost, dlq),
        lambda: monitor.put_queue(
            fabric.vhost, "fabric.intruder", durable=True, auto_delete=False, arguments={}
        ),
        lambda: monitor.put_permissions(
            fabric.vhost, fabric.monitor, configure=".*", write=".*", read=".*"
        ),
        lambda: monitor.list_queues("/"),
    ):
        with pytest.raises(ManagementRequestRejected) as refused:
            attempt()
        assert refused.value.status == 401
    # Nor can it take a message off a queue, or publish one (the default exchange included),
    # over AMQP.
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            *AMQP,
            virtual_host=fabric.vhost,
            credentials=pika.PlainCredentials(fabric.monitor, fabric.password),
        )
    )
    try:
        channel = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            channel.basic_get(dlq)
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            channel.basic_publish("", dlq, b"forged")
    finally:
        if connection.is_open:
            connection.close()
    # Still there, as the broker counts it now (no statistics sample to wait for).
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            *AMQP, virtual_host=fabric.vhost, credentials=pika.PlainCredentials(*GUEST)
        )
    )
    try:
        assert connection.channel().queue_declare(dlq, passive=True).method.message_count == 1
    finally:
        connection.close()
