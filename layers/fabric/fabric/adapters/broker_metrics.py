"""Adapters of ``fabric.broker_depth``: the queue listing as the monitor user of a secret, and
the depths as CloudWatch Embedded Metric Format lines (or in memory, for tests)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from fabric.adapters.management import ManagementClient
from fabric.broker_depth import (
    ENVIRONMENT_DIMENSION,
    NAMESPACE,
    QUEUE_DEPTH,
    QUEUE_DIMENSION,
    QUEUES_UNMEASURED,
    DepthReport,
)
from fabric.errors import ManagementRequestRejected

_LOG = logging.getLogger(__name__)

_UNAUTHORIZED = 401


class SecretQueueLister:
    """Lists a vhost's queues through the management API as the user whose ``(username,
    password)`` ``credentials`` returns (``fabric.adapters.secrets.SecretCredentials``).

    A 401 makes it ``forget`` the pair and try once more with the one read again: the rotation
    changed the password (a warm function would otherwise fail every run for the rest of its
    life, each failure an ``Errors`` alarm).
    """

    def __init__(
        self,
        base_url: str,
        credentials: Callable[[], tuple[str, str]],
        forget: Callable[[], None],
        *,
        timeout: float = 10.0,
    ) -> None:
        self._base_url = base_url
        self._credentials = credentials
        self._forget = forget
        self._timeout = timeout

    def list_queues(self, vhost: str) -> list[dict[str, Any]]:
        """The vhost's queues (``ManagementClient.list_queues``).

        Raises:
            ManagementApiError: the API cannot be reached, or refused the request (a 401 also
                after the credentials were read again).
            TransportUnavailable: Secrets Manager cannot be reached.
        """
        try:
            return self._client().list_queues(vhost)
        except ManagementRequestRejected as exc:
            if exc.status != _UNAUTHORIZED:
                raise
            _LOG.info("management API refused the monitor's credentials; reading them again")
            self._forget()
            return self._client().list_queues(vhost)

    def _client(self) -> ManagementClient:
        username, password = self._credentials()
        return ManagementClient(self._base_url, username, password, timeout=self._timeout)


class EmfDepthMetrics:
    """Writes a run's depths as EMF lines on stdout (Lambda's log, from which CloudWatch takes
    the metrics): one line per measured queue (``QueueDepth``, dimensions ``Environment`` and
    ``Queue``) and one with ``QueuesUnmeasured`` (dimension ``Environment``). No API call and
    no IAM permission, like ``fabric.adapters.emf``."""

    def __init__(
        self,
        *,
        environment: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._environment = environment
        self._stream = stream
        self._clock = clock

    def publish(self, report: DepthReport) -> None:
        """Write the lines; a closed or broken stdout is logged, not raised."""
        timestamp = int(self._clock() * 1000)
        lines = [
            self._document(
                timestamp,
                [ENVIRONMENT_DIMENSION, QUEUE_DIMENSION],
                {QUEUE_DIMENSION: queue, QUEUE_DEPTH: depth},
                QUEUE_DEPTH,
            )
            for queue, depth in sorted(report.depths.items())
        ]
        lines.append(
            self._document(
                timestamp,
                [ENVIRONMENT_DIMENSION],
                {QUEUES_UNMEASURED: report.unmeasured},
                QUEUES_UNMEASURED,
            )
        )
        try:
            print("\n".join(lines), file=self._stream or sys.stdout)
        except (OSError, ValueError):
            _LOG.warning("broker depth metrics could not be written")

    def _document(
        self, timestamp: int, dimensions: list[str], values: dict[str, Any], metric: str
    ) -> str:
        document = {
            "_aws": {
                "Timestamp": timestamp,
                "CloudWatchMetrics": [
                    {
                        "Namespace": NAMESPACE,
                        "Dimensions": [dimensions],
                        "Metrics": [{"Name": metric, "Unit": "Count"}],
                    }
                ],
            },
            ENVIRONMENT_DIMENSION: self._environment,
            "emitted_by": "broker-metrics",
            **values,
        }
        return json.dumps(document, separators=(",", ":"))


class MemoryDepthMetrics:
    """Keeps every published report in ``published``, oldest first (the test double)."""

    def __init__(self) -> None:
        self.published: list[DepthReport] = []

    def publish(self, report: DepthReport) -> None:
        """Record ``report``."""
        self.published.append(report)
