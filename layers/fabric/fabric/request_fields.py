"""Fields of the on-demand requests (redrive, replay): checked, with a message naming the field."""

from __future__ import annotations

import math


def strings(event: dict[str, object], name: str) -> list[str]:
    """``event[name]``: a list of non-empty strings (absent: empty).

    Raises:
        ValueError: anything else.
    """
    value = event.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a list of non-empty strings")
    return list(value)


def positive(event: dict[str, object], name: str) -> float | None:
    """``event[name]``: a positive finite number (absent: None).

    Raises:
        ValueError: anything else, booleans, NaN and infinity included.
    """
    value = event.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive number")
    return float(value)
