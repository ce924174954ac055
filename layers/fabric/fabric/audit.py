"""Audit records: one per state change of a message, metadata and a body hash, never plaintext."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from fabric.envelope import format_timestamp
from fabric.jsoncodec import canonical_json_unchecked

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
    DELIVERED = "delivered"


@dataclass(slots=True)
class AuditRecord:
    """One state change of one message.

    ``body_sha256`` is the hash of the bytes the fabric stored (the wire envelope, with restricted
    payloads already encrypted); a rejection, which stored nothing, has none (the hash of its
    input would be a hash of a child's data). The body itself is never in the record.
    ``message_id`` is None only for input that carried no valid id.

    Treat a record as immutable (``encoded`` keeps its JSON; ``dataclasses.replace`` makes a
    changed copy). It is not a frozen dataclass only because the router builds two records a
    message and a frozen one costs a ``object.__setattr__`` call per field: 12 % of the router's
    instructions per message (``scripts/router_instructions.py``).
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
    queues: tuple[str, ...] = ()
    attempt: int | None = None
    replay_id: str | None = None
    archived: bool | None = None
    # The canonical JSON, computed once (see ``encoded``). Not an init field, so
    # ``dataclasses.replace`` starts without it.
    _encoded: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def encoded(self) -> bytes:
        """The record's canonical JSON, as an audit batch carries it (computed once)."""
        if self._encoded is None:
            self._encoded = canonical_json_unchecked(self.to_dict())
        return self._encoded

    def to_dict(self) -> dict[str, object]:
        """The record as a JSON object, absent fields omitted."""
        out: dict[str, object] = {
            "event": str(self.event),
            "at": format_timestamp(self.at),
            "message_id": self.message_id,
            "source": self.source,
        }
        # Plain ifs, not a dict of optional fields filtered: the router builds two records a
        # message, so this is on its hottest path.
        if self.topic is not None:
            out["topic"] = self.topic
        if self.body_sha256 is not None:
            out["body_sha256"] = self.body_sha256
        if self.reason is not None:
            out["reason"] = self.reason
        if self.transport is not None:
            out["transport"] = self.transport
        if self.classification is not None:
            out["classification"] = self.classification
        if self.priority is not None:
            out["priority"] = self.priority
        if self.attempt is not None:
            out["attempt"] = self.attempt
        if self.replay_id is not None:
            out["replay_id"] = self.replay_id
        if self.archived is not None:
            out["archived"] = self.archived
        if self.groups:
            out["groups"] = list(self.groups)
        if self.queues:
            out["queues"] = list(self.queues)
        if self.encrypted:
            out["encrypted"] = True
        return out


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class AuditBatch:
    """A decoded audit batch: its records, each with the batch's ``emitted_by``, and the stored
    bodies it carries for the archive (SHA-256 hex to bytes)."""

    records: list[dict[str, object]]
    bodies: dict[str, bytes] = field(default_factory=dict)


def encode_audit_batch(
    records: list[AuditRecord],
    *,
    emitted_by: str,
    bodies: Mapping[str, bytes] | None = None,
) -> bytes:
    """Many records as one message body: auditing costs one publish per batch, not per message.

    ``bodies`` (SHA-256 hex to the stored bytes) travel beside the records, base64-encoded, for
    the archive replay reads; the records themselves hold only the hash.
    """
    return assemble_audit_batch(
        [encode_record(record) for record in records],
        emitted_by=emitted_by,
        bodies={digest: encode_body(body) for digest, body in (bodies or {}).items()},
    )


def encode_record(record: AuditRecord) -> bytes:
    """A record's canonical JSON, as an audit batch carries it."""
    return record.encoded()


def encode_body(body: bytes) -> bytes:
    """A stored body as an audit batch carries it (base64)."""
    return base64.b64encode(body)


def assemble_audit_batch(
    records: Sequence[bytes], *, emitted_by: str, bodies: Mapping[str, bytes]
) -> bytes:
    """The ``fabric.audit-batch/1`` document of records and bodies already encoded
    (``encode_record``, ``encode_body``): the canonical JSON of the whole document, without
    encoding a record twice when a batch is sized and split.

    Written as one list of pieces joined once: a batch is up to a MiB, mostly bodies, and every
    intermediate ``bytes`` would copy all of it again.
    """
    pieces = [b"{"]
    if bodies:
        pieces.append(b'"bodies":{')
        for digest, body in sorted(bodies.items()):
            pieces += (canonical_json_unchecked(digest), b':"', body, b'",')
        pieces[-1] = b'"},'  # the last body's closing quote, and the object's end
    pieces += (
        b'"emitted_at":',
        canonical_json_unchecked(format_timestamp(datetime.now(UTC))),
        b',"emitted_by":',
        canonical_json_unchecked(emitted_by),
        b',"records":[',
        b",".join(records),
        b'],"version":',
        canonical_json_unchecked(AUDIT_BATCH_VERSION),
        b"}",
    )
    return b"".join(pieces)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: JSON syntax, but no number a reader can hold
        raise ValueError(f"{text} is out of range")
    return value


def decode_audit_batch(body: bytes) -> AuditBatch:
    """The records and bodies of an audit batch message.

    A body whose bytes do not hash to its key is left out: the archive holds only what the
    records' hashes prove.

    Raises:
        ValueError: the body is not a ``fabric.audit-batch/1`` document (in UTF-8).
    """
    # Decoded strictly here: json.loads would read bytes as UTF-16 or UTF-32 too, and with
    # "surrogatepass", so a lone surrogate in raw bytes would pass as text no UTF-8 can hold.
    text = body.decode("utf-8")
    document = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    if not isinstance(document, dict) or document.get("version") != AUDIT_BATCH_VERSION:
        raise ValueError("not a fabric.audit-batch/1 document")
    records = document.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("an audit batch holds a list of record objects")
    encoded = document.get("bodies") or {}
    if not isinstance(encoded, dict):
        raise ValueError("an audit batch's bodies are an object of hash to base64")
    bodies: dict[str, bytes] = {}
    for digest, text in encoded.items():
        try:
            data = base64.b64decode(str(text), validate=True)
        except binascii.Error:
            continue
        if sha256_hex(data) == digest:
            bodies[digest] = data
    emitted_by = document.get("emitted_by")
    return AuditBatch([{**record, "emitted_by": emitted_by} for record in records], bodies)
