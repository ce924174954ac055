"""Audit writer Lambda: audit batches from RabbitMQ's audit queue (Amazon MQ event source) and
the SQS audit queue into the Object Lock bucket; an hourly checkpoint."""

from __future__ import annotations

import os
from typing import Any

from fabric.adapters.emf import EmfMetrics
from fabric.audit_writer import batches_from_event
from fabric.bootstrap import audit_writer_from_environment
from fabric.metrics import AUDIT_BATCHES_REFUSED
from fabric.settings import AuditWriterSettings

WRITER = audit_writer_from_environment()
SETTINGS = AuditWriterSettings.from_env(os.environ)
METRICS = EmfMetrics(environment=SETTINGS.environment, emitted_by="audit-writer")


def handler(event: dict[str, Any], _context: Any) -> dict[str, Any]:
    """``{"checkpoint": true}`` (the hourly schedule) → ``{"checkpoint": key}``; an Amazon MQ or
    SQS event → ``{"object", "records", "duplicate_batches", "archived", "refused"}`` (one
    object for the whole event; ``refused``: batches written as a ``refused-batch`` or
    ``unreadable-batch`` record, also counted as the EMF metric ``AuditBatchesRefused``);
    anything else → ``{"error": ...}``.

    A failure to store raises, so the event source delivers the whole event again; the writer
    drops batches it already wrote. So does a chain state behind the trail
    (``fabric.audit_writer.ChainBehindTrail``: nothing is stored over what the bucket holds,
    the batches are not marked written, and an operator rebuilds the state: docs/runbook.md).
    A message that cannot be read, for whatever reason, never fails the event: it is written
    as one ``unreadable-batch`` or ``refused-batch`` record in its place
    (``fabric.audit_writer.batches_from_event``).
    """
    if isinstance(event, dict) and event.get("checkpoint") is True:
        return {"checkpoint": WRITER.checkpoint()}
    try:
        batches = batches_from_event(
            event if isinstance(event, dict) else {},
            trusted=SETTINGS.trusted_publishers,
            environment=SETTINGS.environment,
        )
    except ValueError as exc:
        return {"error": str(exc)}
    written = WRITER.write(batches)
    if written.refused:  # written only when it happens, like AuditRecordsLost
        METRICS.count({AUDIT_BATCHES_REFUSED: written.refused})
    return {
        "object": written.key,
        "records": written.records,
        "duplicate_batches": written.duplicate_batches,
        "archived": written.archived,
        "refused": written.refused,
    }
