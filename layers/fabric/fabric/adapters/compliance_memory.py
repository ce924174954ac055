"""In-memory stand-ins for the compliance report's ports (the audit bucket read back, the
reports bucket, the compliance topic) and an HMAC checkpoint signer, for unit tests."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from fabric.compliance_run import StoredObject


@dataclass
class MemoryTrailStore:
    """Objects by key with their lock; ``put`` stores (or replaces) one, ``delete`` hides one
    behind a delete marker as S3 does (its key is then neither listed nor read)."""

    objects: dict[str, StoredObject] = field(default_factory=dict)
    delete_markers: set[str] = field(default_factory=set)

    def put(
        self,
        key: str,
        data: bytes,
        *,
        lock_mode: str | None = "COMPLIANCE",
        retain_until: str | None = "2033-12-03T00:00:00Z",
    ) -> None:
        """Store ``data`` at ``key`` with that lock."""
        self.objects[key] = StoredObject(data, lock_mode, retain_until)

    def delete(self, key: str) -> None:
        """A DeleteObject without a version id: a delete marker on ``key``."""
        self.objects.pop(key, None)
        self.delete_markers.add(key)

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, in key order."""
        return sorted(key for key in self.objects if key.startswith(prefix))

    def deleted(self, prefix: str, *, after: str = "") -> list[str]:
        """The keys under ``prefix`` (after ``after``) that carry a delete marker."""
        return sorted(k for k in self.delete_markers if k.startswith(prefix) and k > after)

    def read(self, key: str) -> StoredObject | None:
        """The object at ``key``, or None."""
        return self.objects.get(key)


@dataclass
class MemoryReportStore:
    """Report files by key, with their content types."""

    bucket: str = "memory-reports"
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store one report file."""
        self.files[key] = (data, content_type)


@dataclass
class MemorySummaryTopic:
    """The summaries published, in order: (subject, message, attributes)."""

    published: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def publish(self, subject: str, message: str, attributes: Mapping[str, str]) -> None:
        """Record one summary."""
        self.published.append((subject, message, dict(attributes)))


@dataclass
class MemorySigner:
    """A ``fabric.audit_chain.Signer`` with an HMAC-SHA256 secret, for tests without KMS."""

    key_id: str = "memory-signer"
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def sign(self, message: bytes) -> bytes:
        """The HMAC of ``message``."""
        return hmac.digest(self.secret, message, "sha256")

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is the HMAC of ``message``."""
        return hmac.compare_digest(self.sign(message), signature)
