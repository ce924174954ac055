"""SQS dead-letter queues as the redrive sees them (``fabric.ports.DeadLetterQueue``).

The manual mover (``SqsDeadLetterQueue``) receives letters, hiding each for ``hold_seconds``,
re-sends body and message attributes to the source queue, and deletes a letter from the DLQ only
when the redrive asks (after SQS accepted the send and the ledger recorded it). It filters,
dry-runs and audits per message, which SQS's native message-move task (a whole queue, inside
SQS, without filters or audit records) cannot, and it runs under moto.

Message attributes the mover reads (besides the SNS fallback path's, ``fabric.adapters.sns``):

- ``fabric-redrives`` (``REDRIVES_ATTRIBUTE``, Number): earlier redrives; 0 when absent. A move
  sets it to one more.
- ``fabric-dead-letter-reason`` (``DEAD_LETTER_REASON_ATTRIBUTE``, String): why the message was
  dead-lettered, for a producer that parks a message in a DLQ itself. SQS moves a message to a
  DLQ for one reason only, too many receives, so absent means ``max-receive-count``.
- ``fabric-dead-lettered-at`` (``DEAD_LETTERED_AT_ATTRIBUTE``, epoch seconds): when, likewise.
- ``fabric-redrive-id`` (``REDRIVE_ID_ATTRIBUTE``, String): the redrive that last put the
  message back (``fabric.redrive.REDRIVE_ID_HEADER``); SQS keeps it when its redrive policy
  moves the message to the DLQ again. A letter has it among its ``headers``; a move sends the
  one the redrive sets there.

The attribute names are the RabbitMQ side's header names (``fabric.topology``), so a letter
reads the same on either side. The two that describe one dead-lettering are not sent back: a
redriven message starts afresh, as it does on RabbitMQ.

Each call handles at most 10 letters, and an SQS can answer every one slowly, just within the
client's timeouts: told the run's time (``limit_time``, by the redrive), the mover begins no
call it does not expect to end within it (``_Calls``), and keeps time to delete or show again
every letter it holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fabric import topology
from fabric.adapters.sns import HEADERS_ATTRIBUTE, MESSAGE_ID_ATTRIBUTE, TOPIC_ATTRIBUTE
from fabric.errors import TransportUnavailable
from fabric.ports import DeadLetter
from fabric.redrive import REDRIVE_ID_HEADER
from fabric.settings import SqsDeadLetterQueue as QueueSettings

_LOG = logging.getLogger(__name__)
REDRIVES_ATTRIBUTE = topology.REDRIVES_HEADER
DEAD_LETTER_REASON_ATTRIBUTE = topology.DEAD_LETTER_REASON_HEADER
DEAD_LETTERED_AT_ATTRIBUTE = topology.DEAD_LETTERED_AT_HEADER
REDRIVE_ID_ATTRIBUTE = REDRIVE_ID_HEADER
# The only reason SQS itself dead-letters a message: its redrive policy's maxReceiveCount.
SQS_DEAD_LETTER_REASON = "max-receive-count"
# Longer than a run can last (the function's 15 minutes): a letter the run looked at and
# skipped must not come back into view mid-run, where the run would meet only letters it has
# seen and end as if the queue were empty. The run gives back what it holds when it ends.
DEFAULT_HOLD_SECONDS = 960
_MAX_HOLD_SECONDS = 43_200  # SQS's longest visibility timeout (12 hours)
_MAX_ENTRIES = 10  # SQS's batch calls and ReceiveMessage take at most 10
_MAX_ATTRIBUTES = 10  # SQS refuses a message with more message attributes than this
# SQS limits a whole SendMessageBatch request (bodies and attributes) to 256 KiB on queues with
# the classic maximum message size; a larger letter travels alone.
_MAX_BATCH_BYTES = 262_144
# An entry SQS failed on its side (not a sender fault) was not stored: sent again, after a pause.
_SEND_ATTEMPTS = 3
_RESEND_PAUSE_S = 0.2
# How long a receive waits for letters when none is visible (SQS's WaitTimeSeconds: long
# polling, ``SqsDeadLetterQueue.peek``).
_RECEIVE_WAIT_S = 1
# Per dead-lettering or per redrive, not per message: dropped on the way back (the counter and
# the redrive's mark are replaced).
_NOT_SENT_BACK = frozenset(
    {
        REDRIVES_ATTRIBUTE,
        DEAD_LETTER_REASON_ATTRIBUTE,
        DEAD_LETTERED_AT_ATTRIBUTE,
        REDRIVE_ID_ATTRIBUTE,
    }
)
_ATTRIBUTE_FIELDS = ("DataType", "StringValue", "BinaryValue")
# The calls a call's estimate comes from (``_Calls``): one slower than usual (retried by the SDK)
# counts only until that many others followed it.
_RECENT_CALLS = 3
# How long after the run's time a delete or a visibility change may still end (``_Calls``): the
# time the run kept for them can go on the ledger, the audit records (up to about 10 s: the
# broker's confirm timeout, then the SQS audit queue's) and the rate's pauses between its
# calls. Within the minute between the function's run time (840 s) and its timeout, with one
# call of up to 18 s (the SDK's attempts) after it: an SQS that answers in tens of
# milliseconds shows a thousand letters again in 3 s.
_SETTLE_GRACE_S = 25.0


@dataclass
class _Held:
    """A letter this run holds: its SQS message id, its newest receipt, its raw attributes."""

    sqs_id: str
    receipt: str
    attributes: dict[str, dict[str, Any]]


class _Calls:
    """A run's SQS calls within its time: a call is begun only if, taking as long as its
    estimate, it ends before the run's deadline (``limit``; none: no limit).

    The call's estimate is the longest of the last ``_RECENT_CALLS`` calls of any kind (an SQS
    slow to answer one kind is slow to answer every kind); a receive that came back empty
    waited for letters (long polling), not for SQS, and does not count. A call that takes
    letters (a receive, a send) must leave time for the calls that follow it (``after``):
    those that settle every letter the run then holds, each deleted or shown again (10 a call,
    ``_settling``), and, for a receive, the sends of its batch; each of those is estimated at
    the median of the recent calls, not the longest: one slow call (retried by the SDK) priced
    a hundred times over stopped a run holding a thousand letters at once, with its time
    mostly left. A call that settles letters (a
    delete, a visibility change) may end up to ``_SETTLE_GRACE_S`` after the deadline. So only
    a call slower than its estimate ends late (the first call of a run is estimated at
    nothing), and none begins once it would: the run's calls end within its time (for deletes
    and visibility changes, and the grace) plus one call's.
    """

    def __init__(self) -> None:
        self._deadline: float | None = None
        self._recent: deque[float] = deque(maxlen=_RECENT_CALLS)

    def limit(self, budget_s: float) -> None:
        """The run has ``budget_s`` seconds from now; estimates start afresh."""
        self._deadline = time.monotonic() + budget_s
        self._recent.clear()

    def fit(self, *, after: int = 0, deadline: float | None = None, grace_s: float = 0.0) -> bool:
        """Whether a call begun now, and ``after`` calls after it, are expected to end
        ``grace_s`` after the run's deadline at the latest (or ``deadline``, if earlier)."""
        ends = [end for end in (self._deadline, deadline) if end is not None]
        if not ends:
            return True
        recent = sorted(self._recent)
        longest, typical = (recent[-1], recent[len(recent) // 2]) if recent else (0.0, 0.0)
        return time.monotonic() + longest + typical * after < min(ends) + grace_s

    def took(self, begun: float) -> None:
        """A call begun at ``begun`` (``time.monotonic``) has ended."""
        self._recent.append(time.monotonic() - begun)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """One call, timed for the estimates (also one that failed: a retried call is slow)."""
        begun = time.monotonic()
        try:
            yield
        finally:
            self.took(begun)


def _settling(held: int) -> int:
    """The calls that settle ``held`` letters: 10 a delete or visibility change, one more where
    a batch is split between the two (its moved letters deleted, the others shown again)."""
    return math.ceil(held / _MAX_ENTRIES) + 1


class SqsDeadLetterQueue:
    """One SQS DLQ (``<source>-dlq``, the stack's naming) and the source queue its letters go
    back to; ``name`` is the DLQ's name, as operators and the ledger's keys know it."""

    def __init__(
        self,
        queue: QueueSettings,
        client_factory: Callable[[], Any],
        *,
        hold_seconds: int = DEFAULT_HOLD_SECONDS,
    ) -> None:
        """``client_factory`` makes the boto3 SQS client on first use; ``hold_seconds`` is how
        long a peeked letter stays hidden from other readers if the run never releases it.

        Raises:
            ValueError: ``hold_seconds`` is not between 1 and 43200 (SQS's limits).
        """
        if not 1 <= hold_seconds <= _MAX_HOLD_SECONDS:
            raise ValueError(f"hold_seconds must be between 1 and {_MAX_HOLD_SECONDS}")
        self.name = f"{queue.name}-dlq"
        self._queue = queue
        self._client_factory = client_factory
        self._client: Any = None
        self._hold_seconds = hold_seconds
        self._held: dict[str, _Held] = {}  # letter handle (its first receipt) -> what is held
        self._by_sqs_id: dict[str, str] = {}  # SQS message id -> letter handle, this run
        self._calls = _Calls()
        # The last peek, move or remove stopped for the run's time (DeadLetterQueue).
        self.out_of_time = False

    def _sqs(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def limit_time(self, budget_s: float) -> None:
        """The run has ``budget_s`` seconds from now (``fabric.redrive.TimeBoundQueue``): no
        receive, send, delete or visibility change begins that is not expected to end within
        them (``_Calls``), and ``out_of_time`` says when one did not begin."""
        self._calls.limit(budget_s)

    def peek(self, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` letters not yet seen in this run, each hidden for ``hold_seconds``.

        Receives 10 at a time until ``limit`` letters or a receive with nothing new (SQS may
        return a letter again once its hold ran out: it is held anew, not returned twice), or
        until a receive would not end, with the sends of the letters it takes and the deletes or
        visibility changes of every letter held, within the run's time (``_Calls``): then
        ``out_of_time`` is set, and what was taken by then is returned (none: the run stops
        ``time limit``, not ``empty``).
        ``dead_lettered_at`` is the ``fabric-dead-lettered-at`` attribute where a producer set
        it, else ``SentTimestamp``: SQS keeps a message's original send time when it moves it to
        a DLQ, so ages (and age filters) count from when the message was first sent.

        Raises:
            TransportUnavailable: SQS cannot be reached or refuses the call (also: the queue
                does not exist) before any letter was taken in this call.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        self.out_of_time = False
        letters: list[DeadLetter] = []
        while len(letters) < limit:
            wanted = max(1, min(_MAX_ENTRIES, limit - len(letters)))
            sends = math.ceil((len(letters) + wanted) / _MAX_ENTRIES)
            if not self._calls.fit(after=sends + _settling(len(self._held) + wanted)):
                _LOG.warning("the run's time is up: no more letters taken from %s", self.name)
                self.out_of_time = True
                break
            begun = time.monotonic()
            try:
                response = self._sqs().receive_message(
                    QueueUrl=self._queue.dlq_url,
                    MaxNumberOfMessages=wanted,
                    # Long polling asks every SQS server: a short poll may answer empty while
                    # letters remain, which would end the run as if the queue were empty.
                    WaitTimeSeconds=_RECEIVE_WAIT_S,
                    VisibilityTimeout=self._hold_seconds,
                    MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
                )
            except (BotoCoreError, ClientError) as exc:
                self._calls.took(begun)
                if letters:
                    # Hand over what is held already; the next peek reports the outage.
                    _LOG.warning("receive from %s failed: %s", self.name, type(exc).__name__)
                    break
                raise TransportUnavailable(
                    f"cannot receive from {self.name}: {type(exc).__name__}"
                ) from exc
            if response.get("Messages"):
                self._calls.took(begun)  # an empty answer waited out the long poll
            fresh = 0
            for message in response.get("Messages", []):
                sqs_id, receipt = str(message["MessageId"]), str(message["ReceiptHandle"])
                handle = self._by_sqs_id.get(sqs_id)
                if handle is not None:
                    # Seen in this run: SQS honours only the newest receipt handle of a message.
                    if handle in self._held:
                        self._held[handle].receipt = receipt
                    else:  # removed, yet delivered again: give it back at release
                        self._by_sqs_id[sqs_id] = receipt
                        self._held[receipt] = _Held(sqs_id, receipt, {})
                    continue
                fresh += 1
                self._by_sqs_id[sqs_id] = receipt
                self._held[receipt] = _Held(
                    sqs_id, receipt, dict(message.get("MessageAttributes", {}))
                )
                letters.append(self._letter(message))
            if not fresh:
                break
        return letters

    def move(
        self, letters: Sequence[DeadLetter], *, budget_s: float | None = None
    ) -> list[DeadLetter]:
        """Send to the source queue with the same body and every message attribute (with its
        DataType), ``fabric-redrives`` raised by one and ``fabric-redrive-id`` the letter's
        ``headers`` hold (the redrive's mark), where they fit; returns the letters SQS accepted.

        Batches hold at most 10 entries and 256 KiB. An entry SQS lists as failed on its side
        (``SenderFault`` false) is sent again, up to ``_SEND_ATTEMPTS`` sends in all; an entry
        SQS refused, or a batch it refused as a whole (a 4xx answer), is not moved (the letter
        stays in the DLQ). A send in doubt (no answer in time, or an error of SQS's own: SQS
        may have stored it) ends the call: nothing more is sent, and the run stops ``origin
        unavailable``. So at most one request is in doubt, and an SQS that does not answer
        costs one read timeout, not one for each of up to 100 requests (100 letters over 128
        KiB, one to a request of at most 256 KiB). No send starts that is not expected to end,
        with the deletes or visibility changes of every letter held after it, within
        ``budget_s`` (the run's time left) and the run's time (``_Calls``): a slow SQS that
        answers each send just within the read timeout takes a run past its time limit by one
        send at most, not by up to 100 (the letters not sent are not moved, ``out_of_time`` is
        set, and the run stops ``time limit``; a send in doubt that outlasts the budget still
        stops it ``origin unavailable``). Never raises for I/O. A letter this run does not hold
        (released, removed, or from another run) is not moved either: its attributes are not
        known.
        """
        movable = [letter for letter in letters if letter.handle in self._held]
        if len(movable) < len(letters):
            _LOG.warning(
                "%d letter(s) not held by this run, not moved", len(letters) - len(movable)
            )
        deadline = None if budget_s is None else time.monotonic() + budget_s
        self.out_of_time = False
        moved: list[DeadLetter] = []
        outgoing = {letter.handle: self._attributes(letter) for letter in movable}
        for chunk in _batches(movable, outgoing):
            waiting = chunk
            for attempt in range(_SEND_ATTEMPTS):
                if not self._calls.fit(after=_settling(len(self._held)), deadline=deadline):
                    _LOG.warning(
                        "the run's time is up: %d letter(s) of %s not moved",
                        len(movable) - len(moved),
                        self.name,
                    )
                    self.out_of_time = True
                    return moved
                answer = self._send(waiting, outgoing)
                if answer is None:
                    return moved
                sent, waiting = answer
                moved.extend(sent)
                if not waiting:
                    break
                if attempt + 1 < _SEND_ATTEMPTS:
                    time.sleep(_RESEND_PAUSE_S * (attempt + 1))
        return moved

    def _send(
        self, chunk: list[DeadLetter], outgoing: dict[str, dict[str, Any]]
    ) -> tuple[list[DeadLetter], list[DeadLetter]] | None:
        """One SendMessageBatch: the letters SQS accepted, and those it failed on its side
        (``SenderFault`` false: throttled, an internal error), which may be sent again. A
        letter SQS refused, or a whole batch it refused, is neither: not moved. None: the send
        is in doubt (no answer in time, or an error of SQS's own), SQS may have stored it."""
        from botocore.exceptions import BotoCoreError, ClientError

        entries = [
            {
                "Id": str(i),
                "MessageBody": letter.body.decode("utf-8"),
                "MessageAttributes": outgoing[letter.handle],
            }
            for i, letter in enumerate(chunk)
        ]
        try:
            with self._calls.timed():
                response = self._sqs().send_message_batch(
                    QueueUrl=self._queue.source_url, Entries=entries
                )
        except (BotoCoreError, ClientError) as exc:
            _LOG.warning(
                "send to the source of %s failed for %d letter(s): %s",
                self.name,
                len(chunk),
                type(exc).__name__,
            )
            # Not moved: they stay in the DLQ. Refused (a 4xx answer: throttled, access denied,
            # too large), nothing was stored; after anything else SQS may have stored them.
            answer = exc.response if isinstance(exc, ClientError) else {}
            status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return ([], []) if 400 <= status < 500 else None
        failed = response.get("Failed", [])
        if failed:
            _LOG.warning(
                "the source of %s failed %d letter(s): %s",
                self.name,
                len(failed),
                failed[0].get("Code"),
            )
        sent = [chunk[int(item["Id"])] for item in response.get("Successful", [])]
        again = [chunk[int(item["Id"])] for item in failed if not item.get("SenderFault", True)]
        return sent, again

    def remove(self, letters: Sequence[DeadLetter]) -> set[str]:
        """Delete from the DLQ, 10 at a time (by each letter's newest receipt); returns the
        handles SQS confirmed deleted. Never raises for I/O: what is not deleted stays (the run
        stops ``dead-letter queue unavailable``; the ledger knows the letters, so the next run
        only removes them). After a batch SQS did not answer (``_unanswered``: with the SDK's
        3 attempts, 15 to 20 s) no more are made, as in ``release``: a batch of 100 letters is
        10 deletes. After an error SQS answered with (throttled, an internal error) the next
        batch is still made: one such error no longer leaves every letter after it. No batch
        begins that is not expected to end within the run's time and ``_SETTLE_GRACE_S``
        (``_Calls``): the letters left are not deleted, and ``out_of_time`` is set (the run
        stops ``time limit``; as after an outage, the next run only removes them)."""
        from botocore.exceptions import BotoCoreError, ClientError

        self.out_of_time = False
        removed: set[str] = set()
        handles = list(dict.fromkeys(letter.handle for letter in letters))
        for start in range(0, len(handles), _MAX_ENTRIES):
            if not self._calls.fit(grace_s=_SETTLE_GRACE_S):
                _LOG.warning(
                    "the run's time is up: %d letter(s) not deleted from %s",
                    len(handles) - start,
                    self.name,
                )
                self.out_of_time = True
                break
            chunk = handles[start : start + _MAX_ENTRIES]
            entries = [
                {"Id": str(i), "ReceiptHandle": self._receipt(handle)}
                for i, handle in enumerate(chunk)
            ]
            try:
                with self._calls.timed():
                    response = self._sqs().delete_message_batch(
                        QueueUrl=self._queue.dlq_url, Entries=entries
                    )
            except (BotoCoreError, ClientError) as exc:
                _LOG.warning("delete in %s failed: %s", self.name, type(exc).__name__)
                if _unanswered(exc):
                    break
                continue
            removed.update(chunk[int(item["Id"])] for item in response.get("Successful", []))
        for handle in removed:
            self._held.pop(handle, None)
        return removed

    def release(self) -> int:
        """Make every held letter not removed visible again at once (visibility timeout 0);
        whatever SQS does not confirm comes back by itself after ``hold_seconds``: returns how
        many, logged too. Ends the run: the next ``peek`` sees every letter shown again.

        The first batch SQS does not answer (``_unanswered``: the SDK's 3 attempts, 15 to 20 s)
        ends it: each further batch of 10 would cost as much, and a run holding a thousand
        letters (a filtered run) went on for 25 minutes, past the function's timeout. After an
        error SQS answered with, the next batch is still made: one such error no longer hid
        every letter after it for ``hold_seconds`` (a later chunk of the runbook, not seeing
        them, ended ``empty``). No batch begins that is not expected to end within the run's
        time and ``_SETTLE_GRACE_S`` (``_Calls``; the run's receives and sends kept time for
        them): the letters left come back by themselves, and are counted."""
        from botocore.exceptions import BotoCoreError, ClientError

        receipts = [held.receipt for held in self._held.values()]
        self._held.clear()
        self._by_sqs_id.clear()
        failed = 0
        for start in range(0, len(receipts), _MAX_ENTRIES):
            if not self._calls.fit(grace_s=_SETTLE_GRACE_S):
                _LOG.warning("the run's time is up: %s shows no more letters again", self.name)
                failed += len(receipts) - start  # this batch and every one after it
                break
            chunk = receipts[start : start + _MAX_ENTRIES]
            entries = [
                {"Id": str(i), "ReceiptHandle": receipt, "VisibilityTimeout": 0}
                for i, receipt in enumerate(chunk)
            ]
            try:
                with self._calls.timed():
                    response = self._sqs().change_message_visibility_batch(
                        QueueUrl=self._queue.dlq_url, Entries=entries
                    )
            except (BotoCoreError, ClientError) as exc:
                _LOG.warning(
                    "%s did not show held letters again: %s", self.name, type(exc).__name__
                )
                if _unanswered(exc):
                    failed += len(receipts) - start  # this batch and every one after it
                    break
                failed += len(chunk)
                continue
            failed += len(response.get("Failed", []))
        if failed:
            _LOG.warning(
                "%d letter(s) of %s reappear by themselves only after %ds",
                failed,
                self.name,
                self._hold_seconds,
            )
        return failed

    # -- internals ----------------------------------------------------------------------------

    def _receipt(self, handle: str) -> str:
        held = self._held.get(handle)
        return held.receipt if held is not None else handle

    def _letter(self, message: dict[str, Any]) -> DeadLetter:
        attributes: dict[str, Any] = message.get("MessageAttributes", {})

        def attribute(name: str) -> str | None:
            value = attributes.get(name, {}).get("StringValue")
            return None if value is None else str(value)

        body = str(message["Body"])
        message_id, topic = attribute(MESSAGE_ID_ATTRIBUTE), attribute(TOPIC_ATTRIBUTE)
        if message_id is None or topic is None:
            # Not sent through our SNS transport: read what the envelope says.
            envelope: Any = {}
            with contextlib.suppress(ValueError):
                envelope = json.loads(body)
            envelope = envelope if isinstance(envelope, dict) else {}
            message_id = message_id or str(envelope.get("message_id") or message["MessageId"])
            topic = topic or str(envelope.get("topic") or "")
        return DeadLetter(
            handle=str(message["ReceiptHandle"]),
            message_id=message_id,
            topic=topic,
            body=body.encode("utf-8"),
            origin=self._queue.source_url,
            reason=attribute(DEAD_LETTER_REASON_ATTRIBUTE) or SQS_DEAD_LETTER_REASON,
            dead_lettered_at=_dead_lettered_at(
                attribute(DEAD_LETTERED_AT_ATTRIBUTE),
                message.get("Attributes", {}).get("SentTimestamp"),
            ),
            redrives=_count(attribute(REDRIVES_ATTRIBUTE)),
            headers=_headers(attribute(HEADERS_ATTRIBUTE), attribute(REDRIVE_ID_ATTRIBUTE)),
            # The ledger keys on it: the redrive counter may not fit in 10 attributes.
            copy_id=str(message["MessageId"]),
        )

    def _attributes(self, letter: DeadLetter) -> dict[str, Any]:
        kept = {
            name: {k: v for k, v in value.items() if k in _ATTRIBUTE_FIELDS}
            for name, value in self._held[letter.handle].attributes.items()
            if name not in _NOT_SENT_BACK
        }
        # SQS refuses an 11th attribute. The message's own come first, then the redrive's mark
        # (without it, a message that fails again is moved again by the next chunk of the same
        # redrive), then the counter: the ledger keys on the SQS message id, not the count. A
        # letter with no room goes back without them: hence the warning.
        added = [(REDRIVES_ATTRIBUTE, "Number", str(letter.redrives + 1))]
        mark = letter.headers.get(REDRIVE_ID_HEADER)
        if mark is not None:
            added.insert(0, (REDRIVE_ID_ATTRIBUTE, "String", mark))
        own, room = len(kept), max(_MAX_ATTRIBUTES - len(kept), 0)
        for name, data_type, value in added[:room]:
            kept[name] = {"DataType": data_type, "StringValue": value}
        if room < len(added):
            _LOG.warning(
                "a letter of %s has %d message attributes: sent back without %s",
                self.name,
                own,
                ", ".join(name for name, _, _ in added[room:]),
            )
        return kept


def _unanswered(exc: Exception) -> bool:
    """Whether SQS did not answer (a timeout, no connection, the connection dropped): the next
    call would most likely wait as long. An error SQS answered with is not such a sign."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    return isinstance(
        exc, (ReadTimeoutError, ConnectTimeoutError, EndpointConnectionError, ConnectionClosedError)
    )


def _batches(
    letters: Sequence[DeadLetter], attributes: dict[str, dict[str, Any]]
) -> list[list[DeadLetter]]:
    """At most 10 letters and 256 KiB a batch, in order; a larger letter alone."""
    batches: list[list[DeadLetter]] = []
    size = 0
    for letter in letters:
        letter_size = len(letter.body) + _attributes_size(attributes[letter.handle])
        if not batches or len(batches[-1]) >= _MAX_ENTRIES or size + letter_size > _MAX_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(letter)
        size += letter_size
    return batches


def _attributes_size(attributes: dict[str, Any]) -> int:
    """What SQS counts toward the message size: each attribute's name, type and value."""
    size = 0
    for name, value in attributes.items():
        size += len(name.encode()) + len(str(value.get("DataType", "")).encode())
        if "StringValue" in value:
            size += len(str(value["StringValue"]).encode())
        if "BinaryValue" in value:
            size += len(value["BinaryValue"])
    return size


def _count(text: str | None) -> int:
    try:
        return max(0, int(float(text))) if text is not None else 0
    except (ValueError, OverflowError):
        return 0


def _headers(text: str | None, redrive_id: str | None) -> dict[str, str]:
    """The ``fabric-headers`` attribute's headers, and the redrive's mark from its own."""
    headers: dict[str, str] = {}
    if text:
        with contextlib.suppress(ValueError):
            decoded = json.loads(text)
            if isinstance(decoded, dict):
                headers = {str(k): str(v) for k, v in decoded.items()}
    headers.pop(REDRIVE_ID_HEADER, None)
    if redrive_id is not None:
        headers[REDRIVE_ID_HEADER] = redrive_id
    return headers


def _dead_lettered_at(stamp_s: str | None, sent_ms: str | None) -> datetime | None:
    for text, scale in ((stamp_s, 1.0), (sent_ms, 1000.0)):
        if text is None:
            continue
        with contextlib.suppress(ValueError, OverflowError, OSError):
            return datetime.fromtimestamp(float(text) / scale, UTC)
    return None
