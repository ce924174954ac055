"""Operational metrics: the counts an on-call operator's "fallback active" alarm is built on."""

from __future__ import annotations

import io
import json
import uuid

from fabric import metrics
from fabric.adapters.emf import EmfMetrics
from fabric.adapters.memory import MemoryAuditSink, MemoryMetrics, MemoryTransport
from fabric.adapters.memory_cipher import LocalCipher
from fabric.ports import Failure
from fabric.router import Router
from fabric.routing import default_routing_table


def donation() -> dict[str, object]:
    return {"message_id": str(uuid.uuid4()), "topic": "donation.pledge.received", "payload": {}}


def router(*transports: MemoryTransport, sink: MemoryMetrics) -> Router:
    return Router(
        table=default_routing_table(),
        transports=list(transports),
        cipher=LocalCipher(),
        audit=MemoryAuditSink(),
        environment="test",
        metrics=sink,
    )


def test_messages_taken_by_the_fallback_are_counted_apart_from_the_brokers() -> None:
    broker = MemoryTransport(name="rabbitmq")
    fallback = MemoryTransport(name="fallback")
    sink = MemoryMetrics()
    batch = [donation() for _ in range(5)]
    broker.fail_ids = {str(batch[1]["message_id"]), str(batch[3]["message_id"])}
    router(broker, fallback, sink=sink).route([*batch, b"{broken"], source="business")
    assert sink.totals == {
        metrics.ACCEPTED_BY_BROKER: 3,
        metrics.ACCEPTED_BY_FALLBACK: 2,
        metrics.REJECTED: 1,
        metrics.REJECTED_UNAVAILABLE: 0,
    }


def test_messages_no_path_could_store_are_counted_as_unavailable() -> None:
    sink = MemoryMetrics()
    down = MemoryTransport(name="rabbitmq", failure=Failure.UNAVAILABLE)
    also_down = MemoryTransport(name="fallback", failure=Failure.UNAVAILABLE)
    router(down, also_down, sink=sink).route([donation(), donation()], source="business")
    assert sink.totals[metrics.REJECTED_UNAVAILABLE] == 2
    assert sink.totals[metrics.ACCEPTED_BY_FALLBACK] == 0


def test_an_emf_line_names_each_count_as_a_metric_of_the_environment() -> None:
    out = io.StringIO()
    EmfMetrics(environment="prod", emitted_by="router", stream=out, clock=lambda: 1.5).count(
        {metrics.ACCEPTED_BY_FALLBACK: 4, metrics.REJECTED: 0}
    )
    document = json.loads(out.getvalue())
    (directive,) = document["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "MessagingFabric"
    assert directive["Dimensions"] == [["Environment"]]
    assert {m["Name"] for m in directive["Metrics"]} == {"AcceptedByFallback", "Rejected"}
    assert (document["Environment"], document["AcceptedByFallback"]) == ("prod", 4)
    assert document["_aws"]["Timestamp"] == 1500


def test_an_audit_batch_no_path_could_store_is_counted_as_records_lost() -> None:
    # Before, a lost audit batch only reached the log: no metric, so no alarm could page.
    sink = MemoryMetrics()
    built = Router(
        table=default_routing_table(),
        transports=[MemoryTransport(name="rabbitmq")],
        cipher=LocalCipher(),
        audit=MemoryAuditSink(available=False),
        environment="test",
        metrics=sink,
    )
    result = built.route([donation(), donation(), b"{broken"], source="business")
    assert result.accepted == 2  # the messages are stored: the producer is told so
    # Two accepted (accepted + routed each) and one rejected: five records lost.
    assert sink.totals[metrics.AUDIT_RECORDS_LOST] == 5
    assert sink.totals[metrics.ACCEPTED_BY_BROKER] == 2


def test_a_stored_audit_batch_writes_no_records_lost_metric() -> None:
    sink = MemoryMetrics()
    router(MemoryTransport(), sink=sink).route([donation()], source="business")
    assert metrics.AUDIT_RECORDS_LOST not in sink.totals
    assert sink.calls == 1  # the valid call's metrics are as before: one line


def test_the_lost_audit_metric_is_an_emf_line_of_the_environment() -> None:
    out = io.StringIO()
    built = Router(
        table=default_routing_table(),
        transports=[MemoryTransport()],
        cipher=LocalCipher(),
        audit=MemoryAuditSink(available=False),
        environment="prod",
        metrics=EmfMetrics(environment="prod", emitted_by="router", stream=out),
    )
    built.refuse_request(reason="malformed_request", source="media")
    (line,) = out.getvalue().splitlines()
    document = json.loads(line)
    (directive,) = document["_aws"]["CloudWatchMetrics"]
    assert (directive["Namespace"], directive["Dimensions"]) == (
        metrics.NAMESPACE,
        [[metrics.DIMENSION]],
    )
    assert directive["Metrics"] == [{"Name": "AuditRecordsLost", "Unit": "Count"}]
    assert (document["Environment"], document["AuditRecordsLost"]) == ("prod", 1)
    assert document["emitted_by"] == "router"
