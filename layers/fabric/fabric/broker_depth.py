"""Queue depths of the broker's dead-letter, overflow and audit queues, read from the management
API and published as the fabric's own metrics, which the broker dead-letter alarms and the audit
backlog alarm read.

Amazon MQ publishes no per-queue CloudWatch metrics for RabbitMQ 4 brokers, so the fabric
measures the queues it alarms on itself, the same way on every engine version: one
``GET /api/queues/<vhost>`` a run, as the ``fabric-monitor`` user (fabric.topology), and one
metric a queue, ``QueueDepth`` (ready + unacknowledged), in namespace ``MessagingFabric/Broker``
with dimensions ``Environment`` and ``Queue``.

Every run also publishes ``QueuesUnmeasured``: how many of the queues it was asked to measure
got no depth (the API does not list the queue, so it was deleted by hand, or lists it without
statistics yet). A run that fails publishes nothing; the alarm on ``QueuesUnmeasured`` treats
that silence as breaching, so the depth alarms are never blind without someone being told.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

_LOG = logging.getLogger(__name__)

NAMESPACE = "MessagingFabric/Broker"
ENVIRONMENT_DIMENSION = "Environment"
QUEUE_DIMENSION = "Queue"
QUEUE_DEPTH = "QueueDepth"
"""Messages in one queue, ready and unacknowledged (dimensions Environment, Queue)."""
QUEUES_UNMEASURED = "QueuesUnmeasured"
"""Queues of a run that got no depth: not listed by the API, or listed without statistics
(dimension Environment). Published by every run that reached the API, zeros too."""


class QueueLister(Protocol):
    """The management API's queue listing: ``fabric.adapters.management.ManagementClient`` and
    its in-memory double satisfy it."""

    def list_queues(self, vhost: str) -> list[dict[str, Any]]:
        """The vhost's queues, each with ``name`` and, once sampled, ``messages``.

        Raises:
            ManagementApiError: the API cannot be reached or refused the request.
        """
        ...


@dataclass(frozen=True)
class DepthReport:
    """One run's measurement: the depth of each measured queue, and the queues without one."""

    depths: Mapping[str, int]
    missing: tuple[str, ...] = ()
    """Queues the API does not list: deleted by hand, or the topology is not applied."""
    unsampled: tuple[str, ...] = ()
    """Queues the API lists without ``messages``: no statistics sample yet (a new queue)."""

    @property
    def unmeasured(self) -> int:
        """How many queues got no depth."""
        return len(self.missing) + len(self.unsampled)


class DepthMetrics(Protocol):
    """Where a run's depths go (``fabric.adapters.broker_metrics``: EMF lines, or memory)."""

    def publish(self, report: DepthReport) -> None:
        """Publish ``QueueDepth`` for each measured queue and ``QueuesUnmeasured``."""
        ...


def measure(api: QueueLister, vhost: str, queues: Sequence[str]) -> DepthReport:
    """The depth of each of ``queues`` in ``vhost``, from one listing of the vhost's queues.

    Raises:
        ManagementApiError: the API cannot be reached or refused the request (also a vhost that
            does not exist: 404).
    """
    listed = {str(item.get("name")): item for item in api.list_queues(vhost)}
    depths: dict[str, int] = {}
    missing: list[str] = []
    unsampled: list[str] = []
    for name in queues:
        item = listed.get(name)
        if item is None:
            missing.append(name)
            continue
        messages = item.get("messages")
        # bool is an int to Python; the API never sends one here, but a depth of True is not 1.
        if isinstance(messages, int) and not isinstance(messages, bool) and messages >= 0:
            depths[name] = messages
        else:
            unsampled.append(name)
    return DepthReport(depths=depths, missing=tuple(missing), unsampled=tuple(unsampled))


class BrokerDepthMonitor:
    """Measures the configured queues once per ``run`` and publishes what it found."""

    def __init__(
        self, *, api: QueueLister, metrics: DepthMetrics, vhost: str, queues: Sequence[str]
    ) -> None:
        """``queues``: the queues the dead-letter alarms watch (the stack passes the same list).

        Raises:
            ValueError: ``queues`` is empty or names a queue twice.
        """
        if not queues or len(set(queues)) != len(queues):
            raise ValueError("the queues to measure must be a non-empty list without repeats")
        self._api = api
        self._metrics = metrics
        self._vhost = vhost
        self._queues = tuple(queues)

    def run(self) -> DepthReport:
        """Measure, log what could not be measured, publish.

        Raises:
            ManagementApiError: the API cannot be reached or refused the request; nothing is
                published (the ``QueuesUnmeasured`` alarm reads the silence as breaching).
        """
        report = measure(self._api, self._vhost, self._queues)
        if report.missing:
            _LOG.warning(
                "broker depth: vhost %r has no queue %s (deleted by hand? the topology function's "
                "`topology diff` shows what is missing)",
                self._vhost,
                ", ".join(report.missing),
            )
        if report.unsampled:
            _LOG.warning(
                "broker depth: no statistics yet for %s in vhost %r",
                ", ".join(report.unsampled),
                self._vhost,
            )
        self._metrics.publish(report)
        return report
