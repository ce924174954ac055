"""Integration fixtures: the real local RabbitMQ (AMQP + management API), checked up front."""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from moto import mock_aws

from fabric.adapters.management import ManagementClient
from fabric.routing import default_routing_table
from fabric.topology import definitions
from fabric.topology_apply import apply_topology
from fabric.topology_resource import owner_parameter
from tests.integration.aws_fallback import REGION, create_fallback_path

AMQP = ("127.0.0.1", 5672)
MANAGEMENT = "http://127.0.0.1:15672"
GUEST = ("guest", "guest")


def management(method: str, path: str, body: Any = None) -> Any:
    """Call the local management API as guest; returns decoded JSON (or None)."""
    request = urllib.request.Request(  # noqa: S310 (loopback only)
        f"{MANAGEMENT}/api/{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "content-type": "application/json",
            "authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        data = response.read()
    return json.loads(data) if data else None


@pytest.fixture(scope="session", autouse=True)
def rabbitmq_reachable() -> None:
    """Fail (never skip) with a clear message when the local broker is not there."""
    try:
        socket.create_connection(AMQP, timeout=3).close()
        management("GET", "overview")
    except (OSError, urllib.error.URLError) as exc:
        pytest.fail(
            f"the local RabbitMQ is not reachable ({exc}); run `bash scripts/ensure_rabbitmq.sh`",
            pytrace=False,
        )


@pytest.fixture
def vhost() -> Iterator[str]:
    """A fresh vhost for one test, deleted afterwards with the broker-wide record of its topology's
    owners (a topology function's Create leaves one): tests never touch the shared '/'."""
    name = f"fabric-test-{uuid.uuid4().hex[:12]}"
    management("PUT", f"vhosts/{urllib.parse.quote(name, safe='')}")
    management(
        "PUT",
        f"permissions/{urllib.parse.quote(name, safe='')}/guest",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    yield name
    management("DELETE", f"vhosts/{urllib.parse.quote(name, safe='')}")
    ManagementClient(MANAGEMENT, *GUEST).delete_global_parameter(owner_parameter(name))


@pytest.fixture
def channel(vhost: str) -> Iterator[Any]:
    """A blocking channel (guest) in the test's vhost, for declaring and inspecting. A broker
    that blocks publishers (memory or disk alarm) fails the test after 30 s, not never."""
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            *AMQP,
            virtual_host=vhost,
            credentials=pika.PlainCredentials(*GUEST),
            blocked_connection_timeout=30,
        )
    )
    yield connection.channel()
    connection.close()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """moto with the fallback path of the stateful stack: 2 topics, a filtered queue per group."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield create_fallback_path("fabric-test")


@pytest.fixture
def broker_vhost(vhost: str) -> str:
    """The generated topology in the test's vhost, without its (broker-wide) users."""
    document = definitions(default_routing_table(), vhost=vhost)
    document["users"], document["permissions"] = [], []
    apply_topology(
        ManagementClient(MANAGEMENT, "guest", "guest"), document, passwords={}, vhost=vhost
    )
    return vhost
