"""A redrive or replay request with an integer too large for a double is refused with a
message, never a crash of the function (``math.isfinite`` and ``float`` raise OverflowError)."""

from __future__ import annotations

from types import ModuleType

import pytest

from fabric import redrive, replay
from fabric.request_fields import positive
from tests.unit.test_replay_handler import replay_handler  # noqa: F401

HUGE = 10**400


@pytest.mark.parametrize("value", [HUGE, -HUGE, 10**309], ids=["10**400", "-10**400", "10**309"])
def test_positive_refuses_an_integer_beyond_a_double_with_a_value_error(value: int) -> None:
    with pytest.raises(ValueError, match="rate_per_s must be a positive number"):
        positive({"rate_per_s": value}, "rate_per_s")


def test_positive_still_takes_a_large_integer_a_double_holds() -> None:
    assert positive({"max_seconds": 10**308}, "max_seconds") == 1e308


@pytest.mark.parametrize("field", ["rate_per_s", "max_seconds", "older_than_s", "newer_than_s"])
def test_a_redrive_request_with_a_huge_integer_is_malformed(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be a positive number"):
        redrive.parse_request({"source": "sqs", "queue": "q", field: HUGE}, max_seconds=840)


@pytest.mark.parametrize("field", ["rate_per_s", "max_seconds"])
def test_a_replay_request_with_a_huge_integer_is_malformed(field: str) -> None:
    event = {"start": "2026-11-01T00:00:00Z", "end": "2026-11-02T00:00:00Z", field: HUGE}
    with pytest.raises(ValueError, match=f"{field} must be a positive number"):
        replay.parse_request(event, max_seconds=840)


def test_the_replay_function_answers_a_huge_integer_with_an_error(
    replay_handler: ModuleType,  # noqa: F811
) -> None:
    event = {"start": "2026-11-01T00:00:00Z", "end": "2026-11-02T00:00:00Z", "rate_per_s": HUGE}
    assert replay_handler.handler(event, None) == {"error": "rate_per_s must be a positive number"}
