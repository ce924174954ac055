"""A circuit breaker in front of a Transport: stop paying a dead broker's timeout on every call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from enum import StrEnum

from fabric.ports import Failure, OutboundMessage, Outcome, Transport

_LOG = logging.getLogger(__name__)
# Failures that may say the transport itself is unwell. A nack or a return is about one message
# (a full queue, a missing binding) and does not open the circuit. The breaker reads a timeout
# with the rest of its call (``failing``); a caller without a fallback may stop on either.
SYSTEMIC = frozenset({Failure.UNAVAILABLE, Failure.TIMEOUT})


class State(StrEnum):
    """Closed: calls go through. Open: calls fail at once. Half-open: one call probes."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


def failing(outcomes: list[Outcome]) -> bool:
    """Whether a call's outcomes say the transport is unwell: a message ``UNAVAILABLE`` (no
    connection, a lost one, a blocked broker), or a confirm ``TIMEOUT`` in a call of which the
    broker stored nothing.

    A timeout beside stored messages is not the connection's fault: the broker confirmed
    others of the same call, so one queue has stopped confirming (a quorum queue that lost its
    majority). Opening the circuit for it would send every group's messages, emergencies
    included, to the fallback, to wait there for the drain.
    """
    failures = {outcome.failure for outcome in outcomes}
    if Failure.UNAVAILABLE in failures:
        return True
    return Failure.TIMEOUT in failures and not any(outcome.stored for outcome in outcomes)


class BreakerTransport:
    """Wraps ``inner``; after a call that says the transport is unwell (``failing``), fails fast
    for ``open_seconds``, then lets one call through as a probe: if the probe is not failing
    (it stored messages, or the broker refused them one by one) the circuit closes, otherwise
    it stays open for another period.

    While open, every message is reported ``UNAVAILABLE`` without touching the broker, so the
    router goes straight to the fallback transport: an emergency is not held up by a connect
    or confirm timeout on every call during an outage. A message that timed out while others of
    its call were stored goes to the fallback on its own, and the circuit stays closed.
    """

    def __init__(
        self,
        inner: Transport,
        *,
        open_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = inner.name
        self._inner = inner
        self._open_seconds = open_seconds
        self._clock = clock
        self._opened_at: float | None = None

    @property
    def state(self) -> State:
        """The breaker's state now."""
        if self._opened_at is None:
            return State.CLOSED
        if self._clock() - self._opened_at >= self._open_seconds:
            return State.HALF_OPEN
        return State.OPEN

    def publish(
        self,
        messages: Iterable[OutboundMessage],
        *,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        """Publish through ``inner`` unless the circuit is open (then: all ``UNAVAILABLE``)."""
        if self.state is State.OPEN:
            return [Outcome(m.message_id, failure=Failure.UNAVAILABLE) for m in messages]
        outcomes = self._inner.publish(messages, meanwhile=meanwhile)
        if failing(outcomes):
            if self._opened_at is None:
                _LOG.warning("%s failing: circuit open for %.1f s", self.name, self._open_seconds)
            self._opened_at = self._clock()
        elif outcomes and self._opened_at is not None:
            _LOG.warning("%s recovered: circuit closed", self.name)
            self._opened_at = None
        return outcomes

    def close(self) -> None:
        """Close the inner transport."""
        self._inner.close()
