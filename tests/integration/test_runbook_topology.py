"""The runbook's ``topology diff`` and ``topology apply`` on the real local RabbitMQ: run here
(``--management-url``) and through the topology function's code behind a fake Lambda invoke."""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import time
import traceback
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pika
import pytest
from moto import mock_aws

from fabric import topology_resource
from fabric.adapters import management as management_client
from fabric.topology import AUDIT_QUEUE, PLATFORM_USER, UNROUTED_QUEUE
from scripts import runbook
from tests.conftest import load_handler
from tests.integration.conftest import AMQP, MANAGEMENT, management

pytestmark = pytest.mark.integration

REGION = "ap-southeast-3"


def quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


@pytest.fixture
def users(vhost: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The topology's broker users renamed for this test (the real ones are broker-wide on this
    shared broker), with their passwords; deleted afterwards."""
    generate = topology_resource.topology_document
    prefix = f"{vhost}-"

    def renamed(for_vhost: str) -> dict[str, Any]:
        document = generate(for_vhost)
        for user in document["users"]:
            user["name"] = prefix + user["name"]
        for permission in document["permissions"]:
            permission["user"] = prefix + permission["user"]
        return document

    monkeypatch.setattr(topology_resource, "topology_document", renamed)
    passwords = {
        prefix + user["name"]: secrets.token_urlsafe(16) for user in generate("/")["users"]
    }
    yield passwords
    for name in passwords:
        with contextlib.suppress(OSError):  # 404: never created
            management("DELETE", f"users/{quoted(name)}")


def here(
    action: str, vhost: str, *options: str, passwords_file: Path | None = None
) -> tuple[int, str]:
    """``runbook.py topology <action> --management-url ... --vhost <vhost>`` as guest."""
    environ = {"FABRIC_MANAGEMENT_USER": "guest", "FABRIC_MANAGEMENT_PASSWORD": "guest"}
    if passwords_file is not None:
        environ["FABRIC_USER_PASSWORDS_FILE"] = str(passwords_file)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in environ.items():
            patch.setenv(key, value)
        out = io.StringIO()
        argv = ["topology", action, "--management-url", MANAGEMENT, "--vhost", vhost, *options]
        status = runbook.main(argv, out=out)
    return status, out.getvalue()


def queues(vhost: str) -> dict[str, dict[str, Any]]:
    return {q["name"]: q for q in management("GET", f"queues/{quoted(vhost)}")}


def change_by_hand(vhost: str, name: str) -> None:
    """Delete a queue and declare it again as a classic queue: what an old version or a console
    click leaves behind."""
    management("DELETE", f"queues/{quoted(vhost)}/{quoted(name)}")
    management("PUT", f"queues/{quoted(vhost)}/{quoted(name)}", {"durable": True})


def sampled_empty(vhost: str, name: str) -> None:
    """Wait for the statistics to show the queue empty (apply never recreates an unsampled one)."""
    deadline = time.monotonic() + 30
    while queues(vhost)[name].get("messages") != 0:
        assert time.monotonic() < deadline, f"{name} never sampled"
        time.sleep(0.5)


def logs_in(vhost: str, user: str, password: str) -> bool:
    try:
        connection = pika.BlockingConnection(
            pika.ConnectionParameters(
                *AMQP, virtual_host=vhost, credentials=pika.PlainCredentials(user, password)
            )
        )
    except pika.exceptions.AMQPConnectionError:
        return False
    connection.close()
    return True


def test_diff_and_apply_run_here_against_a_broker_this_machine_reaches(
    vhost: str, users: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing publishes here: the recreation's statistics wait need not be the broker's 15 s.
    monkeypatch.setattr(management_client, "STATISTICS_INTERVAL_S", 0.2)
    passwords_file = tmp_path / "passwords.json"
    passwords_file.write_text(json.dumps(users))
    platform = f"{vhost}-{PLATFORM_USER}"

    status, output = here("diff", vhost)
    assert status == 1
    assert f"missing            queue {AUDIT_QUEUE!r}" in output
    assert f"missing            user {platform!r}" in output
    assert "users compared by tags only" in output
    assert queues(vhost) == {}, "a diff changes nothing"

    status, output = here("apply", vhost, passwords_file=passwords_file)
    assert status == 0, output
    assert f"create             queue {AUDIT_QUEUE!r}" in output
    assert "summary: vhost" in output
    assert AUDIT_QUEUE in queues(vhost)
    assert logs_in(vhost, platform, users[platform])
    assert users[platform] not in output

    status, output = here("diff", vhost, passwords_file=passwords_file)
    assert status == 0, output
    assert "in sync: apply would change nothing" in output

    change_by_hand(vhost, UNROUTED_QUEUE)
    status, output = here("diff", vhost)
    assert status == 1, output
    (line,) = [line for line in output.splitlines() if "needs recreating   queue" in line]
    assert line.startswith(f"  needs recreating   queue {UNROUTED_QUEUE!r}: ")
    assert line.endswith("x-queue-type 'classic' -> 'quorum'")
    assert "--recreate-empty" in output

    status, output = here("apply", vhost, passwords_file=passwords_file)
    assert status == 1
    assert "NOT APPLIED: " in output
    assert queues(vhost)[UNROUTED_QUEUE]["arguments"].get("x-queue-type") != "quorum"

    sampled_empty(vhost, UNROUTED_QUEUE)
    status, output = here("apply", vhost, "--recreate-empty", passwords_file=passwords_file)
    assert status == 0, output
    assert f"needs_recreate     queue {UNROUTED_QUEUE!r}" in output
    assert queues(vhost)[UNROUTED_QUEUE]["arguments"]["x-queue-type"] == "quorum"
    assert here("diff", vhost)[0] == 0


def test_apply_here_without_the_users_passwords_is_refused_and_changes_nothing(
    vhost: str, users: dict[str, str]
) -> None:
    status, output = here("apply", vhost)

    assert status == 2
    (refusal,) = [line for line in output.splitlines() if line.startswith("refused: ")]
    assert "give their passwords in the JSON file named by FABRIC_USER_PASSWORDS_FILE" in refusal
    assert queues(vhost) == {}
    for name in users:
        with pytest.raises(OSError, match="404"):
            management("GET", f"users/{quoted(name)}")


# --- through the deployed function's code ----------------------------------------------------


class TopologyFunction:
    """Stands in for Lambda's invoke (moto cannot run functions without Docker): runs the
    topology function's handler in-process, and answers an exception as Lambda does."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.events: list[tuple[str, Any]] = []

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
        assert InvocationType == "RequestResponse"
        event = json.loads(Payload)
        self.events.append((FunctionName, event))
        answer: dict[str, Any] = {}
        try:
            body = self.handler.handler(event, _Context())
        except Exception as exc:  # Lambda answers any exception this way
            body = {
                "errorType": type(exc).__name__,
                "errorMessage": str(exc),
                "stackTrace": traceback.format_exception(exc),
            }
            answer["FunctionError"] = "Unhandled"
        answer["Payload"] = io.BytesIO(json.dumps(body).encode())
        return answer


class _Context:
    log_stream_name = "2026/01/01/[$LATEST]test"

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 300_000


@pytest.fixture
def function(
    vhost: str, users: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[TopologyFunction]:
    """The topology function with the stack's variables: the admin's and the users' secrets in
    moto, the local broker's management API, the test's vhost."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        manager = boto3.client("secretsmanager", region_name=REGION)

        def secret(name: str, user: str, password: str) -> str:
            value = json.dumps({"username": user, "password": password})
            return str(manager.create_secret(Name=name, SecretString=value)["ARN"])

        for name, value in {
            "FABRIC_ENV": "test",
            "MANAGEMENT_URL": MANAGEMENT,
            "RABBITMQ_VHOST": vhost,
            "ADMIN_SECRET_ARN": secret("admin", "guest", "guest"),
            "USER_SECRET_ARNS": json.dumps(
                {user: secret(user, user, password) for user, password in users.items()}
            ),
        }.items():
            monkeypatch.setenv(name, value)
        # Nothing publishes here: the recreation's statistics wait need not be the broker's 15 s.
        monkeypatch.setattr(management_client, "STATISTICS_INTERVAL_S", 0.2)
        yield TopologyFunction(load_handler("topology", monkeypatch))


def remote(function: TopologyFunction, request: dict[str, Any]) -> tuple[int, str]:
    out = io.StringIO()
    status = runbook.topology(
        "test", client={"lambda": function}.__getitem__, request=request, out=out
    )
    return status, out.getvalue()


def test_the_runbook_diffs_and_applies_through_the_topology_function(
    function: TopologyFunction,
    vhost: str,
    users: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG", logger="fabric")
    platform = f"{vhost}-{PLATFORM_USER}"

    status, output = remote(function, {"action": "diff"})
    assert status == 1
    assert function.events == [("fabric-test-topology", {"action": "diff"})]
    assert f"missing            queue {AUDIT_QUEUE!r}" in output
    assert queues(vhost) == {}

    status, output = remote(function, {"action": "apply"})
    assert status == 0, output
    assert logs_in(vhost, platform, users[platform]), "the password of the user's secret"

    status, output = remote(function, {"action": "diff"})
    assert status == 0, output
    assert "in sync" in output

    change_by_hand(vhost, UNROUTED_QUEUE)
    sampled_empty(vhost, UNROUTED_QUEUE)
    status, output = remote(function, {"action": "apply"})
    assert status == 1
    assert f"needs recreating   queue {UNROUTED_QUEUE!r}" in output
    status, output = remote(function, {"action": "apply", "recreate_empty": True})
    assert status == 0, output
    assert queues(vhost)[UNROUTED_QUEUE]["arguments"]["x-queue-type"] == "quorum"

    for text in (output, caplog.text):
        assert not [p for p in users.values() if p in text], "no secret in answers or our logs"
    assert "topology: create queue" in caplog.text


def test_the_function_refuses_a_malformed_request_and_changes_nothing(
    function: TopologyFunction, vhost: str
) -> None:
    status, output = remote(function, {"action": "apply", "recreate_empty": "please"})

    assert status == 2
    assert "refused: 'recreate_empty' must be true or false" in output
    assert queues(vhost) == {}


def test_a_function_that_fails_exits_1_with_its_error(
    function: TopologyFunction, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MANAGEMENT_URL", "http://127.0.0.1:9")  # nothing listens there

    status, output = remote(function, {"action": "diff"})

    assert status == 1
    assert "the topology function failed" in output
    assert "ManagementUnavailable" in output
