"""Redrive: send dead letters back to where they came from, once the cause is fixed.

A run scans one dead-letter queue, picks the letters that match its filter, and for each batch:
asks the ledger which of them an earlier run already put back (an interrupted run's leftovers:
those are only removed), puts the rest back at their origin, records them in the ledger once the
origin confirmed them, then removes them from the dead-letter queue and writes one ``redriven``
audit record per message. Letters that do not match are held until the run ends and then given
back untouched, so a run never sees a letter twice and never reorders what it leaves. A letter
the queue says cannot go back by itself (``DeadLetter.stays``) is counted and listed, and stays.

A redrive (one runbook command, in as many runs as it has chunks) has an id, ``redrive_id``,
and marks every message it puts back with it (``REDRIVE_ID_HEADER``). A letter that carries the
mark is a message this redrive moved already and that was dead-lettered again (its cause is not
fixed): no run of the redrive moves it again; it stays, counted as ``parked_again`` (and listed
by a dry run, ``stays: parked again by this redrive``).

Exactly once at the origin, by message id: a letter is removed only after the origin confirmed
it and the ledger recorded it, and a letter the ledger knows is never put back again. Two
windows are left, each a duplicate with the same message id (which consumers deduplicate on),
never a loss: a crash between the origin's confirm and the ledger write (milliseconds), and a
send the origin stored whose answer did not reach the run (on SQS, a SendMessageBatch not
answered within 5 s, or answered with an error after storing it; the SDK never makes a send
again). Such letters count as not moved and stay in the dead-letter queue with no record yet;
the next run puts them back again, with their records.

A run stops within its time (``max_seconds``). A queue that makes a call for every few letters,
each of which can be slow (SQS: 10 letters a receive, send, delete or visibility change), is
told the run's time (``TimeBoundQueue``) and begins no call it does not expect to end within
it, keeping time to delete or give back what the run holds; the run then stops ``time limit``.
A letter moved and recorded but not deleted in time stays in the dead-letter queue (hidden
until its hold ends where it could not be given back, counted in ``hidden``): the ledger knows
it, so the next run only removes it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from fabric.audit import AuditEvent, AuditRecord, sha256_hex
from fabric.audit_writer import DEAD_LETTER_REASONS, is_topic
from fabric.envelope import normalize_message_id
from fabric.errors import TransportUnavailable
from fabric.naming import is_ingest_queue
from fabric.pacing import Pace
from fabric.ports import AuditSink, DeadLetter, DeadLetterQueue, RedriveLedger
from fabric.request_fields import positive, strings
from fabric.routing import pattern_problem, topic_matches

_LOG = logging.getLogger(__name__)
_BATCH = 100
_LISTED_STAYING = 100  # letters that cannot go back, listed per run (all are counted)
# The header (on SQS: the message attribute) that marks a message with the redrive that put it
# back. The consumer toolkit keeps a message's headers when it parks it, RabbitMQ when it
# dead-letters it, SQS its attributes when its redrive policy moves it to the DLQ.
REDRIVE_ID_HEADER = "fabric-redrive-id"
REDRIVE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
# Times of dead-lettering are whole seconds (the toolkit's header, ``x-death``).
_SECOND = timedelta(seconds=1)
# What a dry run lists a letter parked again as (``Listed.stays``): it stays, this redrive never
# moves it again.
PARKED_AGAIN_STAYS = "parked again by this redrive"


@runtime_checkable
class TimeBoundQueue(Protocol):
    """A dead-letter queue that makes a call for every few letters, each of which can be slow
    (SQS: 10 letters a call, each answered just within the client's timeouts): a hundred
    letters held are ten calls to give back, which a run that stopped at its time limit would
    make past it, and past the function's timeout. Told the run's time when it starts, such a
    queue begins no call it does not expect to end within it, and keeps time to delete or give
    back what the run holds; ``out_of_time`` then says that its last ``peek`` (which returns
    what it took by then) or ``remove`` (which leaves the rest) stopped for the run's time."""

    out_of_time: bool

    def limit_time(self, budget_s: float) -> None:
        """The run has ``budget_s`` seconds from now."""
        ...


def new_redrive_id() -> str:
    """A fresh redrive id."""
    return str(uuid.uuid4())


@dataclass(frozen=True)
class RedriveFilter:
    """Which letters to move; an empty field admits everything.

    ``topics``: RabbitMQ-style patterns (``*`` one word, ``#`` any number); ``reasons``: why it
    was dead-lettered; ``older_than_s`` / ``newer_than_s``: age since dead-lettering (or since it
    was sent, where the queue does not know); ``message_ids``: exact ids.
    """

    topics: tuple[str, ...] = ()
    reasons: frozenset[str] = frozenset()
    older_than_s: float | None = None
    newer_than_s: float | None = None
    message_ids: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for pattern in self.topics:
            problem = pattern_problem(pattern)
            if problem is not None:
                raise ValueError(f"topic filter {pattern!r}: {problem}")
        for name in ("older_than_s", "newer_than_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")

    def admits(self, letter: DeadLetter, now: datetime) -> bool:
        """Whether ``letter`` matches every given criterion."""
        return (
            (not self.message_ids or letter.message_id in self.message_ids)
            and (not self.reasons or letter.reason in self.reasons)
            and (not self.topics or any(topic_matches(p, letter.topic) for p in self.topics))
            and self._age_admits(letter, now)
        )

    def _age_admits(self, letter: DeadLetter, now: datetime) -> bool:
        if self.older_than_s is None and self.newer_than_s is None:
            return True
        if letter.dead_lettered_at is None:
            return False  # age unknown: an age filter cannot vouch for it
        age = (now - letter.dead_lettered_at).total_seconds()
        if self.older_than_s is not None and age < self.older_than_s:
            return False
        return self.newer_than_s is None or age <= self.newer_than_s


@dataclass(frozen=True)
class RedrivePlan:
    """One run's bounds: what to move, whether to only list it, how many, how fast, how long,
    and the redrive it belongs to (``redrive_id``: every run of one runbook command has the
    same; a run on its own gets a fresh one).

    Raises:
        ValueError: ``max_messages``, ``rate_per_s`` or ``max_seconds`` is not positive, or
            ``redrive_id`` does not match ``REDRIVE_ID_RE``.
    """

    selection: RedriveFilter = field(default_factory=RedriveFilter)
    dry_run: bool = False
    max_messages: int = 1000
    rate_per_s: float | None = None
    max_seconds: float = 840.0
    redrive_id: str = field(default_factory=new_redrive_id)

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.max_seconds <= 0:
            raise ValueError("max_messages and max_seconds must be positive")
        if self.rate_per_s is not None and self.rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        if not isinstance(self.redrive_id, str) or not REDRIVE_ID_RE.fullmatch(self.redrive_id):
            raise ValueError(f"redrive_id must match {REDRIVE_ID_RE.pattern}")


@dataclass(frozen=True)
class Listed:
    """A letter as a dry run (or the report) shows it."""

    message_id: str
    topic: str
    reason: str
    origin: str
    age_s: float | None
    redrives: int
    stays: str | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "message_id": self.message_id,
            "topic": self.topic,
            "reason": self.reason,
            "origin": self.origin,
            "age_s": None if self.age_s is None else round(self.age_s, 1),
            "redrives": self.redrives,
            "stays": self.stays,
        }


@dataclass
class RedriveReport:
    """What one run did. ``stopped``: empty, parked again (nothing left to move but letters
    parked again), message limit, time limit, or what failed.

    ``left`` counts matching letters that cannot go back by themselves (``DeadLetter.stays``):
    the queue keeps them, and ``listed`` shows the first of them with the reason, in every run.
    ``parked_again`` counts the letters this run met that its redrive had put back already and
    that were dead-lettered again (whatever the filter): the queue keeps them too, and a dry run
    lists them with ``stays: parked again by this redrive`` (up to a hundred, in the order it
    met them: in each batch, after the letters that would move; ``to_dict`` keeps the first
    hundred listed letters of all kinds, so letters parked again behind a hundred that would
    move are counted, not listed). ``hidden`` counts the letters the run held that the queue
    could not show again at its end (``DeadLetterQueue.release``; on SQS also for want of time):
    they stay hidden until they come back by themselves (SQS: 16 minutes), and a run started
    before then misses them.
    """

    queue: str
    dry_run: bool
    redrive_id: str = ""
    scanned: int = 0
    matched: int = 0
    moved: int = 0
    already_moved: int = 0
    left: int = 0
    parked_again: int = 0
    hidden: int = 0
    stopped: str = "empty"
    listed: list[Listed] = field(default_factory=list)

    def to_dict(self, *, listed_limit: int = 100) -> dict[str, object]:
        """JSON-ready, with at most ``listed_limit`` listed letters."""
        return {
            "queue": self.queue,
            "dry_run": self.dry_run,
            "redrive_id": self.redrive_id,
            "scanned": self.scanned,
            "matched": self.matched,
            "moved": self.moved,
            "already_moved": self.already_moved,
            "left": self.left,
            "parked_again": self.parked_again,
            "hidden": self.hidden,
            "stopped": self.stopped,
            "listed": [item.to_dict() for item in self.listed[:listed_limit]],
        }


Progress = Callable[[RedriveReport], None]


def ledger_key(queue: str, letter: DeadLetter) -> str:
    """The ledger entry of one dead-lettering of one message. A message dead-lettered again after
    a redrive gets a new key, so it can move again: by its new copy id (SQS), or else by its
    raised redrive count (RabbitMQ, where the redrive always sets the count), and by when it
    was dead-lettered (second precision). The time is what tells a new dead-lettering of a
    message that came again without the redrive count (a replay, its producer sending the same
    id again) from the letter an earlier run moved: with the count alone (0 both times) it was
    taken for moved already and removed without being put back. The same letter read again (its
    removal lost) has the same time, so the ledger still knows it.

    A letter without a message id (the consumer toolkit parks those as ``no-message-id``) is
    known by its body's SHA-256: with one shared empty id, every such letter after the first
    would count as moved already and be removed without being moved."""
    occurrence = letter.copy_id or str(letter.redrives)
    if letter.dead_lettered_at is not None:
        occurrence += f"@{int(letter.dead_lettered_at.timestamp())}"
    return f"redrive#{queue}#{_identity(letter)}#{occurrence}"


def _identity(letter: DeadLetter) -> str:
    """The message a letter is a copy of: its id, or its body's digest when it has none."""
    return letter.message_id or f"sha256:{sha256_hex(letter.body)}"


def _marked(letter: DeadLetter, redrive_id: str) -> DeadLetter:
    """``letter`` with the redrive's mark among the headers it goes back with."""
    return replace(letter, headers={**letter.headers, REDRIVE_ID_HEADER: redrive_id})


def _came_back(letter: DeadLetter, redrive_id: str, taken: dict[tuple[str, str], datetime]) -> bool:
    """Whether ``letter`` is a message this redrive put back that was dead-lettered again: it
    carries the redrive's mark; or, unmarked (an SQS message with no room left for the mark),
    this run moved its message and it was dead-lettered since. Another copy of that message
    dead-lettered before the move (a consumer that parked it twice, a second failure of one
    id) is not: it goes back too, under its own ledger key. Times are whole seconds, so the
    second before the move counts as since, as does a letter that does not say when."""
    if letter.headers.get(REDRIVE_ID_HEADER) == redrive_id:
        return True
    moved_at = taken.get((letter.origin, _identity(letter)))
    if moved_at is None:
        return False
    return letter.dead_lettered_at is None or letter.dead_lettered_at > moved_at - _SECOND


class Redriver:
    """Moves matching letters of one dead-letter queue back to their origin."""

    def __init__(
        self,
        *,
        ledger: RedriveLedger,
        audit: AuditSink,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._ledger = ledger
        self._audit = audit
        self._clock = clock
        self._sleep = sleep
        self._now = now

    def run(
        self,
        queue: DeadLetterQueue,
        plan: RedrivePlan | None = None,
        *,
        progress: Progress | None = None,
    ) -> RedriveReport:
        """Move (or, dry run, list) up to ``plan.max_messages`` matching letters, at most
        ``plan.rate_per_s`` a second, within ``plan.max_seconds``; ``progress(report)`` after
        every batch and at the end.

        Never raises for queue or ledger trouble: the report says why it stopped. Every letter
        the run held and did not remove is given back at the end (``hidden``: how many the
        queue could not show again, also for want of time).
        """
        plan = plan or RedrivePlan()
        report = RedriveReport(queue=queue.name, dry_run=plan.dry_run, redrive_id=plan.redrive_id)
        if isinstance(queue, TimeBoundQueue):
            queue.limit_time(plan.max_seconds)
        try:
            self._run(queue, plan, report, progress)
        finally:
            report.hidden = queue.release()
        if progress is not None:
            progress(report)
        return report

    def _run(
        self,
        queue: DeadLetterQueue,
        plan: RedrivePlan,
        report: RedriveReport,
        progress: Progress | None,
    ) -> None:
        pace = Pace(
            rate_per_s=plan.rate_per_s,
            max_seconds=plan.max_seconds,
            clock=self._clock,
            sleep=self._sleep,
        )
        # The same limit as the pace's: a move stops sending at it (``DeadLetterQueue.move``).
        deadline = self._clock() + plan.max_seconds
        max_messages = plan.max_messages
        batch_size = pace.batch_size(_BATCH)
        # Messages this run took, by origin, with when: a copy that comes back without the mark
        # (a queue that could not mark it) is known by them (``_came_back``). By origin: the
        # overflow queue holds one letter per DLQ a message overflowed from, each its own.
        taken: dict[tuple[str, str], datetime] = {}
        while report.matched < max_messages:
            pace.wait(report.moved)  # by what was moved so far, never past the limit
            if pace.expired():
                report.stopped = "time limit"
                return
            try:
                letters = queue.peek(batch_size)
            except TransportUnavailable as exc:
                _LOG.warning("dead-letter queue unavailable: %s", exc)
                report.stopped = "dead-letter queue unavailable"
                return
            if not letters:
                if _stopped_for_time(queue):
                    # Not "empty": the queue had no time left to take letters.
                    report.stopped = "time limit"
                    return
                # Not "empty" while letters parked again stay: their cause is not fixed.
                report.stopped = "parked again" if report.parked_again else "empty"
                return
            report.scanned += len(letters)
            now = self._now()
            matching: list[DeadLetter] = []
            parked: list[DeadLetter] = []
            for letter in letters:
                if _came_back(letter, plan.redrive_id, taken):
                    # Its cause is not fixed: it stays. Moved again, it would go round once per
                    # chunk (and within a run, again and again), up to max_messages times.
                    parked.append(letter)
                elif plan.selection.admits(letter, now):
                    matching.append(letter)
            parked_room = max(_LISTED_STAYING - report.parked_again, 0)
            report.parked_again += len(parked)
            staying = [letter for letter in matching if letter.stays is not None]
            room = max(_LISTED_STAYING - report.left, 0)
            report.listed.extend(_listed(letter, now) for letter in staying[:room])
            report.left += len(staying)
            chosen = [letter for letter in matching if letter.stays is None]
            chosen = chosen[: max_messages - report.matched]
            if not plan.dry_run:
                taken.update({(letter.origin, _identity(letter)): now for letter in chosen})
            report.matched += len(chosen)
            if plan.dry_run:
                report.listed.extend(_listed(letter, now) for letter in chosen)
                # After what would move, the letters parked again as what they are: letters
                # this redrive never moves again.
                report.listed.extend(
                    replace(_listed(letter, now), stays=PARKED_AGAIN_STAYS)
                    for letter in parked[:parked_room]
                )
            elif chosen and not self._move(queue, chosen, report, plan.redrive_id, deadline):
                return
            if progress is not None:
                progress(report)
        report.stopped = "message limit"

    def _move(
        self,
        queue: DeadLetterQueue,
        letters: list[DeadLetter],
        report: RedriveReport,
        redrive_id: str,
        deadline: float,
    ) -> bool:
        keys = {letter.handle: ledger_key(queue.name, letter) for letter in letters}
        try:
            known = self._ledger.moved(list(keys.values()))
        except TransportUnavailable as exc:
            _LOG.warning("redrive ledger unavailable: %s", exc)
            report.stopped = "ledger unavailable"
            return False
        done = [letter for letter in letters if keys[letter.handle] in known]
        # Put back by an earlier, interrupted run: only the dead-letter copy is left to go.
        if done and not _removed(queue, done, report, already_moved=True):
            return False
        # One copy per ledger key goes back: two dead-letter copies of one dead-lettering (same
        # id, redrive count and time) are one message; the twin is only removed, once the copy
        # that went back is recorded, as a later batch would.
        pending: list[DeadLetter] = []
        twins: list[DeadLetter] = []
        going: set[str] = set()
        for letter in letters:
            key = keys[letter.handle]
            if key not in known:
                (twins if key in going else pending).append(letter)
                going.add(key)
        # Marked with the redrive: should it be dead-lettered again, no run of it moves it again.
        # Within the run's time: a queue that sends in many requests (SQS: up to 100 for a
        # batch of large letters) starts none after it, and what it did not send is not moved.
        moved = (
            queue.move(
                [_marked(letter, redrive_id) for letter in pending],
                budget_s=max(deadline - self._clock(), 0.0),
            )
            if pending
            else []
        )
        out_of_time = bool(pending) and queue.out_of_time  # before the removal sets it anew
        if moved and not self._settle(queue, moved, twins, keys, report):
            return False
        if len(moved) < len(pending):
            # Letters the queue had no time left to send stay, as after a time limit between
            # batches: the runbook goes on. Not when the run's time ran out while the origin
            # did not answer (a send in doubt): the next chunk would meet the same origin.
            report.stopped = "time limit" if out_of_time else "origin unavailable"
            return False
        return True

    def _settle(
        self,
        queue: DeadLetterQueue,
        moved: list[DeadLetter],
        twins: list[DeadLetter],
        keys: dict[str, str],
        report: RedriveReport,
    ) -> bool:
        """Audit, record and remove the letters the origin confirmed, then remove the twins of
        those recorded; whether the run may go on (else ``report.stopped`` says why)."""
        # Audited as soon as the origin confirmed, before the ledger: a run that stops after
        # this (the ledger unavailable, or killed) leaves letters a re-run only removes, or
        # moves again with a record of their own (same message id, consumers deduplicate),
        # never a message back at its origin without a record.
        report.moved += len(moved)
        if not self._audit_moved(queue.name, moved):
            # Back at the origin without a record: leave the dead-letter copies and stop, so
            # a re-run moves them again with their records (same message id).
            report.stopped = "audit unavailable"
            return False
        try:
            self._ledger.record([keys[letter.handle] for letter in moved])
        except TransportUnavailable as exc:
            # Stored at the origin but not recorded: leave the dead-letter copies, a re-run
            # may move them again.
            _LOG.warning("redrive ledger unavailable after a move: %s", exc)
            report.stopped = "ledger unavailable"
            return False
        if not _removed(queue, moved, report, already_moved=False):
            return False
        recorded = {keys[letter.handle] for letter in moved}
        twins = [letter for letter in twins if keys[letter.handle] in recorded]
        return not twins or _removed(queue, twins, report, already_moved=True)

    def _audit_moved(self, queue: str, moved: Sequence[DeadLetter]) -> bool:
        """Record the letters put back (from ``queue`` to their origin); whether it is stored.

        A letter of an ingest queue's DLQ is a producer's input, never stored by the fabric (a
        restricted payload in plaintext): its record holds no hash of it, as the router's
        rejections hold none (a hash of a child's data lets a reader of the trail confirm a
        guess at it). Every other letter is a body the fabric stored, hashed as stored."""
        at = self._now()
        stored = self._audit.emit(
            [
                AuditRecord(
                    event=AuditEvent.REDRIVEN,
                    at=at,
                    message_id=normalize_message_id(letter.message_id),
                    source="redrive",
                    topic=letter.topic if is_topic(letter.topic) else None,
                    body_sha256=None if is_ingest_queue(letter.origin) else sha256_hex(letter.body),
                    reason=letter.reason if letter.reason in RECORDED_REASONS else "unknown",
                    transport=queue,
                    queues=(letter.origin,),
                )
                for letter in moved
            ]
        )
        if not stored:
            _LOG.error("audit records of %d redriven letters were not stored", len(moved))
        return stored


# The reasons a ``redriven`` record names: the consumer toolkit's, the broker's ``x-death``
# reasons (RabbitMQ 3.10 to 4.2), SQS's redrive policy, and ``unknown`` (a letter that says
# none). A group's user can park a message in its own DLQ (through its retry exchange) with any
# id, type and reason header: what is not one of the fabric's codes or syntaxes never reaches
# the locked trail, whose records hold codes and hashes, never text. So a record holds a
# letter's id only in the router's canonical form (as the consumer toolkit records it: a
# lowercase ULID as its uppercase self), its topic only in the envelope's syntax, each else
# absent, and any other reason as ``unknown``. The run's report still shows the letter as it is.
RECORDED_REASONS = DEAD_LETTER_REASONS | {
    "rejected",
    "expired",
    "maxlen",
    "delivery_limit",
    "max-receive-count",
    "unknown",
}


def _removed(
    queue: DeadLetterQueue,
    letters: Sequence[DeadLetter],
    report: RedriveReport,
    *,
    already_moved: bool,
) -> bool:
    """Remove ``letters`` (put back and recorded) from ``queue``, counted in ``already_moved``
    when an earlier run put them back; whether every one went. When the queue kept some, the
    run stops, ``dead-letter queue unavailable`` (so the runbook says to go on as the same
    redrive), or ``time limit`` when the queue had no time left to remove them (the runbook
    goes on), and a later run only removes them (the ledger knows them). Before, the run went
    on and could end ``empty``, exit 0, with them still in the queue."""
    removed = queue.remove(letters)
    if already_moved:
        report.already_moved += len(removed)
    kept = len({letter.handle for letter in letters} - removed)
    if kept:
        _LOG.warning("%d redriven letters stay in %s until a re-run removes them", kept, queue.name)
        report.stopped = (
            "time limit" if _stopped_for_time(queue) else "dead-letter queue unavailable"
        )
    return not kept


def _stopped_for_time(queue: DeadLetterQueue) -> bool:
    """Whether the queue's last ``peek`` or ``remove`` stopped for the run's time: only a queue
    told the run's time (``TimeBoundQueue``) does; any other's ``out_of_time`` speaks of its
    last ``move``."""
    return isinstance(queue, TimeBoundQueue) and queue.out_of_time


def _listed(letter: DeadLetter, now: datetime) -> Listed:
    age = (
        None if letter.dead_lettered_at is None else (now - letter.dead_lettered_at).total_seconds()
    )
    return Listed(
        message_id=letter.message_id,
        topic=letter.topic,
        reason=letter.reason,
        origin=letter.origin,
        age_s=age,
        redrives=letter.redrives,
        stays=letter.stays,
    )


@dataclass(frozen=True)
class RedriveRequest:
    """What an operator asked for: which dead-letter queue, and the plan of the run."""

    source: str  # "rabbitmq" or "sqs"
    queue: str
    plan: RedrivePlan


_REQUEST_FIELDS = frozenset(
    {
        "source",
        "queue",
        "dry_run",
        "max_messages",
        "rate_per_s",
        "max_seconds",
        "topics",
        "reasons",
        "older_than_s",
        "newer_than_s",
        "message_ids",
        "redrive_id",
    }
)


def parse_request(event: object, *, max_seconds: float = 840.0) -> RedriveRequest:
    """The redrive function's event (the runbook builds it): ``{"source": "rabbitmq"|"sqs",
    "queue", "dry_run"?, "max_messages"?, "rate_per_s"?, "topics"?, "reasons"?,
    "older_than_s"?, "newer_than_s"?, "message_ids"?, "redrive_id"?}``. Without a
    ``redrive_id`` the run is a redrive of its own (a fresh id).

    Raises:
        ValueError: the event is malformed; the message says what is wrong.
    """
    if not isinstance(event, dict):
        raise ValueError("the event must be a JSON object")
    unknown = sorted(set(event) - _REQUEST_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(unknown)}")
    source, queue = event.get("source"), event.get("queue")
    if source not in ("rabbitmq", "sqs"):
        raise ValueError('source must be "rabbitmq" or "sqs"')
    if not isinstance(queue, str) or not queue:
        raise ValueError("queue must name a dead-letter queue")
    dry_run = event.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise ValueError("dry_run must be true or false")
    max_messages = event.get("max_messages", 1000)
    if type(max_messages) is not int or max_messages < 1:
        raise ValueError("max_messages must be a positive whole number")
    redrive_id = event.get("redrive_id")
    if redrive_id is None:
        redrive_id = new_redrive_id()
    selection = RedriveFilter(
        topics=tuple(strings(event, "topics")),
        reasons=frozenset(strings(event, "reasons")),
        older_than_s=positive(event, "older_than_s"),
        newer_than_s=positive(event, "newer_than_s"),
        message_ids=frozenset(strings(event, "message_ids")),
    )
    return RedriveRequest(
        source=str(source),
        queue=queue,
        plan=RedrivePlan(
            selection=selection,
            dry_run=dry_run,
            max_messages=max_messages,
            rate_per_s=positive(event, "rate_per_s"),
            max_seconds=min(max_seconds, positive(event, "max_seconds") or max_seconds),
            redrive_id=redrive_id,
        ),
    )
