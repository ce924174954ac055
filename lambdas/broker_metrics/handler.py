"""Broker metrics Lambda: every minute, the depth of the broker's dead-letter, overflow and audit
queues as CloudWatch metrics, for the dead-letter and audit backlog alarms
(``fabric.broker_depth``)."""

from __future__ import annotations

from typing import Any

from fabric.bootstrap import broker_metrics_from_environment

MONITOR = broker_metrics_from_environment()


def handler(_event: Any, _context: Any) -> dict[str, Any]:
    """A scheduled event (or any event) → ``{"depths": {queue: messages}, "missing": [queues
    the API does not list], "unsampled": [queues without statistics yet]}``.

    Raises:
        ManagementApiError, TransportUnavailable: the broker's management API or Secrets
            Manager cannot be reached; the run fails (the function's ``Errors`` alarm) and
            publishes nothing (the ``BrokerMetricsUnmeasured`` alarm).
    """
    report = MONITOR.run()
    return {
        "depths": dict(report.depths),
        "missing": list(report.missing),
        "unsampled": list(report.unsampled),
    }
