"""An AuditSink that sends each batch of audit records as one message through a Transport."""

from __future__ import annotations

from collections.abc import Sequence

from fabric.audit import AuditRecord, encode_audit_batch
from fabric.envelope import new_message_id
from fabric.ports import MessageKind, OutboundMessage, Transport

AUDIT_TOPIC = "fabric.audit.records"


class TransportAuditSink:
    """Publishes audit batches on the audit path of ``transports`` (tried in order)."""

    def __init__(self, transports: Sequence[Transport], *, emitted_by: str) -> None:
        self._transports = tuple(transports)
        self._emitted_by = emitted_by

    def emit(self, records: Sequence[AuditRecord]) -> bool:
        """One message for all ``records``; True once a transport confirmed it stored."""
        message = OutboundMessage(
            message_id=new_message_id(),
            topic=AUDIT_TOPIC,
            body=encode_audit_batch(list(records), emitted_by=self._emitted_by),
            audience=frozenset(),
            kind=MessageKind.AUDIT,
        )
        return any(transport.publish([message])[0].stored for transport in self._transports)
