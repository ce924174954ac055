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
        ValueError: anything else, booleans, NaN, infinity and integers beyond a double included.
    """
    value = event.get(name)
    if value is None:
        return None
    problem = ValueError(f"{name} must be a positive number")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise problem
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a double
        raise problem from None
    if not math.isfinite(number) or number <= 0:
        raise problem
    return number
