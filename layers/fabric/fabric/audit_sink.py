"""An AuditSink that sends audit records, and the bodies they name, through Transports.

One message per call where it fits. A batch is split into messages under the smallest limit of
its paths: the SQS audit queue's 256 KiB, or 1 MiB elsewhere (RabbitMQ: the audit writer's
Amazon MQ event source hands it messages base64-encoded in an invocation payload of at most
6 MB, so no single audit message may come near that). A body that cannot fit in one message
even alone is left out, and its records say ``archived: false`` (the message itself is stored
either way: only the archive copy for replay is missing, and the report counts it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

from fabric.audit import AuditRecord, assemble_audit_batch, encode_body, encode_record
from fabric.audit_writer import CONSUMER_NAME
from fabric.envelope import new_message_id
from fabric.ports import MessageKind, OutboundMessage, PreparedAudit, Transport

AUDIT_TOPIC = "fabric.audit.records"
DEFAULT_MESSAGE_BYTES = 1_048_576  # a transport without its own max_message_bytes
# Room in a message for the batch's own fields and JSON punctuation.
_ENVELOPE_ROOM = 1024

_LOG = logging.getLogger(__name__)


class TransportAuditSink:
    """Publishes audit batches on the audit path of ``transports`` (tried in order)."""

    def __init__(self, transports: Sequence[Transport], *, emitted_by: str) -> None:
        """``emitted_by`` names the component in every batch.

        Raises:
            ValueError: ``emitted_by`` is not a consumer name (``fabric.audit_writer.
                CONSUMER_NAME``: at most 64 of A-Z a-z 0-9 . _ : -). The writer would refuse
                every batch of a stakeholder's consumer named so, after the broker confirmed it,
                and its records would be lost while ``emit`` said stored.
        """
        if not CONSUMER_NAME.fullmatch(emitted_by):
            raise ValueError("emitted_by is at most 64 of A-Z a-z 0-9 . _ : - (no spaces)")
        self._transports = tuple(transports)
        self._emitted_by = emitted_by
        # Split for the smallest limit: every part fits every path, so a part keeps its batch id
        # from one path to the next, and the writer drops a copy a timed-out path did store.
        self._limit = min(
            getattr(transport, "max_message_bytes", DEFAULT_MESSAGE_BYTES)
            for transport in self._transports
        )

    def prepare(
        self, records: Sequence[AuditRecord], bodies: Mapping[str, bytes] | None = None
    ) -> PreparedAudit:
        """The batch's messages, encoded and split, for a later ``emit`` of the same objects."""
        bodies = bodies or {}
        encoded = {digest: encode_body(body) for digest, body in bodies.items()}
        messages = [
            self._message(part_records, part_bodies)
            for part_records, part_bodies in _split(list(records), encoded, limit=self._limit)
        ]
        return PreparedAudit(records, bodies, messages)

    def emit(
        self,
        records: Sequence[AuditRecord],
        bodies: Mapping[str, bytes] | None = None,
        *,
        prepared: PreparedAudit | None = None,
    ) -> bool:
        """True once a transport confirmed every part of the batch stored."""
        if prepared is None or not prepared.made_from(records, bodies or {}):
            prepared = self.prepare(records, bodies)
        return self.emit_each([prepared])[0]

    def emit_each(self, batches: Sequence[PreparedAudit]) -> list[bool]:
        """Publishes the parts of ``batches`` (prepared here) together on the first path, what
        it did not store on the next; whether each batch had every part stored, in order."""
        waiting = [(index, part) for index, batch in enumerate(batches) for part in batch.encoded]
        for transport in self._transports:
            if not waiting:
                break
            outcomes = transport.publish([part for _, part in waiting])
            waiting = [
                pair for pair, outcome in zip(waiting, outcomes, strict=True) if not outcome.stored
            ]
        refused = {index for index, _ in waiting}
        return [index not in refused for index in range(len(batches))]

    def _message(self, records: list[bytes], bodies: dict[str, bytes]) -> OutboundMessage:
        return OutboundMessage(
            message_id=new_message_id(),
            topic=AUDIT_TOPIC,
            body=assemble_audit_batch(records, emitted_by=self._emitted_by, bodies=bodies),
            audience=frozenset(),
            kind=MessageKind.AUDIT,
        )


def _split(
    records: list[AuditRecord], bodies: dict[str, bytes], *, limit: int
) -> list[tuple[list[bytes], dict[str, bytes]]]:
    """The records, encoded, with the (base64) bodies they name, as parts whose encoded size
    stays under ``limit``; each record is encoded once."""
    budget = limit - _ENVELOPE_ROOM
    parts: list[tuple[list[bytes], dict[str, bytes]]] = []
    part_records: list[bytes] = []
    part_bodies: dict[str, bytes] = {}
    used = 0
    for record in records:
        digest = record.body_sha256 or ""
        body = bodies.get(digest) if digest not in part_bodies else None
        encoded = encode_record(record)
        size = len(encoded) + 1 + (len(body) + len(digest) + 6 if body is not None else 0)
        if size > budget and body is not None:
            _LOG.warning(
                "a stored body of %d base64 bytes does not fit an audit message", len(body)
            )
            encoded, body = encode_record(dataclasses.replace(record, archived=False)), None
            size = len(encoded) + 1
        if part_records and used + size > budget:
            parts.append((part_records, part_bodies))
            part_records, part_bodies, used = [], {}, 0
        part_records.append(encoded)
        if body is not None:
            part_bodies[digest] = body
        used += size
    if part_records:
        parts.append((part_records, part_bodies))
    return parts
