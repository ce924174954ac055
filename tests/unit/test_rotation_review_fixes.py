"""The rotation function rotates a secret only for the user the stack maps it to
(``USER_SECRET_ARNS``), never the user a secret's value names, and never a broker administrator:
whoever may write one user's secret must not get another user's new password from it.

moto's Secrets Manager holds the secrets; the broker is the management API's user calls in
memory (salted hashes as RabbitMQ makes them, so ``password_matches`` checks them for real).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.secretsmanager.models import secretsmanager_backends

from fabric.errors import ConfigError, RotationError
from fabric.rotation import STEPS, on_event
from fabric.topology_apply import JsonObject, password_matches

REGION = "ap-southeast-3"
ADMIN, MEDIA, OTHER = "fabric-admin", "fabric-media", "fabric-other"
ADMIN_PASSWORD = "admin-password-before"  # noqa: S105 (a test value)


class Broker:
    """The broker's users as the management API shows them, and every password it was given."""

    def __init__(self) -> None:
        self.users: dict[str, JsonObject] = {}
        self.puts: list[str] = []

    def add(self, name: str, password: str, tags: list[str]) -> None:
        salt = os.urandom(4)
        digest = hashlib.sha256(salt + password.encode()).digest()
        self.users[name] = {
            "name": name,
            "tags": tags,
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "password_hash": base64.b64encode(salt + digest).decode(),
        }

    def get_user(self, name: str) -> JsonObject | None:
        return self.users.get(name)

    def put_user(self, name: str, *, password: str, tags: list[str]) -> None:
        self.puts.append(name)
        self.add(name, password, tags)

    def holds(self, name: str, password: str) -> bool:
        return password_matches(self.users[name], password)


class Fabric:
    """The administrator's secret, two users' secrets and the broker; the function's settings
    map ``fabric-media`` (and only it) to its secret."""

    def __init__(self) -> None:
        self.client = boto3.client("secretsmanager", region_name=REGION)
        self.broker = Broker()
        self.broker.add(ADMIN, ADMIN_PASSWORD, ["administrator"])
        self.admin = self.secret(ADMIN, ADMIN_PASSWORD)
        self.media = self.user(MEDIA)
        self.other = self.user(OTHER)
        self.environ = {
            "MANAGEMENT_URL": "https://broker.example:443",
            "ADMIN_SECRET_ARN": self.admin,
            "USER_SECRET_ARNS": json.dumps({MEDIA: self.media}),
        }

    def secret(self, username: str, password: str) -> str:
        value = json.dumps({"username": username, "password": password})
        return str(self.client.create_secret(Name=username, SecretString=value)["ARN"])

    def user(self, name: str) -> str:
        self.broker.add(name, f"{name}-before", [])
        return self.secret(name, f"{name}-before")

    def value(self, arn: str, stage: str = "AWSCURRENT") -> dict[str, str]:
        response = self.client.get_secret_value(SecretId=arn, VersionStage=stage)
        return dict(json.loads(response["SecretString"]))

    def start_rotation(self, arn: str) -> str:
        """What Secrets Manager does before it calls the function (moto does it only inside
        RotateSecret, which runs the function in Docker): rotation on, a new version labelled
        AWSPENDING, no value yet."""
        secret = secretsmanager_backends[DEFAULT_ACCOUNT_ID][REGION].secrets[arn]
        secret.rotation_requested = secret.rotation_enabled = True
        token = str(uuid.uuid4())
        secret.remove_version_stages_from_old_versions(["AWSPENDING"])
        secret.versions[token] = {
            "createdate": int(time.time()),
            "version_id": token,
            "version_stages": ["AWSPENDING"],
        }
        return token

    def step(self, arn: str, token: str, step: str, environ: dict[str, str] | None = None) -> None:
        on_event(
            {"SecretId": arn, "ClientRequestToken": token, "Step": step},
            environ or self.environ,
            client_factory=lambda *_: self.broker,
            secrets_client=lambda: self.client,
        )


@pytest.fixture
def fabric(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fabric]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "moto",
        "AWS_SECRET_ACCESS_KEY": "moto",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield Fabric()


def refused(fabric: Fabric, arn: str, token: str, step: str, match: str) -> str:
    with pytest.raises(RotationError, match=match) as caught:
        fabric.step(arn, token, step)
    return str(caught.value)


def test_a_user_secret_rewritten_to_name_the_administrator_is_not_rotated(fabric: Fabric) -> None:
    # Someone with PutSecretValue and RotateSecret on fabric-media's secret only.
    planted = {"username": ADMIN, "password": "x"}
    fabric.client.put_secret_value(SecretId=fabric.media, SecretString=json.dumps(planted))
    token = fabric.start_rotation(fabric.media)

    messages = [refused(fabric, fabric.media, token, step, "names another user") for step in STEPS]

    assert fabric.broker.puts == []
    assert fabric.broker.holds(ADMIN, ADMIN_PASSWORD)
    assert fabric.value(fabric.media) == planted  # no new password was made, none to read
    versions = fabric.client.describe_secret(SecretId=fabric.media)["VersionIdsToStages"]
    assert versions[token] == ["AWSPENDING"]
    with pytest.raises(fabric.client.exceptions.ResourceNotFoundException):
        fabric.value(fabric.media, "AWSPENDING")
    # The messages name the secret's own user, nothing of the secret's value.
    for message in messages:
        assert MEDIA in message
        assert ADMIN not in message
        assert '"x"' not in message


def test_a_pending_version_that_names_another_user_is_not_set_on_the_broker(
    fabric: Fabric,
) -> None:
    token = fabric.start_rotation(fabric.media)
    fabric.client.put_secret_value(
        SecretId=fabric.media,
        ClientRequestToken=token,
        SecretString=json.dumps({"username": ADMIN, "password": "chosen-by-the-writer"}),
        VersionStages=["AWSPENDING"],
    )

    for step in ("setSecret", "testSecret", "finishSecret"):
        refused(fabric, fabric.media, token, step, "AWSPENDING version .* names another user")

    assert fabric.broker.puts == []
    assert fabric.broker.holds(ADMIN, ADMIN_PASSWORD)
    assert fabric.value(fabric.media)["username"] == MEDIA  # AWSCURRENT never moved


def test_a_secret_the_function_was_not_given_is_not_rotated(fabric: Fabric) -> None:
    token = fabric.start_rotation(fabric.other)

    message = refused(fabric, fabric.other, token, "createSecret", "USER_SECRET_ARNS")

    assert fabric.other in message
    with pytest.raises(fabric.client.exceptions.ResourceNotFoundException):
        fabric.value(fabric.other, "AWSPENDING")
    assert fabric.broker.holds(OTHER, f"{OTHER}-before")


def test_a_broker_administrator_is_not_rotated_even_where_the_settings_name_it(
    fabric: Fabric,
) -> None:
    # The backstop: a USER_SECRET_ARNS that names an administrator's secret (here a second
    # administrator the broker has, not the one the function logs in as).
    fabric.broker.add("ops", "ops-before", ["administrator", "management"])
    ops = fabric.secret("ops", "ops-before")
    environ = {**fabric.environ, "USER_SECRET_ARNS": json.dumps({MEDIA: fabric.media, "ops": ops})}
    token = fabric.start_rotation(ops)

    fabric.step(ops, token, "createSecret", environ)
    for step in ("setSecret", "testSecret", "finishSecret"):
        with pytest.raises(RotationError, match="tagged administrator"):
            fabric.step(ops, token, step, environ)

    assert fabric.broker.puts == []
    assert fabric.broker.holds("ops", "ops-before")
    assert fabric.value(ops)["password"] == "ops-before"  # noqa: S105 (a test value)


def test_the_secret_of_a_mapped_user_is_still_rotated(fabric: Fabric) -> None:
    fabric.broker.users[MEDIA]["tags"] = ["management"]
    token = fabric.start_rotation(fabric.media)

    for step in STEPS:
        fabric.step(fabric.media, token, step)

    new = fabric.value(fabric.media)
    assert new["username"] == MEDIA
    assert new["password"] != f"{MEDIA}-before"
    assert fabric.broker.holds(MEDIA, new["password"])
    assert fabric.broker.users[MEDIA]["tags"] == ["management"]
    assert fabric.broker.puts == [MEDIA]
    assert fabric.broker.holds(ADMIN, ADMIN_PASSWORD)


@pytest.mark.parametrize("setting", [None, "not json", '["fabric-media"]'])
def test_without_the_users_secrets_the_function_rotates_nothing(
    fabric: Fabric, setting: str | None
) -> None:
    environ: dict[str, Any] = {**fabric.environ, "USER_SECRET_ARNS": setting}
    if setting is None:
        del environ["USER_SECRET_ARNS"]
    token = fabric.start_rotation(fabric.media)

    with pytest.raises(ConfigError, match="USER_SECRET_ARNS"):
        fabric.step(fabric.media, token, "createSecret", environ)
    with pytest.raises(fabric.client.exceptions.ResourceNotFoundException):
        fabric.value(fabric.media, "AWSPENDING")
