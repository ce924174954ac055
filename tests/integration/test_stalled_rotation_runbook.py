"""A password rotation that stopped after setSecret, and the runbook's way to finish it
(docs/runbook.md, "A failed rotation"), against the real broker and moto's Secrets Manager.

The broker then holds the pending password: a client that reads only the secret's AWSCURRENT
version (as Lambda's Amazon MQ event sources do) is refused, the fabric's own SecretCredentials
fall back to AWSPENDING. `rotate-secret` makes Secrets Manager run the stopped rotation again with
the same pending version (moto cannot run the function, so its steps are called here as Secrets
Manager calls them).
"""

from __future__ import annotations

import json
import secrets
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pika
import pika.exceptions
import pytest

from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.adapters.secrets import SecretCredentials
from fabric.errors import ManagementApiError
from fabric.ports import OutboundMessage
from fabric.rotation import STEPS, on_event
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import AMQP, GUEST, MANAGEMENT, management
from tests.integration.test_credential_rotation import start_rotation

pytestmark = pytest.mark.integration

UNREACHABLE = "http://127.0.0.1:1"
EXCHANGE = "rotation"
QUEUE = "rotation.check"


@pytest.fixture
def user(vhost: str, channel: Any, aws: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """A broker user of the test's own on its vhost, and the ARN of its secret; a queue that
    keeps what it publishes."""
    channel.exchange_declare(EXCHANGE, "topic", durable=True)
    channel.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(QUEUE, EXCHANGE, "#")
    name = f"fabric-stalled-{uuid.uuid4().hex[:8]}"
    password = secrets.token_urlsafe(24)
    management("PUT", f"users/{name}", {"password": password, "tags": ""})
    management(
        "PUT",
        f"permissions/{urllib.parse.quote(vhost, safe='')}/{name}",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    arn = boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name=f"fabric-test/{name}",
        SecretString=json.dumps({"username": name, "password": password}),
    )["ARN"]
    yield name, arn
    management("DELETE", f"users/{name}")


@pytest.fixture
def admin_arn(aws: dict[str, Any]) -> str:
    return str(
        boto3.client("secretsmanager", region_name=REGION).create_secret(
            Name="fabric-test/admin",
            SecretString=json.dumps({"username": GUEST[0], "password": GUEST[1]}),
        )["ARN"]
    )


def secret(arn: str, stage: str) -> dict[str, str]:
    response = boto3.client("secretsmanager", region_name=REGION).get_secret_value(
        SecretId=arn, VersionStage=stage
    )
    return dict(json.loads(response["SecretString"]))


def current_only_client_logs_in(arn: str, vhost: str) -> bool:
    """What an Amazon MQ event source's poller does: log in with AWSCURRENT, nothing else."""
    current = secret(arn, "AWSCURRENT")
    try:
        pika.BlockingConnection(
            pika.ConnectionParameters(
                *AMQP,
                virtual_host=vhost,
                credentials=pika.PlainCredentials(current["username"], current["password"]),
            )
        ).close()
    except pika.exceptions.ProbableAuthenticationError:
        return False
    return True


def fabric_client_publishes(arn: str, vhost: str) -> bool:
    """The fabric's own transport, with the SecretCredentials every fabric function uses."""
    credentials = SecretCredentials(arn, lambda: boto3.client("secretsmanager", region_name=REGION))
    transport = RabbitMqTransport(
        RabbitSettings(AMQP[0], AMQP[1], credentials, vhost=vhost),
        exchange_for=lambda _m: EXCHANGE,
    )
    try:
        message = OutboundMessage(str(uuid.uuid4()), "rotation.check", b"{}", frozenset())
        return all(outcome.stored for outcome in transport.publish([message]))
    finally:
        transport.close()


def test_a_rotation_stopped_after_set_locks_out_current_only_clients_until_it_runs_again(
    user: tuple[str, str], admin_arn: str, vhost: str, channel: Any
) -> None:
    name, arn = user
    token = start_rotation(arn)
    environ = {
        "MANAGEMENT_URL": MANAGEMENT,
        "ADMIN_SECRET_ARN": admin_arn,
        "USER_SECRET_ARNS": json.dumps({name: arn}),
    }

    def run(step: str, settings: dict[str, str]) -> None:
        on_event({"SecretId": arn, "ClientRequestToken": token, "Step": step}, settings)

    run("createSecret", environ)
    run("setSecret", environ)
    pending = secret(arn, "AWSPENDING")["password"]
    with pytest.raises(ManagementApiError):  # the management API unreachable at testSecret
        run("testSecret", {**environ, "MANAGEMENT_URL": UNREACHABLE})

    # Stopped: the event sources' kind of client is locked out, the fabric's is not.
    assert not current_only_client_logs_in(arn, vhost)
    assert fabric_client_publishes(arn, vhost)

    # The runbook's rotate-secret: Secrets Manager runs the stopped rotation's steps again with
    # the same version, which keeps its password, and finishes it.
    for step in STEPS:
        run(step, environ)

    assert secret(arn, "AWSCURRENT")["password"] == pending
    assert current_only_client_logs_in(arn, vhost)
    assert fabric_client_publishes(arn, vhost)
    assert channel.queue_declare(QUEUE, passive=True).method.message_count == 2
