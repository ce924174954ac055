"""Who may remove the broker topology: the custom resource's physical ids and the owner record.

CloudFormation replaces a custom resource (a new logical id, a move to another stack) by
creating the new one and then deleting the old one, and rolls a replacement back by deleting
the new one: neither Delete may take the live topology (the router's login among it) away.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from fabric.adapters.memory_management import MemoryManagementClient
from fabric.custom_resource import respond
from fabric.errors import ConfigError, ManagementUnavailable
from fabric.stakeholders import Stakeholder
from fabric.topology import INGRESS_EXCHANGE, PLATFORM_USER, queue_name
from fabric.topology_resource import on_event, on_request, owner_parameter
from tests.unit.test_topology_resource import ENVIRON, FakeSecrets

LEGACY_ID = "fabric-dev-topology"  # what every deployed resource answered before
REQUESTS = itertools.count(1)


@pytest.fixture
def broker() -> MemoryManagementClient:
    return MemoryManagementClient(username="admin")


def event(
    request: str,
    physical_id: str | None = None,
    *,
    logical_id: str = "Topology",
    stack: str = "dev-Services",
) -> dict[str, Any]:
    cloudformation: dict[str, Any] = {
        "RequestType": request,
        "ResponseURL": "https://cloudformation-response.example/presigned",
        "StackId": f"arn:aws:cloudformation:ap-southeast-3:111111111111:stack/{stack}/1",
        "LogicalResourceId": logical_id,
        "RequestId": f"req-{next(REQUESTS)}",
    }
    if physical_id is not None:
        cloudformation["PhysicalResourceId"] = physical_id
    return cloudformation


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
