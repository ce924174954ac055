"""A circuit breaker in front of a Transport: stop paying a dead broker's timeout on every call,
and a stuck queue's timeout on every message bound for it."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import StrEnum

from fabric.ports import Failure, MessageKind, OutboundMessage, Outcome, Transport
from fabric.topology import AUDIT_QUEUE, UNROUTED_QUEUE

_LOG = logging.getLogger(__name__)
# Failures that may say the transport itself is unwell. A nack or a return is about one message
# (a full queue, a missing binding) and does not open the circuit. The breaker opens everything
# on ``UNAVAILABLE`` and only the messages' targets on ``TIMEOUT``; a caller without a fallback
# may stop on either.
SYSTEMIC = frozenset({Failure.UNAVAILABLE, Failure.TIMEOUT})
# The target an ``UNAVAILABLE`` opens: while it is open, every message fails fast.
EVERYTHING = "*"


class State(StrEnum):
    """Closed: calls go through. Open: calls fail at once. Half-open: one call probes."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


def targets(message: OutboundMessage) -> frozenset[str]:
    """What the broker's confirm of ``message`` waits on, as the breaker keys a timeout.

    A routed message is confirmed once every queue it reaches has stored it, so its targets are
    the groups of its ``audience``; a group stands for its work and its emergency queue alike
    (the message does not say which of the two each group's copy goes to). An audit batch's
    target is the audit queue, a redelivered message's the one queue it names
    (``redeliver_to``), and an unroutable message's the unrouted queue.
    """
    if message.kind is MessageKind.AUDIT:
        return frozenset({AUDIT_QUEUE})
    if message.redeliver_to is not None:
        return frozenset({message.redeliver_to})
    if not message.audience:
        return frozenset({UNROUTED_QUEUE})
    return message.audience


class BreakerTransport:
    """Wraps ``inner`` and fails fast where it has just failed: everywhere, or for one target.

    ``UNAVAILABLE`` (no connection, a lost one, a blocked broker) opens the circuit for
    everything. A confirm ``TIMEOUT`` opens it only for the targets of the messages that timed
    out (``targets``), and not for a target a message of the same call was stored for: one
    queue that stopped confirming (a quorum queue without its majority) sends its own messages
    to the fallback, and every other group's, emergencies included, stay on the broker.

    When a call timed out and stored nothing, audit batches go around the broker too, for
    ``open_seconds`` or until a message is stored again: the transport drops its connection
    after a timeout, and should the broker have stopped answering altogether, the call's audit
    batch would hold the answer for a connect timeout to learn it, where the SQS audit path
    (which the audit writer reads too) takes it at once. The audit target is not opened for it:
    messages stored meanwhile prove the connection, not the audit queue.

    A message for an open target is reported ``UNAVAILABLE`` without touching the broker, so
    the router sends it straight to the fallback; the call's other messages go to ``inner`` as
    usual, and the outcomes come back in the messages' order. Each target stays open for
    ``open_seconds``, then is half-open: the next call with a message for it probes it, a
    message for it that is stored closes it, and a timeout opens it for another period; nothing
    else about that call matters to it. The circuit as a whole is probed by the next call that
    reaches ``inner``, and closes when that call had an answer and nothing ``UNAVAILABLE`` (a
    nack is an answer).

    A broker that takes publishes and confirms nothing costs each target one confirm timeout
    before it opens. A call with no message for ``inner`` (none given, or all for open targets)
    never reaches it: no connection is opened, and it probes nothing.
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
        self._opened: dict[str, float] = {}  # target (or EVERYTHING) -> when it last opened
        self._silent_at: float | None = None  # a call last timed out and stored nothing

    @property
    def state(self) -> State:
        """The worst state now of any target (or of everything): ``OPEN`` while some message
        would fail fast, ``HALF_OPEN`` while some target waits for its probe, else ``CLOSED``."""
        now = self._clock()
        states = {self._state_at(target, now) for target in self._opened}
        return next((s for s in (State.OPEN, State.HALF_OPEN) if s in states), State.CLOSED)

    def state_for(self, target: str) -> State:
        """The state now of one target (a value of ``targets``, or ``EVERYTHING``)."""
        return self._state_at(target, self._clock())

    def publish(
        self,
        messages: Iterable[OutboundMessage],
        *,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        """Publish through ``inner`` what is not for an open target; the rest ``UNAVAILABLE``.

        ``messages`` is consumed lazily, as ``inner`` takes them.
        """
        now = self._clock()
        blocked = {t for t in self._opened if self._state_at(t, now) is State.OPEN}
        if self._silent_at is not None and now - self._silent_at < self._open_seconds:
            blocked.add(AUDIT_QUEUE)  # audit batches around the broker (see the class)
        slots: list[Outcome | None] = []  # a failed-fast message's outcome; None: inner's
        passed: list[OutboundMessage] = []

        def through() -> Iterator[OutboundMessage]:
            for message in messages:
                if blocked and (EVERYTHING in blocked or not blocked.isdisjoint(targets(message))):
                    slots.append(Outcome(message.message_id, failure=Failure.UNAVAILABLE))
                    continue
                slots.append(None)
                passed.append(message)
                yield message

        rest = through()
        first = next(rest, None)
        if first is None:  # nothing for the broker: no connection, no probe, no wait
            return [slot for slot in slots if slot is not None]
        answers = self._inner.publish(itertools.chain([first], rest), meanwhile=meanwhile)
        self._learn(passed, answers)
        inner = iter(answers)
        return [slot if slot is not None else next(inner) for slot in slots]

    def close(self) -> None:
        """Close the inner transport."""
        self._inner.close()

    def _state_at(self, target: str, now: float) -> State:
        opened = self._opened.get(target)
        if opened is None:
            return State.CLOSED
        return State.HALF_OPEN if now - opened >= self._open_seconds else State.OPEN

    def _learn(self, messages: Sequence[OutboundMessage], outcomes: Sequence[Outcome]) -> None:
        """Open and close targets after ``inner`` answered for ``messages``."""
        now = self._clock()
        failures = {outcome.failure for outcome in outcomes}
        if Failure.UNAVAILABLE in failures:
            self._open(EVERYTHING, now)
        elif outcomes:
            self._close(EVERYTHING)
        if Failure.TIMEOUT not in failures and not self._opened and self._silent_at is None:
            return  # the usual call: nothing to open, nothing to close
        timed_out: set[str] = set()
        stored: set[str] = set()
        for message, outcome in zip(messages, outcomes, strict=True):
            if outcome.stored:
                stored |= targets(message)
            elif outcome.failure is Failure.TIMEOUT:
                timed_out |= targets(message)
        if stored:
            self._silent_at = None
        elif timed_out:  # nothing of the call stored: the broker may be gone
            self._silent_at = now
        for target in stored:
            self._close(target)
        for target in timed_out - stored:
            self._open(target, now)

    def _open(self, target: str, now: float) -> None:
        if target not in self._opened:
            _LOG.warning(
                "%s failing for %s: circuit open for %.1f s",
                self.name,
                "everything" if target == EVERYTHING else target,
                self._open_seconds,
            )
        self._opened[target] = now

    def _close(self, target: str) -> None:
        if self._opened.pop(target, None) is not None:
            _LOG.warning(
                "%s recovered for %s: circuit closed",
                self.name,
                "everything" if target == EVERYTHING else target,
            )
