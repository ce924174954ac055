"""Broker passwords rotated by the rotation function, and reaching warm processes.

A broker user of the test's own, its secret in moto's Secrets Manager:
- the rotation function (``lambdas/rotation``) runs Secrets Manager's four steps against the
  real broker's management API;
- the production ``SecretCredentials`` of the router's transport, a DLQ reader and the consumer
  toolkit keep the password they read until the broker refuses it, then read the secret again,
  its pending version while a rotation is half done.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import boto3
import pika
import pika.exceptions
import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.secretsmanager.models import secretsmanager_backends

from fabric.adapters.rabbitmq import RabbitMqTransport, RabbitSettings
from fabric.adapters.rabbitmq_consumer import RabbitMqConsumer
from fabric.adapters.secrets import SecretCredentials
from fabric.consumer import MessageProcessor
from fabric.errors import RotationError
from fabric.ports import Failure, OutboundMessage
from fabric.rotation import EXCLUDED_PASSWORD_CHARACTERS, PASSWORD_LENGTH, STEPS
from tests.conftest import load_handler
from tests.integration.aws_fallback import REGION
from tests.integration.conftest import AMQP, GUEST, MANAGEMENT, management
from tests.integration.queue_waits import settled_empty

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

    def secret(self, stage: str = "AWSCURRENT") -> dict[str, str]:
        response = boto3.client("secretsmanager", region_name=REGION).get_secret_value(
            SecretId=self.secret_arn, VersionStage=stage
        )
        return dict(json.loads(response["SecretString"]))

    def can_log_in(self, password: str) -> bool:
        try:
            pika.BlockingConnection(
                pika.ConnectionParameters(
                    *AMQP,
                    virtual_host=self.vhost,
                    credentials=pika.PlainCredentials(self.name, password),
                )
            ).close()
        except pika.exceptions.ProbableAuthenticationError:
            return False
        return True


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


@pytest.fixture
def rotation(
    aws: dict[str, Any], user: RotatingUser, monkeypatch: pytest.MonkeyPatch
) -> ModuleType:
    """The rotation function's handler, authenticating to the real broker as its admin (guest),
    which may rotate the test's user (only the secrets USER_SECRET_ARNS names)."""
    admin_arn = boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name="fabric-test/admin",
        SecretString=json.dumps({"username": GUEST[0], "password": GUEST[1]}),
    )["ARN"]
    monkeypatch.setenv("MANAGEMENT_URL", MANAGEMENT)
    monkeypatch.setenv("ADMIN_SECRET_ARN", admin_arn)
    monkeypatch.setenv("USER_SECRET_ARNS", json.dumps({user.name: user.secret_arn}))
    return load_handler("rotation", monkeypatch)


def start_rotation(secret_arn: str) -> str:
    """What Secrets Manager does before it calls the rotation function: rotation on, and the new
    version's id labelled AWSPENDING, with no value yet. (moto does it only inside RotateSecret,
    which then runs the function in Docker, which this machine does not have.)"""
    secret = secretsmanager_backends[DEFAULT_ACCOUNT_ID][REGION].secrets[secret_arn]
    secret.rotation_requested = secret.rotation_enabled = True
    token = str(uuid.uuid4())
    secret.remove_version_stages_from_old_versions(["AWSPENDING"])
    secret.versions[token] = {
        "createdate": int(time.time()),
        "version_id": token,
        "version_stages": ["AWSPENDING"],
    }
    return token


def step(rotation: ModuleType, secret_arn: str, token: str, name: str) -> None:
    rotation.handler({"SecretId": secret_arn, "ClientRequestToken": token, "Step": name}, None)


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


def test_a_malformed_secret_makes_messages_unavailable_not_an_error(
    user: RotatingUser, channel: Any
) -> None:
    # A secret hand-edited into something that is not {"username", "password"}: the router's
    # transport must answer unavailable (its caller fails over to SNS), not raise out of the call.
    sm = boto3.client("secretsmanager", region_name=REGION)
    good = user.secret()
    sm.put_secret_value(SecretId=user.secret_arn, SecretString='{"user": "x", "password": "y"}')
    publisher = RabbitMqTransport(user.settings(), exchange_for=lambda _m: EXCHANGE)

    refused = publisher.publish(messages(3))
    sm.put_secret_value(SecretId=user.secret_arn, SecretString=json.dumps(good))
    accepted = publisher.publish(messages(2))

    assert [outcome.failure for outcome in refused] == [Failure.UNAVAILABLE] * 3
    assert all(outcome.stored for outcome in accepted)
    assert channel.queue_declare(QUEUE, passive=True).method.message_count == 2
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
    settled_empty(channel, QUEUE)


# --- the rotation function -------------------------------------------------------------------


def test_a_rotation_gives_the_user_a_new_password_on_the_broker_and_in_the_secret(
    user: RotatingUser, rotation: ModuleType
) -> None:
    old = user.secret()["password"]
    management("PUT", f"users/{user.name}", {"password": old, "tags": "monitoring"})
    token = start_rotation(user.secret_arn)

    for name in STEPS:
        step(rotation, user.secret_arn, token, name)

    new = user.secret()
    assert new["username"] == user.name
    assert new["password"] != old
    assert len(new["password"]) == PASSWORD_LENGTH
    assert not set(new["password"]) & set(EXCLUDED_PASSWORD_CHARACTERS)
    assert user.can_log_in(new["password"])
    assert not user.can_log_in(old)
    assert management("GET", f"users/{user.name}")["tags"] in (["monitoring"], "monitoring")


def test_every_step_run_twice_as_secrets_manager_retries_changes_nothing_more(
    user: RotatingUser, rotation: ModuleType
) -> None:
    token = start_rotation(user.secret_arn)

    step(rotation, user.secret_arn, token, "createSecret")
    pending = user.secret("AWSPENDING")["password"]
    for name in STEPS:
        step(rotation, user.secret_arn, token, name)
        step(rotation, user.secret_arn, token, name)

    assert user.secret()["password"] == pending
    assert user.can_log_in(pending)


def test_clients_connect_all_through_a_rotation(
    user: RotatingUser, rotation: ModuleType, channel: Any
) -> None:
    # After setSecret the broker has the new password and the secret's current version the old:
    # a fresh connection is refused once, then made with the pending version.
    publisher = RabbitMqTransport(user.settings(), exchange_for=lambda _m: EXCHANGE)
    token = start_rotation(user.secret_arn)
    stored = []
    for name in STEPS:
        step(rotation, user.secret_arn, token, name)
        publisher.close()  # each call after a step starts on a new connection
        stored += [outcome.stored for outcome in publisher.publish(messages(2))]

    assert stored == [True] * 8
    assert channel.queue_declare(QUEUE, passive=True).method.message_count == 8
    publisher.close()


def test_a_new_schedules_test_alone_checks_the_current_password(
    user: RotatingUser, rotation: ModuleType
) -> None:
    # With RotateImmediatelyOnUpdate false, Secrets Manager only runs testSecret on a pending
    # version that no createSecret filled: it must pass while broker and secret agree...
    token = start_rotation(user.secret_arn)
    step(rotation, user.secret_arn, token, "testSecret")
    # ... and fail when they do not.
    user.change_on_broker(secrets.token_urlsafe(24))
    with pytest.raises(RotationError, match="does not hold the current password"):
        step(rotation, user.secret_arn, token, "testSecret")


def test_a_password_changed_on_the_broker_after_set_fails_the_test_step_and_keeps_current(
    user: RotatingUser, rotation: ModuleType
) -> None:
    old = user.secret()["password"]
    token = start_rotation(user.secret_arn)
    step(rotation, user.secret_arn, token, "createSecret")
    step(rotation, user.secret_arn, token, "setSecret")
    user.change_on_broker(old)  # e.g. someone ran the runbook's manual procedure meanwhile

    with pytest.raises(RotationError, match="does not hold the pending password"):
        step(rotation, user.secret_arn, token, "testSecret")
    assert user.secret()["password"] == old
    assert user.can_log_in(old)


def test_a_password_reset_on_the_broker_after_test_fails_the_finish_step_and_keeps_current(
    user: RotatingUser, rotation: ModuleType
) -> None:
    # A deploy's topology resource read AWSCURRENT before the rotation began and set it on the
    # broker again after testSecret: moving AWSCURRENT now would leave every client with a
    # password the broker does not accept (and no pending version to fall back on).
    old = user.secret()["password"]
    token = start_rotation(user.secret_arn)
    for name in ("createSecret", "setSecret", "testSecret"):
        step(rotation, user.secret_arn, token, name)
    user.change_on_broker(old)

    with pytest.raises(RotationError, match="does not hold the pending password"):
        step(rotation, user.secret_arn, token, "finishSecret")
    assert user.secret()["password"] == old
    assert user.can_log_in(old)


def test_a_user_the_broker_does_not_have_is_not_created_by_a_rotation(
    user: RotatingUser, rotation: ModuleType
) -> None:
    management("DELETE", f"users/{user.name}")
    token = start_rotation(user.secret_arn)
    step(rotation, user.secret_arn, token, "createSecret")

    with pytest.raises(RotationError, match="has no user"):
        step(rotation, user.secret_arn, token, "setSecret")
    assert management_user(user.name) is None
    management("PUT", f"users/{user.name}", {"password": "x" * 20, "tags": ""})  # for teardown


def management_user(name: str) -> Any:
    try:
        return management("GET", f"users/{name}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def test_the_function_refuses_to_rotate_the_administrator_it_logs_in_as(
    rotation: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    admin_arn = os.environ["ADMIN_SECRET_ARN"]
    token = start_rotation(admin_arn)

    with pytest.raises(RotationError, match="administrator"):
        step(rotation, admin_arn, token, "createSecret")
    assert user_can_still_manage()


def user_can_still_manage() -> bool:
    return management("GET", "whoami")["name"] == GUEST[0]


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ("not an object", "JSON object"),
        ({"SecretId": "x", "ClientRequestToken": "t"}, "needs SecretId, ClientRequestToken"),
        ({"SecretId": "x", "ClientRequestToken": "t", "Step": "dropSecret"}, "unknown rotation"),
    ],
)
def test_an_event_that_is_not_a_rotation_request_is_refused(
    rotation: ModuleType, event: Any, reason: str
) -> None:
    with pytest.raises(RotationError, match=reason):
        rotation.handler(event, None)


def test_a_token_that_is_not_the_pending_version_is_refused(
    user: RotatingUser, rotation: ModuleType
) -> None:
    start_rotation(user.secret_arn)
    old = user.secret()["password"]

    with pytest.raises(RotationError, match="no stage to rotate"):
        step(rotation, user.secret_arn, str(uuid.uuid4()), "createSecret")
    assert user.secret()["password"] == old


def test_a_secret_without_rotation_enabled_is_refused(
    user: RotatingUser, rotation: ModuleType
) -> None:
    with pytest.raises(RotationError, match="not enabled"):
        step(rotation, user.secret_arn, str(uuid.uuid4()), "createSecret")
