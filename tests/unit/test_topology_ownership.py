"""Who may remove the broker topology: the custom resource's physical ids and the owner record.

CloudFormation replaces a custom resource (a new logical id, a move to another stack) by
creating the new one and then deleting the old one, and rolls a replacement back by deleting
the new one: neither Delete may take the live topology (the router's login among it) away.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fabric.adapters.memory_management import MemoryManagementClient
from fabric.custom_resource import respond
from fabric.errors import ConfigError, ManagementUnavailable
from fabric.stakeholders import Stakeholder
from fabric.topology import INGRESS_EXCHANGE, PLATFORM_USER, queue_name, user_name
from fabric.topology_resource import on_event, on_request, owner_parameter
from tests.unit.test_topology_resource import ENVIRON, FakeSecrets
from tests.unit.test_topology_resource import cloudformation as event

LEGACY_ID = "fabric-dev-topology"  # what every deployed resource answered before


@pytest.fixture
def broker() -> MemoryManagementClient:
    return MemoryManagementClient(username="admin")


def handle(broker: MemoryManagementClient, request: dict[str, Any]) -> dict[str, Any]:
    """The function's answer to CloudFormation, as ``respond`` sends it."""
    return respond(
        request,
        "stream-1",
        lambda _type, _props: on_event(
            request, ENVIRON, client_factory=lambda *_: broker, secrets_client=FakeSecrets
        ),
        send=lambda *_: None,
    )


def create(broker: MemoryManagementClient, **names: str) -> str:
    answer = handle(broker, event("Create", **names))
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    return str(answer["PhysicalResourceId"])


def delete(broker: MemoryManagementClient, physical_id: str) -> dict[str, Any]:
    answer = handle(broker, event("Delete", physical_id))
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    return answer


def live(broker: MemoryManagementClient) -> bool:
    """The topology is on the broker: the router's login, the ingress exchange, the queues."""
    return (
        broker.get_user(PLATFORM_USER) is not None
        and INGRESS_EXCHANGE in {e["name"] for e in broker.list_exchanges("/")}
        and queue_name(Stakeholder.MEDIA) in {q["name"] for q in broker.list_queues("/")}
    )


def gone(broker: MemoryManagementClient) -> bool:
    return broker.get_user(PLATFORM_USER) is None and not any(
        q["name"].startswith("fabric.") for q in broker.list_queues("/")
    )


def legacy_deploy(broker: MemoryManagementClient) -> None:
    """A topology applied by a resource deployed before the owner record existed."""
    assert on_request(
        {"action": "apply"}, ENVIRON, client_factory=lambda *_: broker, secrets_client=FakeSecrets
    )["complete"]
    assert broker.get_global_parameter(owner_parameter("/")) is None


def test_each_create_answers_an_id_of_its_own(broker: MemoryManagementClient) -> None:
    first = create(broker)
    again = create(broker)  # same logical id and stack, another request
    elsewhere = create(broker, stack="dev-Services2")
    renamed = create(broker, logical_id="TopologyV2")

    assert len({first, again, elsewhere, renamed, LEGACY_ID}) == 5
    assert all(i.startswith(f"{LEGACY_ID}-") for i in (first, again, elsewhere, renamed))


@pytest.mark.parametrize("names", [{"logical_id": "TopologyV2"}, {"stack": "dev-Topology"}])
def test_the_old_resources_delete_after_a_replacement_keeps_the_live_topology(
    broker: MemoryManagementClient, names: dict[str, str]
) -> None:
    old = create(broker)
    new = create(broker, **names)

    answer = delete(broker, old)  # CloudFormation's cleanup of the replaced resource

    assert answer["Data"] == {"Deleted": "0", "Kept": "0"}
    assert live(broker)
    delete(broker, new)  # the stack's own Delete, later
    assert gone(broker)


def test_the_rollback_of_a_replacement_keeps_the_topology_of_the_resource_that_stays(
    broker: MemoryManagementClient,
) -> None:
    old = create(broker)
    new = create(broker, logical_id="TopologyV2")

    delete(broker, new)  # the update failed later on: CloudFormation deletes the new one

    assert live(broker)
    delete(broker, old)
    assert gone(broker)


def test_a_delete_by_the_only_owner_removes_the_topology_and_its_record(
    broker: MemoryManagementClient,
) -> None:
    owner = create(broker)

    answer = delete(broker, owner)

    assert int(answer["Data"]["Deleted"]) > 50
    assert gone(broker)
    assert broker.get_global_parameter(owner_parameter("/")) is None


def test_an_update_keeps_its_id(broker: MemoryManagementClient) -> None:
    owner = create(broker)

    answer = handle(broker, event("Update", owner))

    assert answer["Status"] == "SUCCESS"
    assert answer["PhysicalResourceId"] == owner


# --- stacks deployed before the owner record ----------------------------------------------------


def test_a_delete_under_the_old_id_without_a_record_removes_the_topology_as_before(
    broker: MemoryManagementClient,
) -> None:
    legacy_deploy(broker)

    delete(broker, LEGACY_ID)

    assert gone(broker)


def test_an_update_of_a_deployed_resource_keeps_the_old_id_and_records_it(
    broker: MemoryManagementClient,
) -> None:
    legacy_deploy(broker)

    answer = handle(broker, event("Update", LEGACY_ID))

    assert answer["PhysicalResourceId"] == LEGACY_ID  # a new id would replace the resource
    assert broker.get_global_parameter(owner_parameter("/")) == {
        "vhost": "/",
        "owners": [LEGACY_ID],
    }
    delete(broker, LEGACY_ID)
    assert gone(broker)


def test_replacing_a_deployed_resource_keeps_the_topology_through_cleanup_and_rollback(
    broker: MemoryManagementClient,
) -> None:
    legacy_deploy(broker)
    new = create(broker, logical_id="TopologyV2")

    delete(broker, LEGACY_ID)  # the cleanup of the replaced resource
    assert live(broker)
    delete(broker, new)
    assert gone(broker)

    legacy_deploy(broker)
    rolled_back = create(broker, logical_id="TopologyV2")
    delete(broker, rolled_back)  # a rollback: the deployed resource stays and keeps its topology
    assert live(broker)
    delete(broker, LEGACY_ID)
    assert gone(broker)


# --- deletes that name no owner -----------------------------------------------------------------


def test_a_failed_creates_rollback_removes_nothing_and_does_not_need_the_broker(
    broker: MemoryManagementClient,
) -> None:
    owner = create(broker)

    def unreachable(*_args: Any) -> MemoryManagementClient:
        raise ManagementUnavailable("refused", method="GET", path="/api/overview")

    # A Create that failed (the broker was unreachable, say) answered an id of its own; its
    # rollback must succeed even while the broker still cannot be reached.
    failed = "Topology-create-failed-req-9"
    request = event("Delete", failed)
    answer = respond(
        request,
        "stream-1",
        lambda _type, _props: on_event(
            request, ENVIRON, client_factory=unreachable, secrets_client=FakeSecrets
        ),
        send=lambda *_: None,
    )

    assert answer["Status"] == "SUCCESS"
    assert answer["PhysicalResourceId"] == failed
    assert live(broker)
    delete(broker, owner)
    assert gone(broker)


def test_a_record_changed_by_hand_fails_the_delete_and_removes_nothing(
    broker: MemoryManagementClient,
) -> None:
    owner = create(broker)
    broker.put_global_parameter(owner_parameter("/"), "whoever")

    answer = handle(broker, event("Delete", owner))

    assert answer["Status"] == "FAILED"
    assert ConfigError.__name__ in answer["Reason"]
    assert live(broker)


# --- overlapping requests in one vhost ----------------------------------------------------------


class During:
    """The broker as one request sees it: the first time that request calls ``method``,
    ``meanwhile`` (another stack's request, say) runs from start to end first."""

    def __init__(self, inner: Any, method: str, meanwhile: Callable[[], dict[str, Any]]) -> None:
        self._inner, self._method, self._meanwhile = inner, method, meanwhile
        self.answer: dict[str, Any] | None = None

    @property
    def username(self) -> str:
        return str(self._inner.username)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name != self._method:
            return attribute

        def hooked(*args: Any, **kwargs: Any) -> Any:
            if self.answer is None:
                self.answer = self._meanwhile()
            return attribute(*args, **kwargs)

        return hooked


class StaleRecord:
    """The broker as a request sees it that read the owner record (``record``) before another
    request wrote it, and writes it after: the management API has no compare-and-swap."""

    def __init__(self, inner: MemoryManagementClient, record: Any) -> None:
        self._inner, self._record = inner, record

    @property
    def username(self) -> str:
        return self._inner.username

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_global_parameter(self, name: str) -> Any:
        record, self._record = self._record, None
        return record if record is not None else self._inner.get_global_parameter(name)


def handle_on(client: Any, request: dict[str, Any]) -> dict[str, Any]:
    """``handle``, the function reaching the broker through ``client``."""
    return respond(
        request,
        "stream-1",
        lambda _type, _props: on_event(
            request, ENVIRON, client_factory=lambda *_: client, secrets_client=FakeSecrets
        ),
        send=lambda *_: None,
    )


def owners(broker: MemoryManagementClient) -> list[str] | None:
    record = broker.get_global_parameter(owner_parameter("/"))
    return None if record is None else list(record["owners"])


def a_change_to_apply(broker: MemoryManagementClient) -> None:
    """The next Create has something to change (the move came with a routing change, say)."""
    assert broker.delete_user(user_name(Stakeholder.MEDIA))


def test_the_old_stacks_delete_during_the_new_stacks_create_keeps_the_topology(
    broker: MemoryManagementClient,
) -> None:
    # A move to another stack, both deployed at once: the old stack's Delete comes while the
    # new stack's Create applies.
    old = create(broker)
    a_change_to_apply(broker)
    overlapping = During(broker, "put_user", lambda: handle(broker, event("Delete", old)))

    answer = handle_on(overlapping, event("Create", stack="dev-Topology"))

    assert answer["Status"] == "SUCCESS"
    assert overlapping.answer is not None
    # It removed nothing: the router's login never went away, not even for a moment.
    assert overlapping.answer["Data"] == {"Deleted": "0", "Kept": "0"}
    assert live(broker)
    assert owners(broker) == [answer["PhysicalResourceId"]]
    delete(broker, answer["PhysicalResourceId"])
    assert gone(broker)


def test_two_creates_that_overlap_both_stay_owners(broker: MemoryManagementClient) -> None:
    # Two stacks deploying into one vhost at once: the second Create runs while the first applies.
    overlapping = During(broker, "put_user", lambda: handle(broker, event("Create", stack="B")))

    first = handle_on(overlapping, event("Create"))

    assert overlapping.answer is not None
    second = overlapping.answer["PhysicalResourceId"]
    assert sorted(owners(broker) or []) == sorted([first["PhysicalResourceId"], second])
    delete(broker, first["PhysicalResourceId"])
    assert live(broker), "the other stack still uses the topology"
    delete(broker, second)
    assert gone(broker)


def test_a_create_during_the_last_owners_delete_gets_the_whole_topology(
    broker: MemoryManagementClient,
) -> None:
    # The old stack's Delete is already removing the topology when the new stack's Create comes.
    old = create(broker)
    new = event("Create", stack="dev-Topology")
    overlapping = During(broker, "delete_user", lambda: handle(broker, new))

    answer = handle_on(overlapping, event("Delete", old))

    assert answer["Status"] == "SUCCESS"
    assert overlapping.answer is not None
    assert overlapping.answer["Status"] == "SUCCESS"
    assert live(broker)
    assert owners(broker) == [overlapping.answer["PhysicalResourceId"]]
    delete(broker, overlapping.answer["PhysicalResourceId"])
    assert gone(broker)


def test_a_create_whose_entry_an_overlapping_delete_overwrote_applies_again_and_stays_owner(
    broker: MemoryManagementClient,
) -> None:
    # The old stack's Delete read the record just before the new Create added itself, and wrote
    # it (without its own id) just after: the Create's id is gone, the record looks empty, and
    # the Delete removes the topology while the Create applies.
    old = create(broker)
    before = broker.get_global_parameter(owner_parameter("/"))
    a_change_to_apply(broker)
    overlapping = During(
        broker, "put_user", lambda: handle_on(StaleRecord(broker, before), event("Delete", old))
    )

    answer = handle_on(overlapping, event("Create", stack="dev-Topology"))

    assert overlapping.answer is not None
    assert int(overlapping.answer["Data"]["Deleted"]) > 0
    assert answer["Status"] == "SUCCESS"
    assert live(broker)
    assert owners(broker) == [answer["PhysicalResourceId"]]
    delete(broker, answer["PhysicalResourceId"])
    assert gone(broker)


# --- a Create that fails part-way ---------------------------------------------------------------


class Fails:
    """A broker that refuses the request's first call of ``method`` and, with ``gone``, every
    call after that too (the deadline has passed)."""

    def __init__(self, inner: MemoryManagementClient, method: str, *, gone: bool = False) -> None:
        self._inner, self._method, self._gone, self._failed = inner, method, gone, False

    @property
    def username(self) -> str:
        return self._inner.username

    def __getattr__(self, name: str) -> Any:
        if name == self._method or (self._failed and self._gone):
            self._failed = True
            raise ManagementUnavailable("deadline", method="GET", path=name)
        return getattr(self._inner, name)


@pytest.mark.parametrize("cleans_up", [True, False], ids=["create-cleans-up", "broker-gone"])
def test_a_first_create_that_fails_part_way_leaves_no_owner_behind(
    broker: MemoryManagementClient, cleans_up: bool
) -> None:
    # It fails once its users are there (the broker no longer answers, or the deadline passed).
    failed = handle_on(Fails(broker, "put_permissions", gone=not cleans_up), event("Create"))
    assert failed["Status"] == "FAILED"
    assert broker.get_user(PLATFORM_USER) is not None

    rollback = handle(broker, event("Delete", failed["PhysicalResourceId"]))

    assert rollback["Status"] == "SUCCESS"
    assert gone(broker), "the rollback removes what the failed Create left"
    # The next deploy's resource is then the only owner, and its Delete removes the topology.
    owner = create(broker)
    assert owners(broker) == [owner]
    delete(broker, owner)
    assert gone(broker)
    assert broker.get_global_parameter(owner_parameter("/")) is None


def test_a_failed_create_is_no_owner_even_when_its_rollback_cannot_reach_the_broker(
    broker: MemoryManagementClient,
) -> None:
    failed = handle_on(Fails(broker, "put_permissions"), event("Create"))

    def unreachable(*_args: Any) -> MemoryManagementClient:
        raise ManagementUnavailable("refused", method="GET", path="/api/overview")

    rollback = event("Delete", failed["PhysicalResourceId"])
    answer = respond(
        rollback,
        "stream-1",
        lambda _type, _props: on_event(
            rollback, ENVIRON, client_factory=unreachable, secrets_client=FakeSecrets
        ),
        send=lambda *_: None,
    )

    assert (failed["Status"], answer["Status"]) == ("FAILED", "SUCCESS")
    owner = create(broker)  # the next deploy: it owns what the failed Create left
    assert owners(broker) == [owner]
    delete(broker, owner)
    assert gone(broker)


def test_a_create_that_fails_next_to_a_live_topology_leaves_it_to_its_owner(
    broker: MemoryManagementClient,
) -> None:
    owner = create(broker)

    failed = handle_on(Fails(broker, "list_queues"), event("Create", logical_id="TopologyV2"))
    rollback = handle(
        broker, event("Delete", failed["PhysicalResourceId"], logical_id="TopologyV2")
    )

    assert (failed["Status"], rollback["Status"]) == ("FAILED", "SUCCESS")
    assert live(broker)
    assert owners(broker) == [owner]
    delete(broker, owner)
    assert gone(broker)


def test_a_rollback_that_cannot_finish_succeeds_and_the_next_resource_owns_what_is_left(
    broker: MemoryManagementClient,
) -> None:
    failed = handle_on(Fails(broker, "put_permissions", gone=True), event("Create"))
    rollback = event("Delete", failed["PhysicalResourceId"])

    # The broker stops answering half-way through the removal: the rollback still succeeds
    # (CloudFormation must not wait on it), and the failed Create is no owner any more.
    assert handle_on(Fails(broker, "delete_queue", gone=True), rollback)["Status"] == "SUCCESS"
    assert any(q["name"].startswith("fabric.") for q in broker.list_queues("/"))

    owner = create(broker)  # the next deploy
    assert owners(broker) == [owner]
    delete(broker, owner)
    assert gone(broker)


# --- a Create CloudFormation gave up on -----------------------------------------------------------

MADE_UP_ID = "dev-Services-Topology-1XZ2ABCDEF3G"  # how CloudFormation names such a resource


def test_a_cancelled_creates_rollback_under_an_id_cloudformation_made_up_leaves_no_owner(
    broker: MemoryManagementClient,
) -> None:
    # Another resource of the first deploy failed while the Create ran: CloudFormation cancels it
    # ("Resource creation cancelled"), ignores its late answer and deletes the resource under an
    # id of its own making. The function ran the Create to the end all the same.
    create(broker)

    rollback = delete(broker, MADE_UP_ID)

    assert int(rollback["Data"]["Deleted"]) > 50
    assert gone(broker)
    assert owners(broker) is None
    # The stack deployed again, and deleted later for good: nothing is left behind.
    owner = create(broker)
    assert owners(broker) == [owner]
    delete(broker, owner)
    assert gone(broker)


@pytest.mark.parametrize(
    "new",
    [
        {"LogicalResourceId": "TopologyV2"},
        {"StackId": "arn:aws:cloudformation:ap-southeast-3:111111111111:stack/dev-Topology/1"},
        # The same stack name, created again (another stack id).
        {"StackId": "arn:aws:cloudformation:ap-southeast-3:111111111111:stack/dev-Services/2"},
    ],
    ids=["new-logical-id", "other-stack", "stack-created-again"],
)
def test_a_cancelled_replacements_rollback_keeps_the_resource_that_stays_the_only_owner(
    broker: MemoryManagementClient, new: dict[str, str]
) -> None:
    old = create(broker)
    assert handle(broker, {**event("Create"), **new})["Status"] == "SUCCESS"

    # The update failed elsewhere while the new resource's Create ran: its Delete comes under an
    # id CloudFormation made up.
    rollback = handle(broker, {**event("Delete", MADE_UP_ID), **new})

    assert rollback["Status"] == "SUCCESS"
    assert live(broker)
    assert owners(broker) == [old]
    delete(broker, old)  # the stack's own Delete, later
    assert gone(broker)


def test_the_delete_of_a_cancelled_create_succeeds_while_the_broker_cannot_be_reached(
    broker: MemoryManagementClient,
) -> None:
    def unreachable(*_args: Any) -> MemoryManagementClient:
        raise ManagementUnavailable("refused", method="GET", path="/api/overview")

    rollback = event("Delete", MADE_UP_ID)
    answer = respond(
        rollback,
        "stream-1",
        lambda _type, _props: on_event(
            rollback, ENVIRON, client_factory=unreachable, secrets_client=FakeSecrets
        ),
        send=lambda *_: None,
    )

    assert answer["Status"] == "SUCCESS"  # a rollback never waits on the broker
    assert answer["PhysicalResourceId"] == MADE_UP_ID


def test_a_delete_under_an_id_the_version_before_answered_removes_the_topology(
    broker: MemoryManagementClient,
) -> None:
    # Its Creates answered one hash of the stack, logical and request ids.
    deployed = f"{LEGACY_ID}-0123456789abcdef"
    legacy_deploy(broker)
    broker.put_global_parameter(owner_parameter("/"), {"vhost": "/", "owners": [deployed]})

    delete(broker, deployed)

    assert gone(broker)
    assert owners(broker) is None


def test_an_update_under_a_failed_creates_answer_is_no_owner_after_the_stacks_delete(
    broker: MemoryManagementClient,
) -> None:
    # The first Create failed (its id is off the record again); the resource stayed (no
    # rollback), and the next deploy sent it an Update under the failed Create's answer.
    failed = handle_on(Fails(broker, "put_permissions"), event("Create"))
    assert failed["Status"] == "FAILED"
    update = handle(broker, event("Update", failed["PhysicalResourceId"]))
    assert update["Status"] == "SUCCESS"
    assert live(broker)

    delete(broker, failed["PhysicalResourceId"])  # the stack's Delete

    assert gone(broker)
    assert owners(broker) is None
