"""An AuditSink that sends audit records, and the bodies they name, through Transports.

One message per call where it fits. A transport with a message size limit (the SQS audit queue:
256 KiB) gets the batch split into messages under its limit; a body that cannot fit in one
message even alone is left out, and its records say ``archived: false`` (the message itself is
stored either way: only the archive copy for replay is missing, and the report counts it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence

from fabric.audit import AuditRecord, encode_audit_batch
from fabric.envelope import new_message_id
from fabric.ports import MessageKind, OutboundMessage, Transport

AUDIT_TOPIC = "fabric.audit.records"
# Room in a message for the batch's own fields and JSON punctuation.
_ENVELOPE_ROOM = 1024

_LOG = logging.getLogger(__name__)


class TransportAuditSink:
    """Publishes audit batches on the audit path of ``transports`` (tried in order)."""

    def __init__(self, transports: Sequence[Transport], *, emitted_by: str) -> None:
        self._transports = tuple(transports)
        self._emitted_by = emitted_by

    def emit(
        self, records: Sequence[AuditRecord], bodies: Mapping[str, bytes] | None = None
    ) -> bool:
        """True once a transport confirmed every part of the batch stored."""
        waiting = [(list(records), dict(bodies or {}))]
        for transport in self._transports:
            limit = getattr(transport, "max_message_bytes", None)
            parts = [part for batch in waiting for part in _split(*batch, limit=limit)]
            messages = [
                self._message(part_records, part_bodies) for part_records, part_bodies in parts
            ]
            outcomes = transport.publish(messages)
            waiting = [
                part for part, outcome in zip(parts, outcomes, strict=True) if not outcome.stored
            ]
            if not waiting:
                return True
        return False

    def _message(self, records: list[AuditRecord], bodies: dict[str, bytes]) -> OutboundMessage:
        return OutboundMessage(
            message_id=new_message_id(),
            topic=AUDIT_TOPIC,
            body=encode_audit_batch(records, emitted_by=self._emitted_by, bodies=bodies),
            audience=frozenset(),
            kind=MessageKind.AUDIT,
        )


def _split(
    records: list[AuditRecord], bodies: dict[str, bytes], *, limit: int | None
) -> list[tuple[list[AuditRecord], dict[str, bytes]]]:
    """``records`` with their bodies as parts whose encoded size stays under ``limit``."""
    if limit is None:
        return [(records, bodies)]
    budget = limit - _ENVELOPE_ROOM
    parts: list[tuple[list[AuditRecord], dict[str, bytes]]] = []
    part_records: list[AuditRecord] = []
    part_bodies: dict[str, bytes] = {}
    used = 0
    for original in records:
        record = original
        body = bodies.get(record.body_sha256 or "")
        if body is not None and record.body_sha256 in part_bodies:
            body = None  # already in this part
        size = _record_size(record) + (_body_size(body) if body is not None else 0)
        if size > budget and body is not None:
            _LOG.warning("a stored body of %d bytes does not fit an audit message", len(body))
            record, body = dataclasses.replace(record, archived=False), None
            size = _record_size(record)
        if part_records and used + size > budget:
            parts.append((part_records, part_bodies))
            part_records, part_bodies, used = [], {}, 0
        part_records.append(record)
        if body is not None and record.body_sha256 is not None:
            part_bodies[record.body_sha256] = body
        used += size
    if part_records:
        parts.append((part_records, part_bodies))
    return parts


def _record_size(record: AuditRecord) -> int:
    return len(json.dumps(record.to_dict(), separators=(",", ":"))) + 1  # and its comma


def _body_size(body: bytes) -> int:
    return 4 * ((len(body) + 2) // 3) + 72 + 6  # base64, the 64-hex key, quotes and punctuation
