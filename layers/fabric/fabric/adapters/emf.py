"""Metrics as CloudWatch Embedded Metric Format: one JSON line on stdout per publication.

Lambda sends stdout to CloudWatch Logs, which extracts the metrics: no API call on the message
path, no extra IAM permission, and nothing to fail or wait for when CloudWatch is slow.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from fabric.metrics import DIMENSION, NAMESPACE

_LOG = logging.getLogger(__name__)


class EmfMetrics:
    """Publishes counts under ``MessagingFabric`` with ``Environment=<environment>``.

    ``emitted_by`` (``router``, ``drain``) goes into the line as a plain property, so logs can be
    searched by component without it becoming a metric dimension.
    """

    def __init__(
        self,
        *,
        environment: str,
        emitted_by: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._environment = environment
        self._emitted_by = emitted_by
        self._stream = stream
        self._clock = clock

    def count(self, counts: Mapping[str, int]) -> None:
        """Write one EMF document holding ``counts``."""
        if not counts:
            return
        document = {
            "_aws": {
                "Timestamp": int(self._clock() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": NAMESPACE,
                        "Dimensions": [[DIMENSION]],
                        "Metrics": [{"Name": name, "Unit": "Count"} for name in counts],
                    }
                ],
            },
            DIMENSION: self._environment,
            "emitted_by": self._emitted_by,
            **counts,
        }
        try:
            print(json.dumps(document, separators=(",", ":")), file=self._stream or sys.stdout)
        except (OSError, ValueError):  # a closed or broken stdout must not fail a publish
            _LOG.warning("metrics could not be written")
