"""The topology custom resource: applies, keeps messages on delete, always answers."""

from __future__ import annotations

import itertools
import json
from typing import Any, ClassVar

import pytest
from botocore.exceptions import ClientError

from fabric.adapters.memory_management import MemoryManagementClient
from fabric.custom_resource import respond
from fabric.errors import ConfigError, TransportUnavailable
from fabric.stakeholders import Stakeholder
from fabric.topology import AUDIT_QUEUE, INGRESS_EXCHANGE, PLATFORM_USER, queue_name, user_name
from fabric.topology_apply import password_matches
from fabric.topology_resource import (
    TopologyRequest,
    is_cloudformation_event,
    on_event,
    on_request,
    run_request,
    topology_document,
)
from tests.conftest import load_handler

# Every broker user the topology declares has a secret (the stack gives the function them all).
USERS = [str(user["name"]) for user in topology_document("/")["users"]]
ENVIRON = {
    "MANAGEMENT_URL": "https://b-1.mq.ap-southeast-3.amazonaws.com",
    "ADMIN_SECRET_ARN": "arn:admin",
    "USER_SECRET_ARNS": json.dumps({name: f"arn:{name}" for name in USERS}),
    "FABRIC_ENV": "dev",
}


class FakeSecrets:
    """Secrets Manager's GetSecretValue answers for the ARNs above; a rotation's pending
    password for the users in ``pending``."""

    pending: ClassVar[dict[str, str]] = {}

    def get_secret_value(self, SecretId: str, VersionStage: str) -> dict[str, str]:
        name = SecretId.removeprefix("arn:")
        if VersionStage == "AWSPENDING":
            if name not in self.pending:
                raise ClientError({"Error": {"Code": "ResourceNotFoundException"}}, "Get")
            password = self.pending[name]
        else:
            assert VersionStage == "AWSCURRENT"
            password = f"pw-{name}-0123456789"
        return {"SecretString": json.dumps({"username": name, "password": password})}


@pytest.fixture
def broker() -> MemoryManagementClient:
    return MemoryManagementClient(username="admin")


def cloudformation(
    request: str,
    physical_id: str | None = None,
    *,
    logical_id: str = "Topology",
    stack: str = "dev-Services",
) -> dict[str, Any]:
    """A CloudFormation request as the function gets it (no physical id with a Create)."""
    event: dict[str, Any] = {
        "RequestType": request,
        "ResponseURL": "https://cloudformation-response.example/presigned",
        "StackId": f"arn:aws:cloudformation:ap-southeast-3:111111111111:stack/{stack}/1",
        "LogicalResourceId": logical_id,
        "RequestId": f"req-{next(REQUESTS)}",
    }
    if physical_id is not None:
        event["PhysicalResourceId"] = physical_id
    return event


REQUESTS = itertools.count(1)


def run(
    request: str,
    broker: MemoryManagementClient,
    environ: dict[str, str] = ENVIRON,
    physical_id: str | None = "fabric-dev-topology",
) -> Any:
    return on_event(
        cloudformation(request, None if request == "Create" else physical_id),
        environ,
        client_factory=lambda *_: broker,
        secrets_client=FakeSecrets,
    )


def test_create_applies_the_whole_topology_with_every_users_password(
    broker: MemoryManagementClient,
) -> None:
    physical_id, data = run("Create", broker)
    assert physical_id.startswith("fabric-dev-topology-")
    assert int(data["Changes"]) > 50
    assert {q["name"] for q in broker.list_queues("/")} >= {
        AUDIT_QUEUE,
        queue_name(Stakeholder.GOVERNMENT, emergency=True),
    }
    assert INGRESS_EXCHANGE in {e["name"] for e in broker.list_exchanges("/")}
    for name in USERS:
        assert broker.get_user(name) is not None


def test_update_with_nothing_changed_changes_nothing(broker: MemoryManagementClient) -> None:
    created, _ = run("Create", broker)
    physical_id, data = run("Update", broker, physical_id=created)
    assert data["Changes"] == "0"
    assert physical_id == created


def test_delete_keeps_a_queue_that_still_holds_messages(broker: MemoryManagementClient) -> None:
    created, _ = run("Create", broker)
    broker.set_messages("/", queue_name(Stakeholder.GOVERNMENT), 3)
    _, data = run("Delete", broker, physical_id=created)
    assert int(data["Kept"]) > 0
    assert queue_name(Stakeholder.GOVERNMENT) in {q["name"] for q in broker.list_queues("/")}
    assert broker.get_user(user_name(Stakeholder.MEDIA)) is None


def test_secret_reads_stop_at_the_deadline_so_cloudformation_still_gets_an_answer(
    broker: MemoryManagementClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thirteen secret reads, each up to half a minute when Secrets Manager is slow, could
    # outlast the function: no read may start past the deadline.
    reads: list[str] = []
    read = FakeSecrets.get_secret_value

    def counted(self: FakeSecrets, SecretId: str, VersionStage: str) -> dict[str, str]:
        reads.append(SecretId)
        clock[0] += 100.0  # every read is slow
        return read(self, SecretId, VersionStage)

    clock = [0.0]
    monkeypatch.setattr(FakeSecrets, "get_secret_value", counted)
    monkeypatch.setattr("fabric.topology_resource.time.monotonic", lambda: clock[0])
    with pytest.raises(TransportUnavailable, match="deadline"):
        on_event(
            cloudformation("Create"),
            ENVIRON,
            client_factory=lambda *_: broker,
            secrets_client=FakeSecrets,
            deadline=250.0,
        )
    assert len(reads) == 3, "the admin's secret and the first user's two versions, no more"
    assert broker.get_vhost("/") is None, "nothing applied"


def test_a_missing_setting_is_a_config_error_naming_it(broker: MemoryManagementClient) -> None:
    with pytest.raises(ConfigError, match="MANAGEMENT_URL"):
        run("Create", broker, {k: v for k, v in ENVIRON.items() if k != "MANAGEMENT_URL"})


def test_cloudformation_always_gets_an_answer_even_when_the_action_fails() -> None:
    sent: list[tuple[str, bytes]] = []
    event = {
        "RequestType": "Create",
        "ResponseURL": "https://cloudformation-response.example/presigned",
        "StackId": "stack",
        "RequestId": "req",
        "LogicalResourceId": "Topology",
    }

    def explode(_request: str, _props: Any) -> tuple[str, dict[str, str]]:
        raise ConfigError("broker says no")

    document = respond(event, "stream-1", explode, send=lambda url, body: sent.append((url, body)))
    assert document["Status"] == "FAILED"
    assert "ConfigError: broker says no" in document["Reason"]
    ((url, body),) = sent
    assert url == event["ResponseURL"]
    assert json.loads(body)["RequestId"] == "req"
    ok = respond(
        event,
        "stream-1",
        lambda *_: ("fabric-dev-topology", {"Changes": "1"}),
        send=lambda *_: None,
    )
    assert ok["Status"] == "SUCCESS"
    assert ok["PhysicalResourceId"] == "fabric-dev-topology"


def test_the_rollback_of_a_failed_create_leaves_the_topology_already_on_the_broker(
    broker: MemoryManagementClient,
) -> None:
    # A healthy topology from an earlier resource (another stack, or before a replacement).
    run("Create", broker)
    before = {q["name"] for q in broker.list_queues("/")}
    event = {
        "RequestType": "Create",
        "ResponseURL": "https://cloudformation-response.example/presigned",
        "StackId": "stack",
        "RequestId": "req-7",
        "LogicalResourceId": "Topology",
    }

    def create_fails(_request: str, _props: Any) -> tuple[str, dict[str, str]]:
        raise ConfigError("a quorum queue's arguments differ")

    failed = respond(event, "stream-1", create_fails, send=lambda *_: None)
    assert failed["Status"] == "FAILED"
    assert failed["PhysicalResourceId"] == "Topology-create-failed-req-7"

    # CloudFormation's rollback deletes what the failed Create answered.
    rollback = respond(
        {**event, "RequestType": "Delete", "PhysicalResourceId": failed["PhysicalResourceId"]},
        "stream-1",
        lambda request, _props: run(request, broker, physical_id=failed["PhysicalResourceId"]),
        send=lambda *_: None,
    )

    assert rollback["Status"] == "SUCCESS"
    assert rollback["PhysicalResourceId"] == "Topology-create-failed-req-7"
    assert {q["name"] for q in broker.list_queues("/")} == before
    assert broker.get_user(PLATFORM_USER) is not None


def test_a_delete_without_a_physical_id_removes_nothing_and_answers_a_real_id(
    broker: MemoryManagementClient,
) -> None:
    # CloudFormation always sends the id with a Delete; a request without one names no resource
    # this function created, so the live topology stays, and the answer carries the logical id
    # (a physical id must be a non-empty string), not the text "None".
    run("Create", broker)
    before = {q["name"] for q in broker.list_queues("/")}
    event = {
        "RequestType": "Delete",
        "ResponseURL": "https://cloudformation-response.example/presigned",
        "StackId": "stack",
        "RequestId": "req-8",
        "LogicalResourceId": "Topology",
    }
    sent: list[bytes] = []

    answer = respond(
        event,
        "stream-1",
        lambda request, _props: run(request, broker, physical_id=event.get("PhysicalResourceId")),
        send=lambda _url, body: sent.append(body),
    )

    assert answer["Status"] == "SUCCESS"
    assert json.loads(sent[0])["PhysicalResourceId"] == "Topology"
    assert {q["name"] for q in broker.list_queues("/")} == before
    assert broker.get_user(PLATFORM_USER) is not None


def test_an_update_during_a_rotation_keeps_the_pending_password_the_broker_already_has(
    broker: MemoryManagementClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("Create", broker)
    media = user_name(Stakeholder.MEDIA)
    # The rotation's setSecret: the broker has the pending password; finishSecret is to come.
    rotated = "pw-rotated-9876543210"
    monkeypatch.setitem(FakeSecrets.pending, media, rotated)
    broker.put_user(media, password=rotated, tags=[])

    _, data = run("Update", broker)

    assert data["Changes"] == "0"
    assert password_matches(broker.get_user(media) or {}, rotated)


def test_a_pending_password_the_broker_does_not_have_is_not_applied(
    broker: MemoryManagementClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("Create", broker)
    media = user_name(Stakeholder.MEDIA)
    # A rotation that stopped before its setSecret: AWSPENDING exists, the broker never had it.
    monkeypatch.setitem(FakeSecrets.pending, media, "pw-abandoned-9876543210")

    _, data = run("Update", broker)

    assert data["Changes"] == "0"
    assert password_matches(broker.get_user(media) or {}, f"pw-{media}-0123456789")


# --- the runbook's requests (``topology diff`` / ``topology apply``) ----------------------------


def operate(event: Any, broker: MemoryManagementClient) -> dict[str, Any]:
    return on_request(event, ENVIRON, client_factory=lambda *_: broker, secrets_client=FakeSecrets)


@pytest.mark.parametrize(
    ("event", "why"),
    [
        ({"action": "destroy"}, "'action' must be 'diff' or 'apply'"),
        ({}, "'action' must be 'diff' or 'apply'"),
        ({"action": "apply", "recreate": True}, "unknown field(s) ['recreate']"),
        ({"action": "apply", "recreate_empty": "yes"}, "'recreate_empty' must be true or false"),
        ({"action": "diff", "recreate_empty": True}, "'recreate_empty' goes with 'apply' only"),
        # A CloudFormation request without its ResponseURL is no operator request either.
        ({"RequestType": "Create"}, "unknown field(s) ['RequestType']"),
        (["apply"], "a topology request is a JSON object"),
    ],
)
def test_a_malformed_operator_request_is_refused_and_changes_nothing(
    broker: MemoryManagementClient, event: Any, why: str
) -> None:
    answer = operate(event, broker)

    assert set(answer) == {"error"}
    assert why in answer["error"]
    assert broker.calls == []
    assert broker.get_vhost("/") is None


def test_only_a_request_with_request_type_and_response_url_is_cloudformations() -> None:
    cloudformation = {"RequestType": "Update", "ResponseURL": "https://x.example/", "StackId": "s"}
    assert is_cloudformation_event(cloudformation)
    assert not is_cloudformation_event({"action": "apply"})
    assert not is_cloudformation_event({"RequestType": "Create"})
    assert not is_cloudformation_event("apply")


def test_a_diff_of_an_empty_broker_lists_everything_missing_and_changes_nothing(
    broker: MemoryManagementClient,
) -> None:
    report = operate({"action": "diff"}, broker)

    assert report["action"] == "diff"
    assert report["vhost"] == "/"
    assert report["in_sync"] is False
    missing = {(item["resource"], item["name"]) for item in report["missing"]}
    assert ("vhost", "/") in missing
    assert ("queue", AUDIT_QUEUE) in missing
    assert ("exchange", INGRESS_EXCHANGE) in missing
    assert {("user", name) for name in USERS} <= missing
    assert report["changed"] == report["needs_recreate"] == report["obsolete"] == []
    assert report["extra"] == []
    assert broker.calls == []
    assert json.loads(json.dumps(report)) == report  # the function's answer is JSON


def test_an_apply_reports_what_it_did_and_a_diff_then_finds_the_broker_in_sync(
    broker: MemoryManagementClient,
) -> None:
    broker.put_vhost("/")
    broker.put_queue("/", "left.over", durable=True, auto_delete=False, arguments={})

    applied = operate({"action": "apply"}, broker)

    assert applied["complete"] is True
    assert applied["conflict"] is None
    kinds = {(item["kind"], item["resource"], item["name"]) for item in applied["applied"]}
    assert ("create", "queue", AUDIT_QUEUE) in kinds
    assert ("create", "user", PLATFORM_USER) in kinds
    assert applied["extra"] == [{"resource": "queue", "name": "left.over"}]
    for name in USERS:  # each user got its secret's password
        assert password_matches(broker.get_user(name) or {}, f"pw-{name}-0123456789")
    again = operate({"action": "diff"}, broker)
    assert again["in_sync"] is True
    assert again["missing"] == again["changed"] == again["needs_recreate"] == []
    assert again["extra"] == [{"resource": "queue", "name": "left.over"}]


def test_a_diff_shows_a_changed_password_without_showing_any_password(
    broker: MemoryManagementClient,
) -> None:
    operate({"action": "apply"}, broker)
    media = user_name(Stakeholder.MEDIA)
    by_hand = "set-by-hand-0123456789"
    broker.put_user(media, password=by_hand, tags=[])

    report = operate({"action": "diff"}, broker)

    assert report["changed"] == [
        {"resource": "user", "name": media, "differences": {"password": ["(hidden)", "(hidden)"]}}
    ]
    assert report["in_sync"] is False
    assert "0123456789" not in json.dumps(report)


def test_an_operator_apply_during_a_rotation_keeps_the_pending_password_the_broker_has(
    broker: MemoryManagementClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    operate({"action": "apply"}, broker)
    media = user_name(Stakeholder.MEDIA)
    rotated = "pw-rotated-9876543210"
    monkeypatch.setitem(FakeSecrets.pending, media, rotated)
    broker.put_user(media, password=rotated, tags=[])

    assert operate({"action": "diff"}, broker)["in_sync"] is True
    assert operate({"action": "apply"}, broker)["applied"] == []
    assert password_matches(broker.get_user(media) or {}, rotated)


def test_a_queue_that_cannot_change_in_place_is_reported_and_recreated_only_when_asked(
    broker: MemoryManagementClient,
) -> None:
    operate({"action": "apply"}, broker)
    broker.delete_queue("/", AUDIT_QUEUE)
    broker.put_queue("/", AUDIT_QUEUE, durable=True, auto_delete=False, arguments={})

    diff = operate({"action": "diff"}, broker)
    (item,) = diff["needs_recreate"]
    assert (item["resource"], item["name"]) == ("queue", AUDIT_QUEUE)
    assert item["differences"]["x-queue-type"] == ["classic", "quorum"]

    before = list(broker.calls)
    refused = operate({"action": "apply"}, broker)
    assert refused["complete"] is False
    assert AUDIT_QUEUE in refused["conflict"]
    assert [i["name"] for i in refused["needs_recreate"]] == [AUDIT_QUEUE]
    assert refused["applied"] == []
    assert broker.calls == before, "a refused apply changes nothing"

    recreated = operate({"action": "apply", "recreate_empty": True}, broker)
    assert recreated["complete"] is True
    assert ("needs_recreate", "queue", AUDIT_QUEUE) in {
        (i["kind"], i["resource"], i["name"]) for i in recreated["applied"]
    }
    assert operate({"action": "diff"}, broker)["in_sync"] is True


def test_recreate_empty_leaves_a_queue_that_holds_messages(broker: MemoryManagementClient) -> None:
    operate({"action": "apply"}, broker)
    broker.delete_queue("/", AUDIT_QUEUE)
    broker.put_queue("/", AUDIT_QUEUE, durable=True, auto_delete=False, arguments={})
    broker.set_messages("/", AUDIT_QUEUE, 4)

    report = operate({"action": "apply", "recreate_empty": True}, broker)

    assert report["complete"] is False
    assert "holds 4 messages" in report["conflict"]
    arguments = {q["name"]: q["arguments"] for q in broker.list_queues("/")}
    assert arguments[AUDIT_QUEUE] == {}, "kept as it was, with its messages"


def test_an_apply_without_passwords_is_refused(broker: MemoryManagementClient) -> None:
    with pytest.raises(ConfigError, match="password"):
        run_request(TopologyRequest("apply"), broker, "/", passwords=None)
    assert broker.calls == []


def test_the_functions_handler_answers_an_operator_request_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Context:
        log_stream_name = "stream-1"

        @staticmethod
        def get_remaining_time_in_millis() -> int:
            return 300_000

    handler = load_handler("topology", monkeypatch)

    answer = handler.handler({"action": "apply", "force": True}, Context())

    assert answer == {
        "error": "unknown field(s) ['force']: a topology request has 'action' and, for apply,"
        " 'recreate_empty'"
    }
