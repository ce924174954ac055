"""Audit records: one per state change of a message, metadata and a body hash, never plaintext."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from fabric.envelope import format_timestamp

AUDIT_BATCH_VERSION = "fabric.audit-batch/1"


class AuditEvent(StrEnum):
    """The state changes the audit trail records."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    ROUTED = "routed"
    FALLBACK = "fallback"
    DRAINED = "drained"
    RETRIED = "retried"
    DEAD_LETTERED = "dead-lettered"
    REDRIVEN = "redriven"
    REPLAYED = "replayed"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One state change of one message.

    ``body_sha256`` is the hash of the bytes the fabric stored (the wire envelope, with restricted
    payloads already encrypted), or of the raw input for a rejection; the body itself is never in
    the record. ``message_id`` is None only for input that carried no valid id.
    """

    event: AuditEvent
    at: datetime
    message_id: str | None
    source: str
    topic: str | None = None
    body_sha256: str | None = None
    reason: str | None = None
    transport: str | None = None
    classification: str | None = None
    priority: str | None = None
    groups: tuple[str, ...] = ()
    encrypted: bool = False

    def to_dict(self) -> dict[str, object]:
        """The record as a JSON object, absent fields omitted."""
        out: dict[str, object] = {
            "event": str(self.event),
            "at": format_timestamp(self.at),
            "message_id": self.message_id,
            "source": self.source,
        }
        optional = {
            "topic": self.topic,
            "body_sha256": self.body_sha256,
            "reason": self.reason,
            "transport": self.transport,
            "classification": self.classification,
            "priority": self.priority,
        }
        out.update({key: value for key, value in optional.items() if value is not None})
        if self.groups:
            out["groups"] = list(self.groups)
        if self.encrypted:
            out["encrypted"] = True
        return out


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def encode_audit_batch(records: list[AuditRecord], *, emitted_by: str) -> bytes:
    """Many records as one message body: auditing costs one publish per batch, not per message."""
    return json.dumps(
        {
            "version": AUDIT_BATCH_VERSION,
            "emitted_by": emitted_by,
            "emitted_at": format_timestamp(datetime.now(UTC)),
            "records": [record.to_dict() for record in records],
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode("utf-8")


def decode_audit_batch(body: bytes) -> list[dict[str, object]]:
    """The records of an audit batch message, each with the batch's ``emitted_by``.

    Raises:
        ValueError: the body is not a ``fabric.audit-batch/1`` document.
    """
    document = json.loads(body)
    if not isinstance(document, dict) or document.get("version") != AUDIT_BATCH_VERSION:
        raise ValueError("not a fabric.audit-batch/1 document")
    records = document.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("an audit batch holds a list of record objects")
    return [{**record, "emitted_by": document.get("emitted_by")} for record in records]
