"""Broker queue depths: measured from one queue listing, published as EMF, configured from the
environment; and the topology's monitor user that reads them."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any

import pytest

from fabric.adapters.broker_metrics import EmfDepthMetrics, MemoryDepthMetrics
from fabric.adapters.memory_management import MemoryManagementClient
from fabric.broker_depth import BrokerDepthMonitor, DepthReport, measure
from fabric.errors import ConfigError, ManagementRequestRejected
from fabric.routing import default_routing_table
from fabric.settings import BrokerMetricsSettings
from fabric.topology import MONITOR_USER, OVERFLOW_QUEUE, definitions

VHOST = "/"
QUEUES = ["fabric.media.dlq", "fabric.media.emergency.dlq", OVERFLOW_QUEUE]


class CountingLister:
    """A ``QueueLister`` over the in-memory management API that counts the calls."""

    def __init__(self, api: MemoryManagementClient) -> None:
        self.api = api
        self.calls = 0

    def list_queues(self, vhost: str) -> list[dict[str, Any]]:
        self.calls += 1
        return self.api.list_queues(vhost)


@pytest.fixture
def broker() -> MemoryManagementClient:
    api = MemoryManagementClient()
    api.put_vhost(VHOST)
    for name in (*QUEUES, "fabric.media"):
        api.put_queue(VHOST, name, durable=True, auto_delete=False, arguments={})
    return api


def test_each_queue_gets_the_depth_the_broker_reports_from_one_listing(
    broker: MemoryManagementClient,
) -> None:
    broker.set_messages(VHOST, "fabric.media.dlq", 7)
    broker.set_messages(VHOST, "fabric.media", 900)  # a work queue: not asked for
    lister = CountingLister(broker)

    report = measure(lister, VHOST, QUEUES)

    assert report == DepthReport(
        depths={"fabric.media.dlq": 7, "fabric.media.emergency.dlq": 0, OVERFLOW_QUEUE: 0}
    )
    assert report.unmeasured == 0
    assert lister.calls == 1


def test_a_deleted_queue_and_one_without_statistics_are_unmeasured_not_empty(
    broker: MemoryManagementClient,
) -> None:
    broker.delete_queue(VHOST, "fabric.media.emergency.dlq")
    broker.set_messages(VHOST, OVERFLOW_QUEUE, None)

    report = measure(broker, VHOST, QUEUES)

    assert report.depths == {"fabric.media.dlq": 0}
    assert report.missing == ("fabric.media.emergency.dlq",)
    assert report.unsampled == (OVERFLOW_QUEUE,)
    assert report.unmeasured == 2


def test_a_run_publishes_its_report_and_names_what_it_could_not_measure(
    broker: MemoryManagementClient, caplog: pytest.LogCaptureFixture
) -> None:
    broker.delete_queue(VHOST, OVERFLOW_QUEUE)
    metrics = MemoryDepthMetrics()
    monitor = BrokerDepthMonitor(api=broker, metrics=metrics, vhost=VHOST, queues=QUEUES)

    with caplog.at_level(logging.WARNING):
        report = monitor.run()

    assert metrics.published == [report]
    assert report.missing == (OVERFLOW_QUEUE,)
    assert OVERFLOW_QUEUE in caplog.text


def test_a_vhost_the_api_does_not_know_fails_the_run_and_publishes_nothing() -> None:
    metrics = MemoryDepthMetrics()
    monitor = BrokerDepthMonitor(
        api=MemoryManagementClient(), metrics=metrics, vhost="fabric-gone", queues=QUEUES
    )

    with pytest.raises(ManagementRequestRejected):
        monitor.run()

    assert metrics.published == []


@pytest.mark.parametrize("queues", [[], ["fabric.media.dlq", "fabric.media.dlq"]])
def test_the_queues_to_measure_are_a_list_without_repeats(queues: list[str]) -> None:
    with pytest.raises(ValueError, match="non-empty list without repeats"):
        BrokerDepthMonitor(
            api=MemoryManagementClient(), metrics=MemoryDepthMetrics(), vhost=VHOST, queues=queues
        )


def test_emf_lines_carry_each_depth_by_environment_and_queue_and_the_unmeasured_count() -> None:
    stream = io.StringIO()
    EmfDepthMetrics(environment="prod", stream=stream, clock=lambda: 1_700_000_000.5).publish(
        DepthReport(depths={"fabric.media.dlq": 4, OVERFLOW_QUEUE: 0}, missing=("fabric.x",))
    )

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]

    assert len(lines) == 3
    for line in lines:
        (directive,) = line["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == "MessagingFabric/Broker"
        assert line["_aws"]["Timestamp"] == 1_700_000_000_500
        assert line["Environment"] == "prod"
    depths = {line["Queue"]: line["QueueDepth"] for line in lines if "QueueDepth" in line}
    assert depths == {"fabric.media.dlq": 4, OVERFLOW_QUEUE: 0}
    (summary,) = [line for line in lines if "QueuesUnmeasured" in line]
    assert summary["QueuesUnmeasured"] == 1
    assert summary["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Environment"]]
    assert summary["_aws"]["CloudWatchMetrics"][0]["Metrics"] == [
        {"Name": "QueuesUnmeasured", "Unit": "Count"}
    ]
    (queue_line, *_) = [line for line in lines if "QueueDepth" in line]
    assert queue_line["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Environment", "Queue"]]


def test_a_closed_stdout_does_not_fail_the_run() -> None:
    stream = io.StringIO()
    stream.close()
    EmfDepthMetrics(environment="prod", stream=stream).publish(DepthReport(depths={}))


ENVIRON = {
    "FABRIC_ENV": "prod",
    "MANAGEMENT_URL": "https://b-1.mq.ap-southeast-3.amazonaws.com",
    "MONITOR_SECRET_ARN": "arn:aws:secretsmanager:ap-southeast-3:1:secret:monitor",
    "BROKER_DEPTH_QUEUES": json.dumps(QUEUES),
}


def test_settings_come_from_the_stacks_variables() -> None:
    settings = BrokerMetricsSettings.from_env(ENVIRON)

    assert settings.queues == tuple(QUEUES)
    assert settings.vhost == "/"
    assert BrokerMetricsSettings.from_env({**ENVIRON, "RABBITMQ_VHOST": "v"}).vhost == "v"


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("BROKER_DEPTH_QUEUES", "fabric.media.dlq", "JSON list of queue names"),
        ("BROKER_DEPTH_QUEUES", '{"q": 1}', "JSON list of queue names"),
        ("BROKER_DEPTH_QUEUES", '["a", ""]', "JSON list of queue names"),
        ("BROKER_DEPTH_QUEUES", "[]", "at least one queue, each once"),
        ("BROKER_DEPTH_QUEUES", '["a", "a"]', "at least one queue, each once"),
        ("MONITOR_SECRET_ARN", "", "MONITOR_SECRET_ARN is required"),
        ("MANAGEMENT_URL", " ", "MANAGEMENT_URL is required"),
    ],
)
def test_bad_settings_name_the_variable(name: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        BrokerMetricsSettings.from_env({**ENVIRON, name: value})


def test_the_topology_has_a_monitor_user_that_may_touch_no_queue_or_exchange() -> None:
    document = definitions(default_routing_table(), vhost="/")

    (user,) = [u for u in document["users"] if u["name"] == MONITOR_USER]
    (permission,) = [p for p in document["permissions"] if p["user"] == MONITOR_USER]

    # `management`, not `monitoring` (every vhost's connections) nor `administrator`.
    assert user["tags"] == ["management"]
    assert {permission[k] for k in ("configure", "write", "read")} == {"^$"}
    names = [q["name"] for q in document["queues"]] + [e["name"] for e in document["exchanges"]]
    # The default exchange is checked as `amq.default`: "^$" matches no resource at all.
    assert not any(re.search(permission["read"], name) for name in [*names, "amq.default"])
