"""Deleting a queue on a statistics sample that may be seconds old: the applier cuts the queue's
inflow, waits for a sample taken after the cut and checks again; a recreated queue is bound
again at once. Against the in-memory management API, whose statistics lag as RabbitMQ's do."""

from __future__ import annotations

import time
from typing import Any

import pytest

from fabric.adapters.management import ManagementClient
from fabric.adapters.memory_management import MemoryManagementClient
from fabric.errors import ManagementUnavailable, TopologyConflict
from fabric.topology_apply import Kept, Resource, apply_topology, delete_topology
from tests.unit.test_topology_apply import PASSWORDS, VHOST, definitions


@pytest.fixture
def applied() -> MemoryManagementClient:
    broker = MemoryManagementClient(username="admin")
    apply_topology(broker, definitions(), passwords=PASSWORDS, vhost=VHOST)
    broker.calls.clear()
    return broker


def bindings_into(broker: MemoryManagementClient, queue: str) -> set[str]:
    return {
        f"{b['source']}->{queue}"
        for b in broker.list_bindings(VHOST)
        if b["destination"] == queue and b["source"] != ""
    }


def changed_work_queue() -> dict[str, Any]:
    document = definitions()
    document["queues"][0]["arguments"]["x-delivery-limit"] = 7
    return document


def test_delete_keeps_a_queue_whose_last_sample_missed_its_messages(
    applied: MemoryManagementClient,
) -> None:
    # The statistics still say 0: the message arrived after their last sample.
    applied.set_messages(VHOST, "work", 1, sampled=False)

    report = delete_topology(applied, definitions(), VHOST)

    assert Kept(Resource.QUEUE, "work", "holds 1 messages") in report.kept
    assert {q["name"]: q.get("messages") for q in applied.list_queues(VHOST)} == {
        "work": 1,
        "work.dlq": 0,
    }
    # Its dead-letter queue was emptied of inflow too, then kept on its onward path: bound again.
    assert bindings_into(applied, "work.dlq") == {"dlx->work.dlq"}


def test_delete_cuts_a_queues_inflow_and_waits_for_a_new_sample_before_deleting_it(
    applied: MemoryManagementClient,
) -> None:
    delete_topology(applied, definitions(), VHOST)

    calls = applied.calls
    wait = calls.index("wait_for_statistics")
    assert calls.count("wait_for_statistics") == 1
    assert calls.index("delete_binding ingress->work") < wait < calls.index("delete_queue work")
    assert calls.index("delete_binding dlx->work.dlq") < wait < calls.index("delete_queue work.dlq")


def test_recreate_refuses_a_queue_whose_last_sample_missed_its_messages_and_binds_it_back(
    applied: MemoryManagementClient,
) -> None:
    applied.set_messages(VHOST, "work", 2, sampled=False)

    with pytest.raises(TopologyConflict, match=r"'work' holds 2 messages"):
        apply_topology(
            applied, changed_work_queue(), passwords=PASSWORDS, vhost=VHOST, recreate_empty=True
        )

    (work,) = [q for q in applied.list_queues(VHOST) if q["name"] == "work"]
    assert (work["messages"], work["arguments"]["x-delivery-limit"]) == (2, 5)
    assert bindings_into(applied, "work") == {"ingress->work"}


def test_each_recreated_queue_is_bound_again_right_after_it_is_declared(
    applied: MemoryManagementClient,
) -> None:
    document = changed_work_queue()
    document["queues"][2]["arguments"]["x-delivery-limit"] = 9  # 'unrouted' too

    apply_topology(applied, document, passwords=PASSWORDS, vhost=VHOST, recreate_empty=True)

    # 'work' gets its route back before 'unrouted' goes: not after every queue is recreated.
    assert applied.calls == [
        "delete_binding ingress->work",
        "delete_binding unrouted->unrouted",
        "wait_for_statistics",
        "delete_queue work",
        "put_queue work",
        "create_binding ingress->work",
        "delete_queue unrouted",
        "put_queue unrouted",
        "create_binding unrouted->unrouted",
    ]
    assert bindings_into(applied, "work") == {"ingress->work"}
    assert bindings_into(applied, "unrouted") == {"unrouted->unrouted"}


def test_a_recreated_exchange_is_bound_again_at_once_but_not_to_a_queue_still_to_recreate(
    applied: MemoryManagementClient,
) -> None:
    document = changed_work_queue()
    for exchange in document["exchanges"]:
        exchange["arguments"]["x-note"] = "changed"  # ingress, unrouted, dlx: all recreated

    apply_topology(applied, document, passwords=PASSWORDS, vhost=VHOST, recreate_empty=True)

    calls = applied.calls
    after_dlx = calls[calls.index("put_exchange dlx") + 1]
    assert after_dlx == "create_binding dlx->work.dlq"
    # ingress -> work waits for the queue's own recreation, after the check of its count.
    assert calls.index("create_binding ingress->work") == calls.index("put_queue work") + 1
    assert bindings_into(applied, "work") == {"ingress->work"}


class FailsAt(MemoryManagementClient):
    """The management API fails at one call once ``failing`` names it (the deadline passed, the
    broker went away)."""

    failing = ""

    def put_exchange(self, vhost: str, name: str, **properties: Any) -> None:
        if self.failing == f"put_exchange {name}":
            raise ManagementUnavailable("no answer", method="PUT", path=f"/api/exchanges/{name}")
        super().put_exchange(vhost, name, **properties)

    def wait_for_statistics(self) -> None:
        if self.failing == "wait_for_statistics":
            raise ManagementUnavailable("no time left", method="WAIT", path="statistics")
        super().wait_for_statistics()


@pytest.mark.parametrize("failing", ["wait_for_statistics", "put_exchange dlx"])
def test_an_apply_that_fails_after_cutting_a_queues_inflow_binds_it_back(failing: str) -> None:
    broker = FailsAt(username="admin")
    apply_topology(broker, definitions(), passwords=PASSWORDS, vhost=VHOST)
    broker.failing = failing
    document = changed_work_queue()
    document["exchanges"][2]["arguments"]["x-note"] = "changed"  # dlx: recreated before 'work'

    with pytest.raises(ManagementUnavailable):
        apply_topology(broker, document, passwords=PASSWORDS, vhost=VHOST, recreate_empty=True)

    assert bindings_into(broker, "work") == {"ingress->work"}


def test_a_delete_that_cannot_wait_for_the_statistics_deletes_no_queue_and_binds_back() -> None:
    broker = FailsAt(username="admin")
    apply_topology(broker, definitions(), passwords=PASSWORDS, vhost=VHOST)
    broker.failing = "wait_for_statistics"

    with pytest.raises(ManagementUnavailable):
        delete_topology(broker, definitions(), VHOST)

    assert {q["name"] for q in broker.list_queues(VHOST)} == {"work", "work.dlq", "unrouted"}
    assert bindings_into(broker, "work") == {"ingress->work"}
    assert bindings_into(broker, "work.dlq") == {"dlx->work.dlq"}


def test_the_http_client_refuses_a_statistics_wait_that_would_pass_its_deadline() -> None:
    client = ManagementClient(
        "http://127.0.0.1:1", "admin", "pw", deadline=time.monotonic() + 10, statistics_interval=5
    )
    started = time.monotonic()

    with pytest.raises(ManagementUnavailable, match="deadline"):
        client.wait_for_statistics()
    assert time.monotonic() - started < 1


def test_the_http_client_waits_three_statistics_intervals() -> None:
    client = ManagementClient("http://127.0.0.1:1", "admin", "pw", statistics_interval=0.1)
    started = time.monotonic()

    client.wait_for_statistics()

    assert 0.3 <= time.monotonic() - started < 1


def test_a_delete_binds_a_kept_queue_that_an_earlier_stopped_run_left_unbound(
    applied: MemoryManagementClient,
) -> None:
    # An earlier run cut the dead-letter queue's inflow and stopped (killed at its timeout)
    # before it could count again; meanwhile 'work' was found holding messages.
    (dlq_binding,) = [
        b
        for b in applied.list_bindings(VHOST)
        if b["destination"] == "work.dlq" and b["source"] == "dlx"
    ]
    applied.delete_binding(
        VHOST,
        source="dlx",
        destination="work.dlq",
        destination_type="queue",
        properties_key=dlq_binding["properties_key"],
    )
    applied.set_messages(VHOST, "work", 3)

    report = delete_topology(applied, definitions(), VHOST)

    assert Kept(Resource.QUEUE, "work.dlq", "on the onward path of exchange 'dlx'") in report.kept
    assert bindings_into(applied, "work.dlq") == {"dlx->work.dlq"}, "work's dead letters arrive"
