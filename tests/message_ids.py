"""Message ids for test fixtures: a readable label made into a fabric message id."""

from __future__ import annotations

import uuid

# Any fixed namespace: only the same label giving the same id matters.
_NAMESPACE = uuid.UUID("6f0c3a52-6a4e-4d35-9a54-1b0e2f6c7d81")


def msg_id(label: str) -> str:
    """The message id named ``label``: a UUID in the router's canonical form (lowercase), the
    same for the same label. The fabric records only such ids; a label like ``"m-1"`` is not
    one, and its audit records would hold no id at all."""
    return str(uuid.uuid5(_NAMESPACE, label))
