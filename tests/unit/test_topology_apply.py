"""apply/diff/delete of a topology against the in-memory management API: order, safety, reports."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fabric import topology
from fabric.adapters.memory_management import MemoryManagementClient
from fabric.errors import ConfigError, TopologyConflict
from fabric.routing import default_routing_table
from fabric.topology_apply import (
    ChangeKind,
    Kept,
    Resource,
    apply_topology,
    delete_topology,
    diff_topology,
)

VHOST = "fabric"
PASSWORDS = {"consumer": "s3cret-consumer", "publisher": "s3cret-publisher"}
WORK_ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-delivery-limit": 5,
    "x-dead-letter-exchange": "dlx",
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


def definitions() -> dict[str, Any]:
    """Ingress (topic, alternate exchange) → work queue; dead letters → dlq; unrouted → fanout."""
    return {
        "vhosts": [{"name": "/"}],
        "exchanges": [
            _exchange("ingress", "topic", {"alternate-exchange": "unrouted"}),
            _exchange("unrouted", "fanout"),
            _exchange("dlx", "direct"),
        ],
        "queues": [
            _queue("work", WORK_ARGUMENTS),
            _queue("work.dlq", {"x-queue-type": "quorum"}),
            _queue("unrouted", {"x-queue-type": "quorum"}),
        ],
        "bindings": [
            _binding("ingress", "work", "case.#"),
            _binding("dlx", "work.dlq", "work"),
            _binding("unrouted", "unrouted", ""),
        ],
        "users": [{"name": "consumer", "tags": []}, {"name": "publisher", "tags": []}],
        "permissions": [
            _permission("consumer", read=r"^work$"),
            _permission("publisher", write=r"^ingress$"),
        ],
    }


def _exchange(name: str, kind: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": "/",
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": arguments or {},
    }


def _queue(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": "/",
        "durable": True,
        "auto_delete": False,
        "arguments": dict(arguments),
    }


def _binding(source: str, queue: str, key: str) -> dict[str, Any]:
    return {
        "source": source,
        "vhost": "/",
        "destination": queue,
        "destination_type": "queue",
        "routing_key": key,
        "arguments": {},
    }


def _permission(user: str, *, read: str = "^$", write: str = "^$") -> dict[str, Any]:
    return {"user": user, "vhost": "/", "configure": "^$", "write": write, "read": read}


@pytest.fixture
def broker() -> MemoryManagementClient:
    return MemoryManagementClient(username="admin")


@pytest.fixture
def applied(broker: MemoryManagementClient) -> MemoryManagementClient:
    apply_topology(broker, definitions(), passwords=PASSWORDS, vhost=VHOST)
    broker.calls.clear()
    return broker


def test_apply_creates_everything_in_dependency_order(broker: MemoryManagementClient) -> None:
    report = apply_topology(broker, definitions(), passwords=PASSWORDS, vhost=VHOST)

    phases = [call.split()[0] for call in broker.calls]
    assert phases == [
        "put_vhost",
        *["put_exchange"] * 3,
        *["put_queue"] * 3,
        *["create_binding"] * 3,
        *["put_user"] * 2,
        *["put_permissions"] * 2,
    ]
    assert {change.kind for change in report.applied} == {ChangeKind.CREATE}
    assert len(report.applied) == 14
    assert report.extra == ()


def test_applying_again_changes_nothing_and_diff_is_empty(
    applied: MemoryManagementClient,
) -> None:
    report = apply_topology(applied, definitions(), passwords=PASSWORDS, vhost=VHOST)

    assert not report.changed
    assert applied.calls == []
    assert diff_topology(applied, definitions(), VHOST, passwords=PASSWORDS) == []


def test_diff_of_an_empty_broker_lists_what_apply_would_create(
    broker: MemoryManagementClient,
) -> None:
    changes = diff_topology(broker, definitions(), VHOST)

    assert [(c.resource, c.name) for c in changes][:4] == [
        (Resource.VHOST, VHOST),
        (Resource.EXCHANGE, "ingress"),
        (Resource.EXCHANGE, "unrouted"),
        (Resource.EXCHANGE, "dlx"),
    ]
    assert all(c.kind is ChangeKind.CREATE for c in changes)
    assert broker.calls == []  # diff is read-only


def test_objects_outside_the_definitions_are_reported_extra_and_left_alone(
    applied: MemoryManagementClient,
) -> None:
    applied.put_exchange(
        VHOST,
        "someone.else",
        exchange_type="fanout",
        durable=True,
        auto_delete=False,
        internal=False,
        arguments={},
    )
    applied.put_queue(VHOST, "stray", durable=True, auto_delete=False, arguments={})
    applied.create_binding(
        VHOST,
        source="someone.else",
        destination="stray",
        destination_type="queue",
        routing_key="",
        arguments={},
    )
    applied.put_user("intruder", password="x", tags=[])  # noqa: S106 (test value)
    applied.put_permissions(VHOST, "intruder", configure=".*", write=".*", read=".*")
    applied.calls.clear()

    report = apply_topology(applied, definitions(), passwords=PASSWORDS, vhost=VHOST)

    assert {(c.kind, c.resource, c.name) for c in report.extra} == {
        (ChangeKind.EXTRA, Resource.EXCHANGE, "someone.else"),
        (ChangeKind.EXTRA, Resource.QUEUE, "stray"),
        (ChangeKind.EXTRA, Resource.BINDING, "someone.else -> queue stray []"),
        (ChangeKind.EXTRA, Resource.PERMISSION, "intruder"),
    }
    assert not report.changed
    assert applied.calls == []
    assert {c.kind for c in diff_topology(applied, definitions(), VHOST)} == {ChangeKind.EXTRA}


def test_a_route_the_document_no_longer_has_is_unbound_after_the_new_one_is_bound(
    applied: MemoryManagementClient,
) -> None:
    # The routing table moved case.# from "work" to "work.dlq", and someone bound a queue of
    # their own to the fabric's ingress: neither may go on receiving the fabric's messages.
    applied.put_queue(VHOST, "tap", durable=True, auto_delete=False, arguments={})
    applied.create_binding(
        VHOST,
        source="ingress",
        destination="tap",
        destination_type="queue",
        routing_key="#",
        arguments={},
    )
    narrowed = definitions()
    narrowed["bindings"][0] = _binding("ingress", "work.dlq", "case.#")
    applied.calls.clear()

    report = apply_topology(applied, narrowed, passwords=PASSWORDS, vhost=VHOST)

    first, *then = [(c.kind, c.name) for c in report.applied]
    assert first == (ChangeKind.CREATE, "ingress -> queue work.dlq [case.#]")
    assert sorted(then) == [
        (ChangeKind.DELETE, "ingress -> queue tap [#]"),
        (ChangeKind.DELETE, "ingress -> queue work [case.#]"),
    ]
    from_ingress = {
        (b["destination"], b["routing_key"])
        for b in applied.list_bindings(VHOST)
        if b["source"] == "ingress"
    }
    assert from_ingress == {("work.dlq", "case.#")}
    # The queue itself may hold messages: reported, left alone.
    assert {(c.kind, c.name) for c in diff_topology(applied, narrowed, VHOST)} == {
        (ChangeKind.EXTRA, "tap")
    }


def test_a_removed_groups_user_loses_its_vhost_permissions_and_others_are_left_alone(
    applied: MemoryManagementClient,
) -> None:
    # The routing table dropped a group: its broker user must not go on reading what its
    # queues still hold. A user outside the fabric's naming, and the administrator, stay.
    for user in ("fabric-removed", "fabric-admin", "operator"):
        applied.put_user(user, password="x" * 12, tags=[])
        applied.put_permissions(VHOST, user, configure=".*", write=".*", read=".*")
    applied.calls.clear()

    report = apply_topology(applied, definitions(), passwords=PASSWORDS, vhost=VHOST)

    assert [(c.kind, c.resource, c.name) for c in report.applied] == [
        (ChangeKind.DELETE, Resource.PERMISSION, "fabric-removed")
    ]
    left = {item["user"] for item in applied.list_permissions(VHOST)}
    assert "fabric-removed" not in left
    assert {"fabric-admin", "operator"} <= left
    assert {(c.kind, c.name) for c in report.extra} >= {
        (ChangeKind.EXTRA, "fabric-admin"),
        (ChangeKind.EXTRA, "operator"),
    }


def test_a_user_whose_permissions_are_revoked_or_changed_is_disconnected_and_no_other(
    applied: MemoryManagementClient,
) -> None:
    # RabbitMQ does not take a running consumer away when its permissions go or narrow.
    applied.put_user("fabric-removed", password="x" * 12, tags=[])
    applied.put_permissions(VHOST, "fabric-removed", configure="^$", write="^$", read=".*")
    removed = applied.open_connection(VHOST, "fabric-removed")
    consumer = applied.open_connection(VHOST, "consumer")
    publisher = applied.open_connection(VHOST, "publisher")
    changed = definitions()
    changed["permissions"][0]["read"] = r"^work\.dlq$"
    applied.calls.clear()

    apply_topology(applied, changed, passwords=PASSWORDS, vhost=VHOST)

    assert applied.calls == [
        "put_permissions consumer",
        f"close_connection {consumer}",
        "delete_permissions fabric-removed",
        f"close_connection {removed}",
    ]
    assert applied.list_connections(VHOST) == [{"name": publisher, "user": "publisher"}]


def test_apply_disconnects_only_consumers_of_queues_their_user_may_no_longer_read(
    applied: MemoryManagementClient,
) -> None:
    # Permissions changed by an earlier run that stopped before closing the connections.
    applied.put_user("fabric-removed", password="x" * 12, tags=[])
    allowed = applied.open_connection(VHOST, "consumer")
    applied.consume(VHOST, allowed, "work")
    stray = applied.open_connection(VHOST, "consumer")
    applied.consume(VHOST, stray, "work.dlq")
    removed = applied.open_connection(VHOST, "fabric-removed")
    applied.consume(VHOST, removed, "work")
    outsider = applied.open_connection(VHOST, "operator")
    applied.consume(VHOST, outsider, "work")
    applied.calls.clear()

    report = apply_topology(applied, definitions(), passwords=PASSWORDS, vhost=VHOST)

    assert report.applied == ()
    assert sorted(applied.calls) == sorted(
        [f"close_connection {stray}", f"close_connection {removed}"]
    )
    assert {c["name"] for c in applied.list_connections(VHOST)} == {allowed, outsider}


def test_bindings_compare_as_sets_whatever_the_argument_order(
    applied: MemoryManagementClient,
) -> None:
    changed = definitions()
    changed["bindings"].reverse()
    changed["bindings"].append(copy.deepcopy(changed["bindings"][0]))  # a duplicate

    assert diff_topology(applied, changed, VHOST) == []


def test_a_changed_queue_argument_needs_recreate_and_apply_refuses_untouched(
    applied: MemoryManagementClient,
) -> None:
    changed = definitions()
    changed["queues"][0]["arguments"]["x-delivery-limit"] = 7

    (change,) = diff_topology(applied, changed, VHOST)
    assert (change.kind, change.resource, change.name) == (
        ChangeKind.NEEDS_RECREATE,
        Resource.QUEUE,
        "work",
    )
    assert change.differences == {"x-delivery-limit": (5, 7)}
    with pytest.raises(TopologyConflict, match=r"queue 'work': x-delivery-limit 5 -> 7"):
        apply_topology(applied, changed, passwords=PASSWORDS, vhost=VHOST)
    assert applied.calls == []


def test_recreate_empty_recreates_an_empty_queue_and_restores_its_bindings(
    applied: MemoryManagementClient,
) -> None:
    changed = definitions()
    changed["queues"][0]["arguments"]["x-delivery-limit"] = 7

    report = apply_topology(applied, changed, passwords=PASSWORDS, vhost=VHOST, recreate_empty=True)

    # Bound again within the recreation itself, not in a later phase.
    assert [str(c) for c in report.applied] == [
        "needs_recreate queue 'work': x-delivery-limit 5 -> 7",
    ]
    assert diff_topology(applied, changed, VHOST) == []


@pytest.mark.parametrize(("messages", "shown"), [(3, "holds 3 messages"), (None, "unsampled")])
def test_recreate_empty_refuses_a_queue_that_may_hold_messages(
    applied: MemoryManagementClient, messages: int | None, shown: str
) -> None:
    applied.set_messages(VHOST, "work", messages)
    changed = definitions()
    changed["queues"][0]["arguments"]["x-overflow"] = "drop-head"

    with pytest.raises(TopologyConflict, match=shown):
        apply_topology(applied, changed, passwords=PASSWORDS, vhost=VHOST, recreate_empty=True)
    assert applied.calls == []


def test_a_changed_exchange_needs_recreate(applied: MemoryManagementClient) -> None:
    changed = definitions()
    changed["exchanges"][0]["arguments"] = {}

    (change,) = diff_topology(applied, changed, VHOST)

    assert change.kind is ChangeKind.NEEDS_RECREATE
    assert change.differences == {"alternate-exchange": ("unrouted", None)}


def test_a_changed_password_or_tags_updates_the_user_and_never_shows_the_password(
    applied: MemoryManagementClient,
) -> None:
    changed = definitions()
    changed["users"][0]["tags"] = ["monitoring"]
    passwords = {**PASSWORDS, "publisher": "rotated-secret"}

    report = apply_topology(applied, changed, passwords=passwords, vhost=VHOST)

    assert [(c.kind, c.name, dict(c.differences)) for c in report.applied] == [
        (ChangeKind.UPDATE, "consumer", {"tags": ([], ["monitoring"])}),
        (ChangeKind.UPDATE, "publisher", {"password": ("(hidden)", "(hidden)")}),
    ]
    assert "rotated-secret" not in " ".join(str(c) for c in report.applied)
    assert diff_topology(applied, changed, VHOST, passwords=passwords) == []


def test_a_changed_permission_is_updated_in_place(applied: MemoryManagementClient) -> None:
    changed = definitions()
    changed["permissions"][0]["read"] = r"^work(\.dlq)?$"

    report = apply_topology(applied, changed, passwords=PASSWORDS, vhost=VHOST)

    (change,) = report.applied
    assert (change.kind, change.resource, change.name) == (
        ChangeKind.UPDATE,
        Resource.PERMISSION,
        "consumer",
    )
    assert applied.calls == ["put_permissions consumer"]


def test_apply_without_a_users_password_fails_before_any_change(
    broker: MemoryManagementClient,
) -> None:
    with pytest.raises(ConfigError, match=r"no password for broker users \['publisher'\]") as info:
        apply_topology(
            broker, definitions(), passwords={"consumer": "s3cret-consumer"}, vhost=VHOST
        )
    assert "s3cret" not in str(info.value)
    assert broker.calls == []


def test_a_document_spanning_two_vhosts_is_refused(broker: MemoryManagementClient) -> None:
    document = definitions()
    document["queues"][1]["vhost"] = "other"

    with pytest.raises(ConfigError, match="several vhosts"):
        diff_topology(broker, document, VHOST)


def test_delete_removes_everything_when_no_queue_holds_messages(
    applied: MemoryManagementClient,
) -> None:
    report = delete_topology(applied, definitions(), VHOST)

    assert report.kept == ()
    assert report.deleted[-1] == (Resource.VHOST, VHOST)
    assert applied.get_vhost(VHOST) is None
    assert applied.get_user("consumer") is None
    assert applied.get_user("publisher") is None


def test_delete_keeps_a_queue_holding_messages_with_its_dead_letter_path(
    applied: MemoryManagementClient,
) -> None:
    applied.set_messages(VHOST, "work", 2)

    report = delete_topology(applied, definitions(), VHOST)

    assert set(report.kept) == {
        Kept(Resource.QUEUE, "work", "holds 2 messages"),
        Kept(Resource.EXCHANGE, "dlx", "on the onward path of queue 'work'"),
        Kept(Resource.QUEUE, "work.dlq", "on the onward path of exchange 'dlx'"),
        Kept(Resource.VHOST, VHOST, "still holds queues ['work', 'work.dlq']"),
    }
    assert {name for _, name in report.deleted} >= {"ingress", "unrouted", "consumer"}
    assert {q["name"]: q.get("messages") for q in applied.list_queues(VHOST)} == {
        "work": 2,
        "work.dlq": 0,
    }


def test_delete_never_removes_the_login_user(applied: MemoryManagementClient) -> None:
    document = definitions()
    document["users"].append({"name": "admin", "tags": ["administrator"]})

    report = delete_topology(applied, document, VHOST)

    assert Kept(Resource.USER, "admin", "the user the applier logs in as") in report.kept
    assert "delete_user admin" not in applied.calls


def test_delete_never_deletes_the_default_vhost(broker: MemoryManagementClient) -> None:
    apply_topology(broker, definitions(), passwords=PASSWORDS, vhost="/")

    report = delete_topology(broker, definitions(), "/")

    assert broker.get_vhost("/") is not None
    assert (Resource.VHOST, "/") not in report.deleted


def test_the_generated_fabric_topology_applies_idempotently(
    broker: MemoryManagementClient,
) -> None:
    document = topology.definitions(default_routing_table())
    passwords = {user["name"]: f"pw-{user['name']}" for user in document["users"]}

    first = apply_topology(broker, document, passwords=passwords, vhost=VHOST)

    assert first.changed
    assert first.extra == ()
    assert diff_topology(broker, document, VHOST, passwords=passwords) == []
