"""A circuit breaker in front of a Transport: stop paying a dead broker's timeout on every call,
and a stuck queue's timeout on every message bound for it."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import StrEnum

from fabric.ports import Failure, MessageKind, OutboundMessage, Outcome, Transport
from fabric.stakeholders import Stakeholder
from fabric.topology import AUDIT_QUEUE, UNROUTED_QUEUE, queue_name

_LOG = logging.getLogger(__name__)
# Failures that may say the transport itself is unwell. A nack or a return is about one message
# (a full queue, a missing binding) and does not open the circuit: it is an answer. The breaker
# opens everything on ``UNAVAILABLE`` and the messages' queues on ``TIMEOUT``; a caller without
# a fallback may stop on either.
SYSTEMIC = frozenset({Failure.UNAVAILABLE, Failure.TIMEOUT})
# What an ``UNAVAILABLE``, or a stall of the whole broker, opens: while it is open, every
# message fails fast.
EVERYTHING = "*"


class State(StrEnum):
    """Closed: calls go through. Open: calls fail at once. Half-open: one call probes."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


def targets(message: OutboundMessage) -> frozenset[str]:
    """The queues the broker's confirm of ``message`` waits on, as the breaker keys a timeout.

    A routed message is confirmed once every queue it reaches has stored it: the work queue of
    each group of its ``audience``, or each one's emergency queue for an emergency (routing
    gives a message the same path for all its groups). An audit batch waits on the audit queue,
    a redelivered message on the one queue it names (``redeliver_to``), and an unroutable
    message on the unrouted queue.
    """
    if message.kind is MessageKind.AUDIT:
        return frozenset({AUDIT_QUEUE})
    if message.redeliver_to is not None:
        return frozenset({message.redeliver_to})
    if not message.audience:
        return frozenset({UNROUTED_QUEUE})
    return _queues(message.audience, message.emergency)


@functools.cache  # a few dozen audiences and two paths: no string building per message
def _queues(audience: frozenset[Stakeholder], emergency: bool) -> frozenset[str]:
    return frozenset(queue_name(group, emergency=emergency) for group in audience)


class BreakerTransport:
    """Wraps ``inner`` and fails fast where it has just failed: everywhere, or for some queues.

    ``UNAVAILABLE`` (no connection, a lost one, a blocked broker) opens the circuit for
    everything. A confirm ``TIMEOUT`` of a message that waited on one queue (``targets``) opens
    it for that queue. A message that waited on several (an incident for two groups, a public
    alert) opens none: its timeout does not say which queue held it up, and blaming them all
    sent healthy queues' emergencies to the fallback. So one queue that stopped confirming (a
    quorum queue without its majority) is pinned down by the messages for it alone. Messages
    left unconfirmed after the last answer of a call that ran out of its publish budget
    (``out_of_budget`` of the inner transport) open nothing either: confirms come in publish
    order, and that tail is a slow broker's, not its queues'.

    A message is failed fast, reported ``UNAVAILABLE`` without touching the broker (the router
    sends it straight to the fallback), only while everything is open or every one of its
    queues is. A message with a queue still closed goes to ``inner``: its healthy queues get it
    from the broker at once, and should its confirm time out the router sends it to the
    fallback as well (consumers drop the duplicate by ``message_id``). The outcomes come back in
    the messages' order.

    A broker that takes publishes and confirms nothing (a stall of the node's queue storage)
    opens everything too: two messages that timed out in two calls that answered nothing
    (nothing stored, nacked or returned), within ``open_seconds``, on queues they do not share,
    cannot be one stuck queue's doing (``fabric.drain`` stops on the same evidence); one call
    alone may be one pause of the broker. From then on it
    costs one confirm timeout every ``open_seconds``.

    Each queue stays open for ``open_seconds``, then is half-open: the next call with a message
    for it probes it. A message for it that is stored closes it, and a timeout of a message for
    it alone opens it for another period.

    Everything stays open for ``open_seconds``; then the next call that reaches ``inner``
    probes it: it closes when that call had an answer (a nack is one) and nothing
    ``UNAVAILABLE``, and opens for another period when the call answered nothing. A call that
    answers nothing never closes it.

    When a call timed out, or ran out of its publish budget, audit batches go around the broker
    too, for ``open_seconds`` or until a call stores without either: the transport drops its
    connection after a timeout, and should the broker have stopped answering altogether, the
    call's audit batch would hold the answer for a connect timeout to learn it; a broker too
    slow for one call's budget would hold it for another budget; the SQS audit path (which the
    audit writer reads too) takes it at once. The audit queue is not opened for it: messages
    stored meanwhile prove the connection, not the audit queue.

    A call with no message for ``inner`` (none given, or all failed fast) never reaches it: no
    connection is opened, and it probes nothing.
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
        self._opened: dict[str, float] = {}  # queue (or EVERYTHING) -> when it last opened
        # The queue sets of the messages that timed out in calls that answered nothing since
        # the last answer, and when.
        self._unanswered: dict[frozenset[str], float] = {}
        self._silent_at: float | None = None  # a call last timed out or ran out of budget

    @property
    def state(self) -> State:
        """The worst state now of any queue (or of everything): ``OPEN`` while some message
        would fail fast, ``HALF_OPEN`` while some queue waits for its probe, else ``CLOSED``."""
        now = self._clock()
        states = {self._state_at(target, now) for target in self._opened}
        return next((s for s in (State.OPEN, State.HALF_OPEN) if s in states), State.CLOSED)

    def state_for(self, target: str) -> State:
        """The state now of one queue (a value of ``targets``), or of ``EVERYTHING``."""
        return self._state_at(target, self._clock())

    def publish(
        self,
        messages: Iterable[OutboundMessage],
        *,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        """Publish through ``inner`` what has a queue not open; the rest ``UNAVAILABLE``.

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
                if blocked and (EVERYTHING in blocked or targets(message) <= blocked):
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
        """Open and close queues, and everything, after ``inner`` answered for ``messages``."""
        now = self._clock()
        blamed: list[OutboundMessage] = []  # timed out before one of the call's answers
        tail: list[OutboundMessage] = []  # timed out since the call's last answer
        answered = unavailable = stored = False
        for message, outcome in zip(messages, outcomes, strict=True):
            if outcome.stored:
                stored = True
                for target in targets(message):
                    self._close(target)
            elif outcome.failure is Failure.TIMEOUT:
                tail.append(message)
            elif outcome.failure is Failure.UNAVAILABLE:
                unavailable = True
            if outcome.failure not in SYSTEMIC:  # an answer: stored, nacked or returned
                answered = True
                blamed += tail
                tail = []
        # A call the publish budget cut off (``out_of_budget``: confirms trickling in, in
        # publish order) leaves a slow tail unconfirmed: what timed out after its last answer
        # says nothing about its queues, and none is blamed for it. What timed out before an
        # answer was held up by its own queues; otherwise every timeout is blamed.
        cut = getattr(self._inner, "out_of_budget", False)
        suspects = blamed if cut else blamed + tail
        stalled = bool(suspects) and self._blame(suspects, now, answered=answered)
        if unavailable or stalled or (not answered and EVERYTHING in self._opened):
            self._open(EVERYTHING, now)  # the last: everything's probe answered nothing
        elif answered:
            self._close(EVERYTHING)
        if answered:
            self._unanswered.clear()
        if blamed or tail:
            # A call that timed out (the transport dropped its connection: the broker may be
            # gone) or ran out of its budget (a broker too slow to store a call in time): its
            # audit batch would pay a reconnect or its own budget there.
            self._silent_at = now
        elif stored:
            self._silent_at = None

    def _blame(self, timed_out: list[OutboundMessage], now: float, *, answered: bool) -> bool:
        """Open the queue of each message in ``timed_out`` that had only one; whether the
        timeouts show the whole broker stalled (see the class)."""
        earlier = {q: at for q, at in self._unanswered.items() if now - at < self._open_seconds}
        stalled = False
        for message in timed_out:
            waited_on = targets(message)
            if len(waited_on) == 1:  # the one queue that explains it
                self._open(next(iter(waited_on)), now)
            if not answered:
                # Two messages that timed out in calls that answered nothing, whose queues
                # share none, cannot be one stuck queue's doing: the broker stalled. Only an
                # earlier call counts: one pause of the broker may time out a whole call.
                stalled = stalled or any(waited_on.isdisjoint(q) for q in earlier)
        if not answered:
            earlier.update((targets(message), now) for message in timed_out)
        self._unanswered = earlier
        return stalled

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
