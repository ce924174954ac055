"""The topology applier against the real local RabbitMQ: management API in, AMQP behaviour out."""

from __future__ import annotations

import copy
import http.server
import json
import secrets
import threading
import time
import tomllib
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import pika
import pika.exceptions
import pytest

from fabric import topology
from fabric.adapters.management import ManagementClient
from fabric.errors import (
    ManagementApiError,
    ManagementRequestRejected,
    ManagementUnavailable,
    TopologyConflict,
)
from fabric.routing import default_routing_table, parse_routing_table
from fabric.topology_apply import (
    ApplyReport,
    ChangeKind,
    Kept,
    Resource,
    apply_topology,
    delete_topology,
    diff_topology,
)
from tests.integration.conftest import AMQP, MANAGEMENT, management

pytestmark = pytest.mark.integration

INGRESS = "fabric.x.ingress"
UNROUTED = "fabric.x.unrouted"
DLX = "fabric.x.dlx"
WORK = "fabric.work"
WORK_DLQ = "fabric.work.dlq"
UNROUTED_QUEUE = "fabric.unrouted"


@dataclass(frozen=True)
class Sandbox:
    """A fresh vhost's name, the document to apply to it, and its users' passwords."""

    vhost: str
    consumer: str
    publisher: str
    passwords: dict[str, str]
    document: dict[str, Any]


@pytest.fixture(scope="module")
def client() -> ManagementClient:
    """A management client as guest; the test fails (never skips) when the API does not answer."""
    client = ManagementClient(MANAGEMENT, "guest", "guest", timeout=10)
    try:
        client.server_version()
    except ManagementApiError as exc:
        pytest.fail(
            f"RabbitMQ management API at {MANAGEMENT} is not usable ({exc}); "
            "run `bash scripts/ensure_rabbitmq.sh`",
            pytrace=False,
        )
    return client


def _new_sandbox() -> Sandbox:
    vhost = f"fabric-test-{uuid.uuid4().hex[:12]}"
    consumer, publisher = f"{vhost}-consumer", f"{vhost}-publisher"
    passwords = {consumer: secrets.token_urlsafe(16), publisher: secrets.token_urlsafe(16)}
    return Sandbox(vhost, consumer, publisher, passwords, _document(vhost, consumer, publisher))


def _drop(client: ManagementClient, sandbox: Sandbox) -> None:
    try:
        client.delete_vhost(sandbox.vhost)
    finally:
        for user in sandbox.passwords:
            client.delete_user(user)


@pytest.fixture
def sandbox(client: ManagementClient) -> Iterator[Sandbox]:
    """A vhost name nobody uses yet; the vhost and the users are deleted afterwards."""
    created = _new_sandbox()
    yield created
    _drop(client, created)


Prepare = Callable[[ManagementClient, Sandbox], object]
_TestFunction = TypeVar("_TestFunction", bound=Callable[..., None])


def prepared_ahead(prepare: Prepare) -> Callable[[_TestFunction], _TestFunction]:
    """Have ``prepare`` run on the test's ``ahead`` sandbox when the module's first test starts:
    a new queue shows no message count until the broker's statistics sample it (every 5 s, a
    quorum queue later still), and the samples are taken while the tests before it run instead
    of while it waits."""

    def mark(test: _TestFunction) -> _TestFunction:
        test.prepare_ahead = prepare  # type: ignore[attr-defined]
        return test

    return mark


@pytest.fixture(scope="module", autouse=True)
def prepared(
    request: pytest.FixtureRequest, client: ManagementClient
) -> Iterator[dict[str, Sandbox]]:
    """A fresh sandbox for each test of the module that takes ``ahead``, by node id, each
    prepared as its test's ``prepared_ahead`` says when the module's first test starts; whatever
    is left is deleted afterwards."""
    boxes: dict[str, Sandbox] = {}
    try:
        for item in request.session.items:
            if (
                isinstance(item, pytest.Function)
                and item.module is request.module
                and "ahead" in item.fixturenames
            ):
                boxes[item.nodeid] = _new_sandbox()
                item.function.prepare_ahead(client, boxes[item.nodeid])
        yield boxes
    finally:
        for box in boxes.values():
            _drop(client, box)


@pytest.fixture
def ahead(
    request: pytest.FixtureRequest, client: ManagementClient, prepared: dict[str, Sandbox]
) -> Iterator[Sandbox]:
    """This test's sandbox, prepared when the module's first test started (see
    ``prepared_ahead``); deleted afterwards like ``sandbox``."""
    box = prepared.pop(request.node.nodeid)
    yield box
    _drop(client, box)


def _document(vhost: str, consumer: str, publisher: str) -> dict[str, Any]:
    def exchange(name: str, kind: str, **arguments: Any) -> dict[str, Any]:
        return {
            "name": name,
            "vhost": vhost,
            "type": kind,
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": arguments,
        }

    def queue(name: str, **arguments: Any) -> dict[str, Any]:
        return {
            "name": name,
            "vhost": vhost,
            "durable": True,
            "auto_delete": False,
            "arguments": {"x-queue-type": "quorum", "x-overflow": "reject-publish", **arguments},
        }

    def binding(source: str, queue: str, key: str) -> dict[str, Any]:
        return {
            "source": source,
            "vhost": vhost,
            "destination": queue,
            "destination_type": "queue",
            "routing_key": key,
            "arguments": {},
        }

    def permission(user: str, *, write: str = "^$", read: str = "^$") -> dict[str, Any]:
        return {"user": user, "vhost": vhost, "configure": "^$", "write": write, "read": read}

    return {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            exchange(INGRESS, "topic", **{"alternate-exchange": UNROUTED}),
            exchange(UNROUTED, "fanout"),
            exchange(DLX, "direct"),
        ],
        "queues": [
            queue(
                WORK,
                **{
                    "x-delivery-limit": 5,
                    "x-dead-letter-exchange": DLX,
                    "x-dead-letter-routing-key": WORK,
                    "x-dead-letter-strategy": "at-least-once",
                },
            ),
            queue(WORK_DLQ, **{"x-delivery-limit": 1000}),
            queue(UNROUTED_QUEUE, **{"x-delivery-limit": 1000}),
        ],
        "bindings": [
            binding(INGRESS, WORK, "case.#"),
            binding(DLX, WORK_DLQ, WORK),
            binding(UNROUTED, UNROUTED_QUEUE, ""),
        ],
        "users": [{"name": consumer, "tags": []}, {"name": publisher, "tags": []}],
        "permissions": [
            permission(consumer, read=r"^fabric\.work$"),
            permission(publisher, write=r"^fabric\.x\.ingress$"),
        ],
    }


def _apply(client: ManagementClient, sandbox: Sandbox, **options: Any) -> Any:
    return apply_topology(
        client, sandbox.document, passwords=sandbox.passwords, vhost=sandbox.vhost, **options
    )


def _connect(vhost: str, user: str, password: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            *AMQP, virtual_host=vhost, credentials=pika.PlainCredentials(user, password)
        )
    )


def _publish(sandbox: Sandbox, routing_key: str, body: bytes) -> None:
    """Publish as the sandbox's publisher, persistent and confirmed."""
    connection = _connect(sandbox.vhost, sandbox.publisher, sandbox.passwords[sandbox.publisher])
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            INGRESS,
            routing_key,
            body,
            properties=pika.BasicProperties(delivery_mode=2),
            mandatory=True,
        )
    finally:
        connection.close()


def _take_as_guest(client: ManagementClient, vhost: str, queue: str) -> bytes | None:
    """One message body from the queue (acknowledged), read as guest."""
    client.put_permissions(vhost, "guest", configure=".*", write=".*", read=".*")
    connection = _connect(vhost, "guest", "guest")
    try:
        _method, _properties, body = connection.channel().basic_get(queue, auto_ack=True)
    finally:
        connection.close()
    return bytes(body) if body is not None else None


def _wait_for_sampled_counts(
    client: ManagementClient, vhost: str, expected: dict[str, int]
) -> None:
    """Wait until the statistics show a count for every queue, and the expected ones."""
    deadline = time.monotonic() + 30
    while True:
        counts = {q["name"]: q.get("messages") for q in client.list_queues(vhost)}
        if None not in counts.values() and all(counts.get(k) == v for k, v in expected.items()):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"statistics never showed {expected}: {counts}")
        time.sleep(0.5)


def test_applied_topology_routes_to_the_queue_and_unmatched_to_the_alternate_exchange(
    client: ManagementClient, sandbox: Sandbox
) -> None:
    report = _apply(client, sandbox)

    assert report.changed
    assert report.extra == ()
    work = client.get_queue(sandbox.vhost, WORK)
    assert work is not None
    assert work["arguments"] == sandbox.document["queues"][0]["arguments"]
    _publish(sandbox, "case.opened", b"routed")
    _publish(sandbox, "nobody.listens", b"unrouted")
    consumer = _connect(sandbox.vhost, sandbox.consumer, sandbox.passwords[sandbox.consumer])
    try:
        _method, _properties, body = consumer.channel().basic_get(WORK, auto_ack=True)
    finally:
        consumer.close()
    assert body == b"routed"
    assert _take_as_guest(client, sandbox.vhost, UNROUTED_QUEUE) == b"unrouted"


def test_applying_twice_changes_nothing(client: ManagementClient, sandbox: Sandbox) -> None:
    _apply(client, sandbox)

    again = _apply(client, sandbox)

    assert again.applied == ()
    assert again.extra == ()
    assert diff_topology(client, sandbox.document, sandbox.vhost, passwords=sandbox.passwords) == []


def test_a_changed_queue_argument_needs_recreate_and_apply_refuses(
    client: ManagementClient, sandbox: Sandbox
) -> None:
    _apply(client, sandbox)
    changed = copy.deepcopy(sandbox.document)
    changed["queues"][0]["arguments"]["x-delivery-limit"] = 7

    (change,) = diff_topology(client, changed, sandbox.vhost)

    assert (change.kind, change.resource, change.name) == (
        ChangeKind.NEEDS_RECREATE,
        Resource.QUEUE,
        WORK,
    )
    assert change.differences == {"x-delivery-limit": (5, 7)}
    with pytest.raises(TopologyConflict, match=r"queue 'fabric\.work': x-delivery-limit 5 -> 7"):
        apply_topology(client, changed, passwords=sandbox.passwords, vhost=sandbox.vhost)
    work = client.get_queue(sandbox.vhost, WORK)
    assert work is not None
    assert work["arguments"]["x-delivery-limit"] == 5


def test_a_user_consumes_its_own_queue_and_is_refused_any_other(
    client: ManagementClient, sandbox: Sandbox
) -> None:
    _apply(client, sandbox)
    connection = _connect(sandbox.vhost, sandbox.consumer, sandbox.passwords[sandbox.consumer])
    try:
        channel = connection.channel()
        channel.basic_consume(WORK, lambda *_: None)
        other = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            other.basic_consume(UNROUTED_QUEUE, lambda *_: None)
    finally:
        connection.close()
    assert refused.value.reply_code == 403
    assert "ACCESS_REFUSED" in refused.value.reply_text


@pytest.mark.parametrize("change", ["removed", "narrowed"])
def test_a_consumer_whose_permission_apply_revokes_or_narrows_gets_nothing_more(
    client: ManagementClient, sandbox: Sandbox, change: str
) -> None:
    # RabbitMQ checks read permission when a consumer starts, not per delivery: a consumer
    # already running would go on reading the queue after its user lost the right to.
    _apply(client, sandbox)
    connection = _connect(sandbox.vhost, sandbox.consumer, sandbox.passwords[sandbox.consumer])
    received: list[bytes] = []
    connection.channel().basic_consume(
        WORK, lambda _ch, _method, _props, body: received.append(body), auto_ack=True
    )
    _publish(sandbox, "case.opened", b"before")
    _wait_until_listed(sandbox.vhost, sandbox.consumer, connection)
    assert received == [b"before"]
    document = copy.deepcopy(sandbox.document)
    if change == "removed":  # the group left the routing table: user and permission gone
        document["users"] = [u for u in document["users"] if u["name"] != sandbox.consumer]
        document["permissions"] = [
            p for p in document["permissions"] if p["user"] != sandbox.consumer
        ]
        expected = (ChangeKind.DELETE, Resource.PERMISSION, sandbox.consumer)
    else:  # the user may read its dead letters only
        document["permissions"][0]["read"] = r"^fabric\.work\.dlq$"
        expected = (ChangeKind.UPDATE, Resource.PERMISSION, sandbox.consumer)
    passwords = {user["name"]: sandbox.passwords[user["name"]] for user in document["users"]}

    report = apply_topology(client, document, passwords=passwords, vhost=sandbox.vhost)

    assert [(c.kind, c.resource, c.name) for c in report.applied] == [expected]
    _publish(sandbox, "case.opened", b"after")
    try:
        connection.process_data_events(time_limit=3)
    except pika.exceptions.AMQPError:
        pass  # closed by the broker: the point
    finally:
        if connection.is_open:
            connection.close()
    assert received == [b"before"]
    assert _take_as_guest(client, sandbox.vhost, WORK) == b"after"


def _wait_until_listed(vhost: str, user: str, connection: pika.BlockingConnection) -> None:
    """Serve the connection until the management API lists it (it does after a stats sample)."""
    deadline = time.monotonic() + 30
    path = f"vhosts/{urllib.parse.quote(vhost, safe='')}/connections"
    while user not in {item["user"] for item in management("GET", path)}:
        if time.monotonic() > deadline:
            pytest.fail(f"the management API never listed the connection of {user}")
        connection.process_data_events(time_limit=0.25)


# Placed after slower tests: its quorum queue is sampled by the time it runs (prepared_ahead).
@prepared_ahead(_apply)
def test_recreate_empty_replaces_an_empty_quorum_queue_with_its_bindings(
    client: ManagementClient, ahead: Sandbox
) -> None:
    sandbox = ahead  # applied
    _wait_for_sampled_counts(client, sandbox.vhost, {WORK: 0})
    changed = copy.deepcopy(sandbox.document)
    changed["queues"][0]["arguments"]["x-delivery-limit"] = 7

    # Nothing publishes here: the statistics wait after the cut need not be the broker's 15 s.
    fast = ManagementClient(MANAGEMENT, "guest", "guest", statistics_interval=0.2)
    report = apply_topology(
        fast, changed, passwords=sandbox.passwords, vhost=sandbox.vhost, recreate_empty=True
    )

    # Bound again within the recreation, not in a later phase.
    assert [c.kind for c in report.applied] == [ChangeKind.NEEDS_RECREATE]
    assert diff_topology(client, changed, sandbox.vhost) == []
    _publish(sandbox, "case.closed", b"after recreate")
    assert _take_as_guest(client, sandbox.vhost, WORK) == b"after recreate"


def _apply_and_publish_one(client: ManagementClient, sandbox: Sandbox) -> None:
    _apply(client, sandbox)
    _publish(sandbox, "case.opened", b"must survive")


@prepared_ahead(_apply_and_publish_one)
def test_delete_topology_keeps_a_queue_holding_messages_and_reports_it(
    client: ManagementClient, ahead: Sandbox
) -> None:
    sandbox = ahead  # applied, and a message published to the work queue
    _wait_for_sampled_counts(client, sandbox.vhost, {WORK: 1})
    # Nothing publishes any more: the statistics wait after the cut need not be the broker's.
    fast = ManagementClient(MANAGEMENT, "guest", "guest", statistics_interval=0.2)

    report = delete_topology(fast, sandbox.document, sandbox.vhost)

    assert Kept(Resource.QUEUE, WORK, "holds 1 messages") in report.kept
    assert {(k.resource, k.name) for k in report.kept} == {
        (Resource.QUEUE, WORK),
        (Resource.EXCHANGE, DLX),
        (Resource.QUEUE, WORK_DLQ),
        (Resource.VHOST, sandbox.vhost),
    }
    assert set(report.deleted) >= {
        (Resource.USER, sandbox.consumer),
        (Resource.USER, sandbox.publisher),
        (Resource.QUEUE, UNROUTED_QUEUE),
        (Resource.EXCHANGE, INGRESS),
        (Resource.EXCHANGE, UNROUTED),
    }
    assert client.get_user(sandbox.consumer) is None
    assert _take_as_guest(client, sandbox.vhost, WORK) == b"must survive"


def test_the_generated_fabric_topology_applies_to_the_real_broker_idempotently(
    client: ManagementClient, sandbox: Sandbox
) -> None:
    document = topology.definitions(default_routing_table(), vhost=sandbox.vhost)
    # Per-test user names: the real ones are global on this shared broker.
    renamed = {user["name"]: f"{sandbox.vhost}-{user['name']}" for user in document["users"]}
    for user in document["users"]:
        user["name"] = renamed[user["name"]]
    for permission in document["permissions"]:
        permission["user"] = renamed[permission["user"]]
    passwords = {name: secrets.token_urlsafe(16) for name in renamed.values()}
    try:
        apply_topology(client, document, passwords=passwords, vhost=sandbox.vhost)

        assert diff_topology(client, document, sandbox.vhost, passwords=passwords) == []
    finally:
        for name in renamed.values():
            client.delete_user(name)


def test_a_group_taken_off_a_route_gets_no_more_of_its_messages_after_apply(
    client: ManagementClient, sandbox: Sandbox
) -> None:
    shipped = tomllib.loads(resources.files("fabric").joinpath("routing_table.toml").read_text())
    narrowed = copy.deepcopy(shipped)
    (donations,) = [r for r in narrowed["routes"] if r["name"] == "donations"]
    donations["groups"] = ["business"]  # community no longer receives donations

    def apply(table: dict[str, Any]) -> ApplyReport:
        document = topology.definitions(parse_routing_table(table), vhost=sandbox.vhost)
        document["users"], document["permissions"] = [], []  # broker-wide: not on a shared broker
        return apply_topology(client, document, passwords={}, vhost=sandbox.vhost)

    apply(shipped)
    report = apply(narrowed)
    client.put_permissions(sandbox.vhost, "guest", configure=".*", write=".*", read=".*")
    connection = _connect(sandbox.vhost, "guest", "guest")
    channel = connection.channel()
    channel.confirm_delivery()
    headers = {topology.AUDIENCE_HEADER: topology.ALL_AUDIENCE}
    channel.basic_publish(
        topology.INGRESS_EXCHANGE,
        "donation.received",
        b"{}",
        pika.BasicProperties(delivery_mode=2, headers=headers),
        mandatory=True,
    )
    counts = {
        name: channel.queue_declare(name, passive=True).method.message_count
        for name in ("fabric.business", "fabric.community")
    }
    connection.close()

    assert [c.kind for c in report.applied] == [ChangeKind.DELETE]
    assert counts == {"fabric.business": 1, "fabric.community": 0}


def test_client_encodes_the_default_vhost_and_reads_the_version(client: ManagementClient) -> None:
    default = client.get_vhost("/")

    assert default is not None
    assert default["name"] == "/"
    assert client.server_version().split(".")[0] in {"3", "4"}


def test_a_refused_redeclaration_carries_status_and_the_api_reason(
    client: ManagementClient, sandbox: Sandbox
) -> None:
    _apply(client, sandbox)

    with pytest.raises(ManagementRequestRejected) as rejected:
        client.put_queue(
            sandbox.vhost,
            WORK,
            durable=True,
            auto_delete=False,
            arguments={"x-queue-type": "quorum", "x-delivery-limit": 99},
        )

    assert rejected.value.status == 400
    assert "inequivalent arg" in rejected.value.reason


def test_wrong_credentials_are_rejected_without_echoing_the_password() -> None:
    password = f"wrong-{uuid.uuid4().hex}"
    client = ManagementClient(MANAGEMENT, "guest", password, timeout=10)

    with pytest.raises(ManagementRequestRejected) as rejected:
        client.get_vhost("/")

    assert rejected.value.status == 401
    assert password not in str(rejected.value)
    assert password not in repr(client)


def test_an_unreachable_api_raises_unavailable() -> None:
    client = ManagementClient("http://127.0.0.1:1", "guest", "guest", timeout=3)

    with pytest.raises(ManagementUnavailable, match="cannot reach the management API"):
        client.overview()


@pytest.fixture
def stub_api() -> Iterator[Callable[[int, dict[str, Any], dict[str, str]], str]]:
    """A loopback HTTP server answering every request with one status, body and headers."""
    servers: list[http.server.HTTPServer] = []

    def serve(status: int, body: dict[str, Any], headers: dict[str, str]) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(payload))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args: Any) -> None:
                return

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_server_error_raises_unavailable(stub_api: Callable[..., str]) -> None:
    client = ManagementClient(stub_api(503, {"error": "busy"}, {}), "admin", "pw", timeout=3)

    with pytest.raises(ManagementUnavailable, match="HTTP 503"):
        client.overview()


@pytest.mark.parametrize("status", [502, 503, 429])
def test_a_transient_refusal_is_retried_and_the_call_succeeds(status: int) -> None:
    # A broker node restarting behind the load balancer, or throttling: one such answer must
    # not fail a deploy's whole topology apply.
    answers = [status, 200]
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.path)
            self.send_response(answers.pop(0) if len(answers) > 1 else answers[0])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            return

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ManagementClient(f"http://127.0.0.1:{server.server_port}", "admin", "pw")
        client.put_vhost("fabric")
    finally:
        server.shutdown()
        server.server_close()

    assert seen == ["/api/vhosts/fabric", "/api/vhosts/fabric"]


def test_a_redirect_is_not_followed_with_the_credentials(stub_api: Callable[..., str]) -> None:
    elsewhere = stub_api(200, {"rabbitmq_version": "9.9.9"}, {})
    client = ManagementClient(
        stub_api(302, {}, {"Location": f"{elsewhere}/api/overview"}), "admin", "pw", timeout=3
    )

    with pytest.raises(ManagementApiError, match="unexpected HTTP 302"):
        client.overview()


def test_a_reason_echoing_the_password_is_redacted(stub_api: Callable[..., str]) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    reason = f"bad credentials {password}"
    client = ManagementClient(
        stub_api(400, {"error": "bad_request", "reason": reason}, {}), "admin", password
    )

    with pytest.raises(ManagementRequestRejected) as rejected:
        client.overview()

    assert rejected.value.reason == "bad credentials ***"
    assert password not in str(rejected.value)
