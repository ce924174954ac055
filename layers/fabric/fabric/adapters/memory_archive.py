"""In-memory ArchiveReader (``fabric.replay``): objects by key, the test double of the bucket."""

from __future__ import annotations

from dataclasses import dataclass, field

from fabric.errors import TransportUnavailable


@dataclass
class MemoryArchive:
    """Objects in ``objects`` (key to bytes); ``delete_markers``, the keys a delete marker hides
    (none unless a test puts them there); ``available=False`` makes every call fail as an
    unreachable bucket would, and ``reads`` counts the objects read."""

    objects: dict[str, bytes] = field(default_factory=dict)
    delete_markers: set[str] = field(default_factory=set)
    available: bool = True
    reads: int = 0

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` (replacing it: the newest version is the one read)."""
        self.objects[key] = data

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, in key order.

        Raises:
            TransportUnavailable: when not available.
        """
        self._check()
        return sorted(key for key in self.objects if key.startswith(prefix))

    def deleted(self, prefix: str, *, after: str = "") -> list[str]:
        """The keys under ``prefix`` (after ``after``) behind a delete marker, in key order.

        Raises:
            TransportUnavailable: when not available.
        """
        self._check()
        return sorted(k for k in self.delete_markers if k.startswith(prefix) and k > after)

    def read(self, key: str) -> bytes | None:
        """The object at ``key``, or None.

        Raises:
            TransportUnavailable: when not available.
        """
        self._check()
        self.reads += 1
        return self.objects.get(key)

    def _check(self) -> None:
        if not self.available:
            raise TransportUnavailable("the archive is unavailable")
