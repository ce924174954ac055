"""A broker password rotated in Secrets Manager reaches warm processes at their next connection.

A broker user of the test's own, its secret in moto's Secrets Manager, read by the production
``SecretCredentials``: the router's transport, a DLQ reader and the consumer toolkit keep the
password they read until the broker refuses it, then read the secret again.
"""

from __future__ import annotations

import json
import secrets
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pika
import pika.exceptions
import pytest

from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
from fabric.adapters.secrets import SecretCredentials
from fabric.consumer import MessageProcessor
from fabric.ports import Failure, OutboundMessage
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import AMQP, management

pytestmark = pytest.mark.integration

EXCHANGE = "rotation"
QUEUE = "fabric.community"  # a name the consumer toolkit knows the group of


@dataclass
class RotatingUser:
    """A broker user with full rights on the test's vhost, and its secret."""

    name: str
    secret_arn: str
    vhost: str

    def credentials(self) -> SecretCredentials:
        return SecretCredentials(
            self.secret_arn, lambda: boto3.client("secretsmanager", region_name=REGION)
        )

    def settings(self) -> RabbitSettings:
        return RabbitSettings(
            host=AMQP[0],
            port=AMQP[1],
            credentials=self.credentials(),
            vhost=self.vhost,
            connection_name=f"fabric-rotation-{uuid.uuid4().hex[:8]}",
        )

    def rotate(self, password: str | None = None, *, broker: bool = True) -> None:
        """A new password in the secret, and on the broker unless ``broker`` is False."""
        password = password or secrets.token_urlsafe(24)
        boto3.client("secretsmanager", region_name=REGION).put_secret_value(
            SecretId=self.secret_arn,
            SecretString=json.dumps({"username": self.name, "password": password}),
        )
        if broker:
            self.change_on_broker(password)

    def change_on_broker(self, password: str) -> None:
        management("PUT", f"users/{self.name}", {"password": password, "tags": ""})


@pytest.fixture
def user(vhost: str, channel: Any, aws: dict[str, Any]) -> Iterator[RotatingUser]:
    name = f"fabric-rotation-{uuid.uuid4().hex[:8]}"
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
    channel.exchange_declare(EXCHANGE, "topic", durable=True)
    channel.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(QUEUE, EXCHANGE, "#")
    yield RotatingUser(name, arn, vhost)
    management("DELETE", f"users/{name}")


def messages(count: int) -> list[OutboundMessage]:
    return [
        OutboundMessage(str(uuid.uuid4()), "rotation.check", b"{}", frozenset())
        for _ in range(count)
    ]


def test_the_transport_reads_a_rotated_password_at_its_next_connection(
    user: RotatingUser, channel: Any
) -> None:
    publisher = RabbitMqTransport(user.settings(), exchange_for=lambda _m: EXCHANGE)
    assert all(outcome.stored for outcome in publisher.publish(messages(5)))

    user.rotate()
    publisher.close()  # the link drops, as after a broker restart or a frozen container
    outcomes = publisher.publish(messages(5))  # the cached password is refused first

    assert all(outcome.stored for outcome in outcomes)
    assert channel.queue_declare(QUEUE, passive=True).method.message_count == 10
    publisher.close()


def test_a_password_the_secret_does_not_have_yet_is_unavailable_then_picked_up(
    user: RotatingUser, channel: Any
) -> None:
    # The broker changed first: reading the secret again gives the old password, the call
    # gives up after its two connections (the router's fallback takes the messages), and the
    # next call after the secret changed publishes.
    publisher = RabbitMqTransport(user.settings(), exchange_for=lambda _m: EXCHANGE)
    assert all(outcome.stored for outcome in publisher.publish(messages(1)))
    user.change_on_broker("new-password")
    publisher.close()

    refused = publisher.publish(messages(3))
    user.rotate("new-password", broker=False)
    accepted = publisher.publish(messages(3))

    assert [outcome.failure for outcome in refused] == [Failure.UNAVAILABLE] * 3
    assert all(outcome.stored for outcome in accepted)
    assert channel.queue_declare(QUEUE, passive=True).method.message_count == 4
    publisher.close()


def test_a_consumer_refused_once_reads_the_rotated_password_on_its_next_run(
    user: RotatingUser, channel: Any
) -> None:
    settings = user.settings()
    consumer = RabbitMqConsumer(settings, QUEUE, MessageProcessor(lambda _d: None))
    settings.credentials()  # read before the rotation, as a warm process has
    user.rotate()
    channel.basic_publish(EXCHANGE, "rotation.check", b"{}", pika.BasicProperties(message_id="m1"))

    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        consumer.run(max_messages=1, idle_timeout_s=2)
    counts = consumer.run(max_messages=1, idle_timeout_s=5)

    assert counts == {"done": 1}
    assert channel.queue_declare(QUEUE, passive=True).method.message_count == 0
