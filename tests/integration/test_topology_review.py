"""Topology review: what an apply that stopped half-way, or ran out of time, leaves behind.

On the real local RabbitMQ and moto's Secrets Manager.
"""

from __future__ import annotations

import copy
import http.server
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import boto3
import pika
import pika.exceptions
import pytest

from fabric import custom_resource
from fabric.adapters.management import ManagementClient
from fabric.errors import ManagementUnavailable
from fabric.routing import default_routing_table
from fabric.topology import definitions
from fabric.topology_apply import apply_topology
from tests.conftest import load_handler
from tests.integration import test_management_api as api
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import GUEST, MANAGEMENT
from tests.integration.test_management_api import (
    WORK,
    Sandbox,
    _apply,
    _connect,
    _publish,
    _take_as_guest,
)

pytestmark = pytest.mark.integration

client, sandbox = api.client, api.sandbox  # the real broker's fixtures


class CloseFails:
    """The real client, whose connection closes fail: a run stopped between a permission change
    and the close that goes with it (the API timed out, the function ran out of time)."""

    def __init__(self, client: ManagementClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def close_connection(self, name: str, *, reason: str) -> bool:
        raise ManagementUnavailable("timed out", method="DELETE", path=f"/api/connections/{name}")


def _wait_until_consuming(client: ManagementClient, vhost: str, user: str, connection: Any) -> None:
    deadline = time.monotonic() + 30
    # channel_details is an empty list, not an object, while the broker has no details yet.
    while user not in {
        (c.get("channel_details") or {}).get("user") for c in client.list_consumers(vhost)
    }:
        if time.monotonic() > deadline:
            pytest.fail(f"the management API never listed the consumer of {user}")
        connection.process_data_events(time_limit=0.25)


@pytest.mark.parametrize("change", ["removed", "narrowed"])
def test_a_consumer_whose_permission_changed_in_a_run_that_stopped_is_disconnected_by_the_next(
    client: ManagementClient, sandbox: Sandbox, change: str
) -> None:
    _apply(client, sandbox)
    connection = _connect(sandbox.vhost, sandbox.consumer, sandbox.passwords[sandbox.consumer])
    received: list[bytes] = []
    connection.channel().basic_consume(
        WORK, lambda _ch, _method, _props, body: received.append(body), auto_ack=True
    )
    _wait_until_consuming(client, sandbox.vhost, sandbox.consumer, connection)
    document = copy.deepcopy(sandbox.document)
    if change == "removed":  # the group left the routing table
        document["users"] = [u for u in document["users"] if u["name"] != sandbox.consumer]
        document["permissions"] = [
            p for p in document["permissions"] if p["user"] != sandbox.consumer
        ]
    else:  # the user may read its dead letters only
        document["permissions"][0]["read"] = r"^fabric\.work\.dlq$"
    passwords = {user["name"]: sandbox.passwords[user["name"]] for user in document["users"]}
    with pytest.raises(ManagementUnavailable):
        apply_topology(CloseFails(client), document, passwords=passwords, vhost=sandbox.vhost)

    report = apply_topology(client, document, passwords=passwords, vhost=sandbox.vhost)

    assert report.applied == ()  # the permission changed in the first run
    _publish(sandbox, "case.opened", b"after")
    try:
        connection.process_data_events(time_limit=3)
    except pika.exceptions.AMQPError:
        pass  # closed by the broker: the point
    finally:
        if connection.is_open:
            connection.close()
    assert received == []
    assert _take_as_guest(client, sandbox.vhost, WORK) == b"after"


# --- the topology custom resource's time limit -----------------------------------------------

SLOW_CALL_S = 0.3


@pytest.fixture
def slow_management() -> Iterator[str]:
    """The real management API behind a proxy that makes each call take ``SLOW_CALL_S`` longer
    (a broker under load). It refuses to change users, which are broker-wide on this shared
    broker: a run that gets that far fails there."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _forward(self) -> None:
            time.sleep(SLOW_CALL_S)
            if self.command != "GET" and self.path.startswith("/api/users/"):
                self._answer(403, b'{"error": "not on a shared broker"}')
                return
            length = int(self.headers.get("Content-Length") or 0)
            request = urllib.request.Request(  # noqa: S310 (loopback only)
                MANAGEMENT + self.path,
                data=self.rfile.read(length) if length else None,
                method=self.command,
                headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                    self._answer(response.status, response.read())
            except urllib.error.HTTPError as exc:
                self._answer(exc.code, exc.read())

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_DELETE = _forward

        def log_message(self, *_args: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_the_topology_function_answers_cloudformation_before_its_own_timeout(
    aws: dict[str, Any], vhost: str, slow_management: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A first Create on a slow broker: some 250 calls of 0.3 s each take longer than the time
    # the function has left. Killed at its timeout it would answer nothing, and the deploy would
    # wait for the resource's ServiceTimeout (15 minutes) and fail without a reason.
    secrets = boto3.client("secretsmanager", region_name=REGION)

    def secret(name: str, password: str) -> str:
        value = json.dumps({"username": name, "password": password})
        return str(secrets.create_secret(Name=f"review/{name}", SecretString=value)["ARN"])

    users = [user["name"] for user in definitions(default_routing_table())["users"]]
    monkeypatch.setenv("MANAGEMENT_URL", slow_management)
    monkeypatch.setenv("ADMIN_SECRET_ARN", secret(GUEST[0], GUEST[1]))
    monkeypatch.setenv(
        "USER_SECRET_ARNS",
        json.dumps({name: secret(name, f"pw-{name}-0123456789") for name in users}),
    )
    monkeypatch.setenv("FABRIC_ENV", "review")
    monkeypatch.setenv("RABBITMQ_VHOST", vhost)
    sent: list[bytes] = []
    monkeypatch.setattr(custom_resource, "_put", lambda _url, body: sent.append(body))
    left_s = custom_resource.ANSWER_MARGIN_S + 4
    context = SimpleNamespace(
        log_stream_name="stream-1", get_remaining_time_in_millis=lambda: int(left_s * 1000)
    )
    event = {
        "RequestType": "Create",
        "ResponseURL": "https://cloudformation-response.example/presigned",
        "StackId": "stack",
        "RequestId": "req-1",
        "LogicalResourceId": "Topology",
    }
    handler = load_handler("topology", monkeypatch).handler

    started = time.monotonic()
    document = handler(event, context)
    took = time.monotonic() - started

    assert took < left_s - custom_resource.ANSWER_MARGIN_S + 2 * SLOW_CALL_S + 1
    assert [json.loads(body) for body in sent] == [document]
    assert document["Status"] == "FAILED"
    assert "deadline" in document["Reason"]
