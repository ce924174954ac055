"""The audit writer: audit batches in, one chained object per call out; checkpoints on demand.

Each call of ``write`` takes the audit batches a consumer received (each with its own id), drops
batches already written (redelivery), chains the records after the writer's last one, stores
them as **one** object in the Object Lock bucket, and only then advances the writer's chain state
together with the written batch ids, in one conditional update; before storing, it saves which
object it is about to store (``ChainState.intent``). A crash before the update leaves an object
version that the state does not know: a retry with the same batches on the same UTC day writes
the same key again, and the newest version is the one the chain continues from; a retry under
another key moves the intent to ``abandoned``, which the next checkpoint names with its hash.
``checkpoint`` seals the objects written since the last checkpoint (also none: a quiet hour is
proven quiet).

Only a key that one of the writer's own attempts may have stored (its state says which) is
written again. Every other object, and every checkpoint but one retried after its state update
failed, is stored only if its key is new to the bucket (an S3 conditional write): a chain state
behind the trail (the item restored to an earlier point, or lost) or a second writer never puts
a new version over what the trail holds, and the call fails with ``ChainBehindTrail`` instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import PurePath
from typing import Any, Protocol, runtime_checkable

from fabric.audit import AuditBatch, decode_audit_batch
from fabric.audit_chain import GENESIS, Chain, Signer, canonical, encode_object, make_checkpoint
from fabric.envelope import (
    MAX_TOPIC_BYTES,
    TOPIC_RE,
    format_timestamp,
    normalize_message_id,
    parse_timestamp,
)
from fabric.errors import FabricError
from fabric.naming import FALLBACK_FLOWS, fallback_queue_name
from fabric.stakeholders import Stakeholder
from fabric.topology import (
    TRUSTED_AUDIT_PUBLISHERS,
    dead_letter_queue_name,
    queue_name,
    retry_queue_name,
    retry_tiers,
    user_name,
)

_LOG = logging.getLogger(__name__)


class ChainConflict(FabricError):
    """Another writer advanced the same chain: this call's object is not part of the trail."""


class ChainBehindTrail(FabricError):
    """The bucket already holds an object at a key the writer's chain state never tried: the
    state is behind the trail (the chain item restored to an earlier point, or lost), or another
    writer stored it. Nothing was stored over it; the state must be rebuilt from the trail
    (docs/runbook.md) before the writer can go on."""


@dataclass
class ChainState:
    """Where a writer's chain stands, and what the next checkpoint must seal."""

    seq: int = 0
    last_hash: str = GENESIS
    pending: list[tuple[str, str]] = field(default_factory=list)  # (object key, SHA-256 hex)
    checkpoints: int = 0
    last_signature: str | None = None
    version: int = 0  # for the conditional update
    # The object a write is about to store (key, SHA-256 hex), saved before it stores it; still
    # set at the next write means that write's state update never happened.
    intent: tuple[str, str] | None = None
    # Objects such a write may have stored under a key the chain does not continue from: the
    # next checkpoint names them as abandoned (``fabric.audit_chain.make_checkpoint``).
    abandoned: list[tuple[str, str]] = field(default_factory=list)
    # Abandoned objects a checkpoint has named, kept until the chain passes their first
    # sequence number: a write may still store the chain's object under one of their keys (a
    # retry at the same position, or the chain reaching an object a state behind wrote).
    named: list[tuple[str, str]] = field(default_factory=list)
    # The checkpoint a ``checkpoint`` call is about to store, saved before it stores it; still
    # set at the next call means its state update never happened, and it may store that again.
    sealing: int | None = None


class ChainStore(Protocol):
    """The writers' chain states and the batch ids already written."""

    def load(self, writer: str) -> ChainState:
        """The state of ``writer`` (a fresh one for a new writer)."""
        ...

    def save(self, writer: str, state: ChainState, *, batch_ids: Sequence[str]) -> bool:
        """Store ``state`` (version + 1) and mark ``batch_ids`` written, only if the stored
        version is still ``state.version``; False when another writer got there first."""
        ...

    def written(self, batch_ids: Sequence[str]) -> set[str]:
        """The ``batch_ids`` already written."""
        ...


class ObjectStore(Protocol):
    """The Object Lock bucket (retention comes from the bucket's default)."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` (a new version if the key exists)."""
        ...


@runtime_checkable
class NewKeyObjectStore(ObjectStore, Protocol):
    """An object store that can also store a key only while the bucket holds none there (S3's
    conditional write), which keeps the writer from putting a version over the trail. The
    in-memory stores of the tests cannot: the writer then puts, as before."""

    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` at ``key`` only if the key holds no object; False (nothing stored)
        if it holds one."""
        ...


@dataclass(frozen=True)
class Written:
    """What one ``write`` call stored."""

    key: str | None
    records: int
    duplicate_batches: int
    archived: int = 0  # bodies stored in the archive object
    # Batches stored as one ``refused-batch`` or ``unreadable-batch`` record instead of theirs.
    refused: int = 0


AUDIT_PREFIX = "audit/"
ARCHIVE_PREFIX = "archive/"
# One DynamoDB transaction saves the chain state and a mark per new batch: at most 100 actions.
MAX_BATCHES_PER_WRITE = 99
# A checkpoint is made after this many objects even within the hour, so the objects awaiting
# one stay a bounded list in the chain item (about 160 bytes each, under DynamoDB's 400 KB).
SEAL_EVERY_OBJECTS = 1_000


def object_key(writer: str, first: int, last: int, at: datetime) -> str:
    """``audit/<writer>/<yyyy>/<mm>/<dd>/<first seq>-<last seq>.jsonl``: ordered by key."""
    return f"{AUDIT_PREFIX}{writer}/{at:%Y/%m/%d}/{first:012d}-{last:012d}.jsonl"


def checkpoint_key(writer: str, sequence: int) -> str:
    """``checkpoints/<writer>/<n>.json``."""
    return f"checkpoints/{writer}/{sequence:08d}.json"


class AuditWriter:
    """One writer of the trail (run it with reserved concurrency 1 per writer name)."""

    def __init__(
        self,
        writer: str,
        *,
        chains: ChainStore,
        objects: ObjectStore,
        signer: Signer,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        seal_every: int = SEAL_EVERY_OBJECTS,
    ) -> None:
        self._writer = writer
        self._chains = chains
        self._objects = objects
        self._signer = signer
        self._now = now
        self._seal_every = seal_every

    def write(self, batches: Sequence[tuple[str, AuditBatch]]) -> Written:
        """Chain and store the records of ``batches`` (batch id, batch) not written before.

        The bodies the new records name are archived first, as one object beside the audit
        object (``archive/...``, same name): no record is stored before the body it names.
        After ``seal_every`` objects without a checkpoint, or an abandoned attempt, one is made
        at once, best effort (``_seal_at_once``).

        Raises:
            ChainConflict: another writer advanced the chain meanwhile (retry the batch).
            ChainBehindTrail: the bucket already holds this call's key, which no attempt of the
                writer's tried: nothing was stored over it (the batches are not marked written).
            TransportUnavailable: the bucket or the state table cannot be reached.
            ValueError: more than ``MAX_BATCHES_PER_WRITE`` batches (a wiring error: the event
                source's batch size).
        """
        if len(batches) > MAX_BATCHES_PER_WRITE:
            raise ValueError(
                f"{len(batches)} audit batches in one call; at most {MAX_BATCHES_PER_WRITE}"
            )
        done = set(self._chains.written([batch_id for batch_id, _ in batches]))
        # A batch id twice in one call (an at-least-once redelivery, a re-sent batch) is written
        # once: the marks that drop a copy are saved only after the object.
        fresh: list[tuple[str, AuditBatch]] = []
        for batch_id, batch in batches:
            if batch_id not in done:
                fresh.append((batch_id, batch))
                done.add(batch_id)
        records = [
            {**record, "batch": batch_id} for batch_id, batch in fresh for record in batch.records
        ]
        stand_ins = [(batch_id, batch.records[0]) for batch_id, batch in fresh if _stood_in(batch)]
        if not records:
            state = self._chains.load(self._writer)
            if fresh:  # empty batches: remember them so a redelivery is a no-op
                self._save(state, [b for b, _ in fresh])
            if _settled(state):  # the checkpoint after an abandoned attempt failed: make it now
                self._seal_at_once()
            return Written(key=None, records=0, duplicate_batches=len(batches) - len(fresh))
        state = self._chains.load(self._writer)
        loaded = replace(state)  # saved back if the bucket refuses this call's key
        chain = Chain(self._writer, state.seq, state.last_hash)
        linked = chain.link(records)
        data = encode_object(linked)
        key = object_key(self._writer, state.seq + 1, chain.seq, self._now())
        digest = hashlib.sha256(data).hexdigest()
        # An attempt of this writer's may have stored this key before: this call stores it
        # again, a new version, which the chain continues from. Any other key must be new.
        again = key in _tried(state)
        if state.intent is not None and state.intent != (key, digest):
            # An earlier attempt's state update failed; it may have stored its object. Under
            # another key (other batches, past midnight) this call does not overwrite it; under
            # the same key with other bytes (a stand-in's time differs) this call's put may
            # fail too and leave it there. Either way it may be what S3 holds.
            state.abandoned = [*state.abandoned, state.intent]
        state.intent = (key, digest)
        self._save(state, [])  # write-ahead: which object this call is about to store
        bodies = _named_bodies(records, [batch for _, batch in fresh])
        if bodies:
            archive_key = ARCHIVE_PREFIX + key.removeprefix(AUDIT_PREFIX)
            self._put(archive_key, encode_archive(bodies), again=again, loaded=loaded, state=state)
        self._put(key, data, again=again, loaded=loaded, state=state)
        # This call's object is now the newest version of its key, which the chain continues
        # from: no earlier attempt under that key is abandoned any more. A named key stays the
        # writer's own until the chain passes its first sequence number, after which no write
        # makes it again: an attempt at this position is done with, but an object a state
        # behind the trail wrote further on (named by the runbook's rebuild) is not.
        state.abandoned = [item for item in state.abandoned if item[0] != key]
        state.named = [item for item in state.named if _first_seq(item[0]) > chain.seq]
        state.seq, state.last_hash = chain.seq, chain.last_hash
        state.pending.append((key, digest))
        state.intent = None
        self._save(state, [batch_id for batch_id, _ in fresh])
        for batch_id, stand_in in stand_ins:
            # Its sender was told stored (the broker confirmed the publish) and nobody else
            # learns of it: said here once, when written, in the writer's own words only.
            publisher = stand_in.get("publisher")
            _LOG.warning(
                "audit batch %s from %s written as %s, its records are not in the trail: %s",
                batch_id,
                "the SQS audit queue" if publisher is None else publisher or "no user-id",
                stand_in["event"],
                stand_in["reason"],
            )
        if _settled(state) or len(state.pending) >= self._seal_every:
            self._seal_at_once()  # at once after an abandoned attempt: the tail verifies again
        return Written(
            key=key,
            records=len(linked),
            duplicate_batches=len(batches) - len(fresh),
            archived=len(bodies),
            refused=len(stand_ins),
        )

    def checkpoint(self) -> str:
        """Seal the objects written since the last checkpoint; the checkpoint's key.

        Raises:
            ChainConflict: another writer advanced the chain meanwhile.
            ChainBehindTrail: the bucket already holds this checkpoint, and no earlier attempt
                of this checkpoint stored it: nothing was stored over it.
        """
        state = self._chains.load(self._writer)
        loaded = replace(state)  # saved back if the bucket refuses this checkpoint's key
        sequence = state.checkpoints + 1
        settled = _settled(state)
        body = make_checkpoint(
            writer=self._writer,
            sequence=sequence,
            objects=state.pending,
            last_seq=state.seq,
            last_hash=state.last_hash,
            previous_signature=state.last_signature,
            at=format_timestamp(self._now()),
            signer=self._signer,
            abandoned=settled,
        )
        key = checkpoint_key(self._writer, sequence)
        # A checkpoint whose state update failed is made again under its key, a new version
        # (the newest is the one the verifier reads); any other checkpoint's key must be new.
        again = state.sealing == sequence
        if not again:
            state.sealing = sequence
            self._save(state, [])  # write-ahead: which checkpoint this call is about to store
        self._put(key, canonical(body), again=again, loaded=loaded, state=state)
        state.pending, state.checkpoints, state.sealing = [], sequence, None
        state.named = [*state.named, *settled]
        state.abandoned = [item for item in state.abandoned if item not in settled]
        state.last_signature = str(body["signature"])
        self._save(state, [])
        return key

    def _seal_at_once(self) -> None:
        """The checkpoint a write makes at once, best effort: the write's object and batch
        marks are saved, so its failure must not fail the call, whose caller would not count
        the batches it refused (and their redelivery finds them written). The next write that
        needs it tries again, and so does the hourly one, which fails its invocation (and
        alarms) if it fails too, also for a chain state behind the trail."""
        try:
            self.checkpoint()
        except Exception as error:  # the class only: a message may quote what S3 or KMS said
            _LOG.error(
                "the checkpoint after a write of %s failed (%s): the next one makes it",
                self._writer,
                type(error).__name__,
            )

    def _put(
        self, key: str, data: bytes, *, again: bool, loaded: ChainState, state: ChainState
    ) -> None:
        """Store ``data`` at ``key``: as a new version when ``again`` (an earlier attempt of
        this writer's may have stored it), else only if the bucket holds no object there.

        Raises:
            ChainBehindTrail: the bucket holds one. The chain state is first saved back as it
                was ``loaded`` (best effort), so that a retry does not take the key for its own
                attempt's and store over it.
        """
        if again or not isinstance(self._objects, NewKeyObjectStore):
            self._objects.put(key, data)
            return
        if self._objects.create(key, data):
            return
        loaded.version = state.version
        try:
            self._save(loaded, [])
        except FabricError as error:  # another writer's state, or the table is down
            _LOG.error(
                "the chain state of %s could not be saved back (%s)",
                self._writer,
                type(error).__name__,
            )
        raise ChainBehindTrail(
            f"the bucket already holds {key}, which the chain state of {self._writer} never"
            " tried: the chain state is behind the trail (rebuild it from the trail: runbook,"
            ' "The chain state is behind the trail"), or another writer stored it'
        )

    def _save(self, state: ChainState, batch_ids: list[str]) -> None:
        if not self._chains.save(self._writer, state, batch_ids=batch_ids):
            raise ChainConflict(f"the chain of {self._writer} moved on meanwhile")


def _tried(state: ChainState) -> set[str]:
    """The keys the writer's attempts may have stored that a write may still make: the one it
    is about to store (``intent``), the abandoned ones, and those a checkpoint named."""
    intent = [state.intent] if state.intent is not None else []
    return {key for key, _ in [*intent, *state.abandoned, *state.named]}


def _first_seq(key: str) -> int:
    """The first sequence number in an object's key (``object_key``)."""
    return int(key.rsplit("/", 1)[-1].split("-", 1)[0])


def _settled(state: ChainState) -> list[tuple[str, str]]:
    """The abandoned attempts the next checkpoint names: not those under the key of a write
    still to be retried (``intent``). Its retry may yet store the chain's object there, or
    abandon the key with another hash; named now, a later checkpoint would name the same key
    as the chain's or with another hash, and a window holding only one of the two checkpoints
    could not tell the bytes stored there from a forgery. Held back, they are named together
    once the key is settled (a retry under another key), or dropped (the chain's object)."""
    pending = state.intent[0] if state.intent is not None else None
    return [item for item in state.abandoned if item[0] != pending]


def encode_archive(bodies: Mapping[str, bytes]) -> bytes:
    """An archive object: JSON lines ``{"sha256", "body"}`` (base64), sorted by hash."""
    return b"".join(
        canonical({"sha256": digest, "body": base64.b64encode(bodies[digest]).decode("ascii")})
        + b"\n"
        for digest in sorted(bodies)
    )


def decode_archive(data: bytes) -> dict[str, bytes]:
    """The bodies of an archive object, by SHA-256 hex (unchecked: check before use)."""
    bodies: dict[str, bytes] = {}
    for line in data.splitlines():
        if line.strip():
            entry = json.loads(line)
            bodies[str(entry["sha256"])] = base64.b64decode(entry["body"])
    return bodies


def _named_bodies(
    records: Sequence[Mapping[str, Any]], batches: Sequence[AuditBatch]
) -> dict[str, bytes]:
    carried: dict[str, bytes] = {}
    for batch in batches:
        carried.update(batch.bodies)
    named = {digest for record in records if isinstance(digest := record.get("body_sha256"), str)}
    return {digest: body for digest, body in carried.items() if digest in named}


# What a consumer (a stakeholder group's user) may record; the rest only the platform may.
CONSUMER_EVENTS = frozenset({"delivered", "retried", "dead-lettered"})


def batches_from_event(
    event: Mapping[str, Any],
    *,
    trusted: frozenset[str] = frozenset(TRUSTED_AUDIT_PUBLISHERS),
    environment: str | None = None,
) -> list[tuple[str, AuditBatch]]:
    """The audit batches of an Amazon MQ for RabbitMQ event (``fabric.audit``) or an SQS event
    (the audit queue), as (batch id, batch).

    The batch id is the id the batch was sent with (the AMQP ``message_id``, the SQS
    ``fabric-message-id`` attribute), or the SHA-256 of its body when there is none: the writer
    drops a batch id it already wrote, and stores it in every record as ``batch``. A stakeholder
    user sets the AMQP message id freely (up to 255 bytes of text), so a batch from a publisher
    not in ``trusted`` keeps its id only when it is a fabric message id in its canonical form
    (``fabric.envelope.normalize_message_id``: the toolkit's sink sends a UUID), else the
    digest of its user-id and its body (``_digest``), which a redelivery has too.

    A body that is not an audit batch is not dropped: it becomes one ``unreadable-batch`` record
    carrying the SHA-256 of the body, so the trail shows that something arrived and what. So
    does a message whose reading fails in any way the checks did not foresee (``_unexpected``):
    one message never fails the event, whose other batches are written.

    On RabbitMQ, where stakeholder users may publish their consumers' records too, every record
    gets ``publisher``: the batch's user-id, which the broker checked against the connection's
    user. A batch from a publisher not in ``trusted`` that records anything but consumer events
    becomes one ``refused-batch`` record instead (the SQS audit queue is written only by the
    platform's functions: its IAM policy is the check there); the bodies such a publisher's
    batch carries are not archived. ``environment`` (the writer's ``FABRIC_ENV``) names the
    fallback queues a consumer's SQS records may name; None admits any environment's.

    Raises:
        ValueError: the event is neither.
    """
    from fabric.adapters.sns import MESSAGE_ID_ATTRIBUTE

    batches: list[tuple[str, AuditBatch]] = []
    if event.get("eventSource") == "aws:rmq":
        for messages in event.get("rmqMessagesByQueue", {}).values():
            for message in messages:
                try:
                    batches.append(_from_rabbitmq(message, trusted, environment))
                except Exception as error:  # one message never fails the event
                    batches.append(_unexpected(message, "data", error, trusted))
    elif isinstance(event.get("Records"), list):
        for record in event["Records"]:
            try:
                attributes = record.get("messageAttributes") or {}
                body = str(record.get("body", "")).encode("utf-8")
                # The platform's own id: only its functions may send to this queue (IAM).
                sent_id = str((attributes.get(MESSAGE_ID_ATTRIBUTE) or {}).get("stringValue") or "")
                batches.append((sent_id or _digest(body), _records(body)[0]))
            except Exception as error:  # one message never fails the event
                batches.append(_unexpected(record, "body", error))
    else:
        raise ValueError("not an Amazon MQ or SQS event")
    return batches


def _from_rabbitmq(
    message: Mapping[str, Any], trusted: frozenset[str], environment: str | None
) -> tuple[str, AuditBatch]:
    properties = message.get("basicProperties") or {}
    body = _rabbitmq_body(message.get("data", ""))
    publisher = str(properties.get("userId") or "")
    sent_id = _sent_id(properties, publisher, trusted)
    return sent_id or _digest(body, publisher, trusted), _published_by(
        publisher, body, trusted, environment
    )


def _rabbitmq_body(data: Any) -> bytes:
    """The bytes of a RabbitMQ message's ``data`` (base64), or its text as it arrived when it
    is not base64 (strictly: text with anything but the base64 alphabet is not decoded, so
    its hash is of what arrived): recorded, not the whole event dropped.

    Raises:
        TypeError: ``data`` is neither text nor bytes.
    """
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        return str(data).encode("utf-8", "surrogatepass")


def _sent_id(properties: Mapping[str, Any], publisher: str, trusted: frozenset[str]) -> str:
    """The id a RabbitMQ batch was sent with, kept when its publisher is trusted or it is a
    fabric message id in its canonical form; else "" (see ``batches_from_event``)."""
    sent_id = str(properties.get("messageId") or "")
    if publisher not in trusted and normalize_message_id(sent_id) != sent_id:
        return ""
    return sent_id


def _unexpected(
    message: object, field: str, error: Exception, trusted: frozenset[str] = frozenset()
) -> tuple[str, AuditBatch]:
    """One ``unreadable-batch`` record for a message whose reading failed in a way the checks
    did not foresee (a shape nobody expected, a bug of the writer's): the event's other batches
    are written, and this one is not delivered again and again until the event source gives
    up on all of them. It carries the SHA-256 of what arrived, as a readable message's record
    would: the bytes of a RabbitMQ message's ``data`` (base64-decoded when it decodes), the text
    of an SQS message's ``body``, else the whole message as JSON. A RabbitMQ batch keeps the id
    it was sent with by the rule ``_from_rabbitmq`` follows (``_sent_id``), when its properties
    are an object; else its id is the digest. The log names the error's class and where it was
    raised, never its text, which may quote what a consumer sent."""
    where = traceback.extract_tb(error.__traceback__)[-1]
    _LOG.error(
        "an audit message could not be read (%s at %s:%s): written as one unreadable-batch record",
        type(error).__name__,
        PurePath(where.filename).name,
        where.lineno,
    )
    carried = message.get(field) if isinstance(message, dict) else None
    if isinstance(carried, str):
        body = (
            _rabbitmq_body(carried) if field == "data" else carried.encode("utf-8", "surrogatepass")
        )
    else:
        body = json.dumps(message, sort_keys=True, default=repr).encode("utf-8", "surrogatepass")
    publisher, sent_id, batch_id = None, "", _digest(body)
    if field == "data":  # RabbitMQ: every record says who published it
        properties = message.get("basicProperties") if isinstance(message, dict) else None
        properties = properties if isinstance(properties, dict) else {}
        publisher = str(properties.get("userId") or "")
        sent_id = _sent_id(properties, publisher, trusted)
        batch_id = _digest(body, publisher, trusted)
    return sent_id or batch_id, _stand_in(
        body, "unreadable-batch", "the writer failed to read the message", publisher
    )


def _published_by(
    publisher: str, body: bytes, trusted: frozenset[str], environment: str | None
) -> AuditBatch:
    batch, readable = _records(body)
    if readable and publisher not in trusted:
        group = _GROUP_OF_USER.get(publisher)
        if group is None:  # the broker checks a user-id only when there is one
            why: str | None = "is not a stakeholder group's user (or gave no user-id)"
        elif not all(_is_consumer_event(r.get("event")) for r in batch.records):
            why = "may record only consumer events"
        else:
            why = next(
                filter(
                    None,
                    (_consumer_record_problem(r, group, environment) for r in batch.records),
                ),
                None,
            )
        if why is not None:
            return _stand_in(body, "refused-batch", f"{publisher or 'no user-id'} {why}", publisher)
        # Only the platform archives stored bodies (the consumer toolkit sends none): a
        # consumer's would sit in the locked archive for the retention period, whatever they are.
        return AuditBatch([{**r, "publisher": publisher} for r in batch.records])
    return AuditBatch([{**r, "publisher": publisher} for r in batch.records], batch.bodies)


def _is_consumer_event(event: object) -> bool:
    # The type first: a list or an object is no event, and cannot be looked up in a set.
    return isinstance(event, str) and event in CONSUMER_EVENTS


# What a stakeholder's consumer may put in the trail: the fields of the consumer toolkit's records
# (``fabric.consumer.settlement_records``), each in its format, and ``groups`` (its own group
# only). The trail is locked for seven years and nobody can erase it: a field of free text (a
# note, an exception's message) would keep a child's name there for good. So every field is an
# id, a hash, a code, a number or a name of the fabric's; a batch with anything else is refused.
CONSUMER_RECORD_FIELDS = frozenset(
    {
        "event",
        "at",
        "message_id",
        "source",
        "topic",
        "body_sha256",
        "reason",
        "attempt",
        "queues",
        "groups",
        "emitted_by",  # the batch's, which ``decode_audit_batch`` puts in each record
    }
)
# Why the toolkit parks a message: a ``dead-lettered`` record's reason.
DEAD_LETTER_REASONS = frozenset(
    {"max-attempts", "poison", "no-message-id", "malformed-headers", "max-receives"}
)
# A failed attempt's reason (``retried``): the name of the exception's class, never its text.
ERROR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# A consumer's name (``source``, and ``emitted_by`` of its batches): a code, not a sentence.
CONSUMER_NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Nine digits: the most the toolkit reads from a ``fabric-attempt`` header.
MAX_ATTEMPT = 999_999_999
_MAX_TIMESTAMP_CHARS = 40  # RFC 3339 with nanoseconds and an offset is 35
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# An SQS queue's ARN up to its name, as the toolkit records it (the event source's ARN): an
# AWS partition, a region's shape, an account.
_SQS_ARN_PREFIX = re.compile(
    r"arn:aws(?:-cn|-us-gov|-iso|-iso-[a-z]|-eusc)?:sqs:"
    r"[a-z]{2,4}(?:-[a-z]{2,9}){1,2}-[0-9]{1,2}:[0-9]{12}:"
)
# The environment in a fallback queue's name (``fabric-<env>-<flow>-<group>``), for a writer
# that does not know its own (a local fabric, tests).
_ANY_ENVIRONMENT = "[a-z0-9]{1,16}"
_TEXT_FIELDS = ("message_id", "source", "topic", "body_sha256", "reason", "emitted_by")
_LIST_FIELDS = ("groups", "queues")


def is_topic(text: str) -> bool:
    """Whether ``text`` is a topic in the envelope's syntax (``fabric.envelope``)."""
    # The pattern admits ASCII only, so characters are bytes.
    return len(text) <= MAX_TOPIC_BYTES and TOPIC_RE.fullmatch(text) is not None


def _consumer_record_problem(
    record: Mapping[str, Any], group: str, environment: str | None
) -> str | None:
    """Why a record of ``group``'s consumer is not one the trail may hold: only the fields the
    fabric's consumer records have (``CONSUMER_RECORD_FIELDS``), each of its type (the
    compliance report and replay read them) and format, and only ``group``'s own groups and
    queues (a group may not record deliveries for another); None when it is one. The record's
    event is one of ``CONSUMER_EVENTS`` (checked before).

    The problem never quotes the record: it is stored in the trail itself."""
    if not CONSUMER_RECORD_FIELDS.issuperset(record):
        # Not named: a field's name can be the free text as well as its value.
        return "recorded a field the fabric's consumer records do not have"
    problem = _record_types_problem(record) or _record_format_problem(record)
    if problem is not None:
        return problem
    if any(other != group for other in record.get("groups") or ()):
        return "recorded another group's delivery"
    queues = record.get("queues") or ()
    if not all(group_owns(group, queue) for queue in queues):
        return "recorded another group's queue"
    if not all(
        queue in _RABBITMQ_QUEUES[group] or _is_fallback_queue(queue, group, environment)
        for queue in queues
    ):
        return "recorded a queue that is not one of the fabric's queue names"
    return None


def _record_types_problem(record: Mapping[str, Any]) -> str | None:
    at = record.get("at")
    try:
        if not isinstance(at, str) or len(at) > _MAX_TIMESTAMP_CHARS:
            raise ValueError
        parse_timestamp(at)
    except ValueError:
        return "recorded a time that is not RFC 3339 with a timezone"
    for name in _TEXT_FIELDS:
        if record.get(name) is not None and not isinstance(record[name], str):
            return f"recorded {name} that is not text"
    for name in _LIST_FIELDS:
        value = record.get(name)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(item, str) for item in value)
        ):
            return f"recorded {name} that is not a list of text"
    attempt = record.get("attempt")
    if attempt is not None and (type(attempt) is not int or not 1 <= attempt <= MAX_ATTEMPT):
        return f"recorded an attempt that is not a whole number from 1 to {MAX_ATTEMPT}"
    return None


def _record_format_problem(record: Mapping[str, Any]) -> str | None:
    """The text fields of a consumer record (types already checked) against their formats."""
    for name, fits, problem in _FORMATS:
        value = record.get(name)
        if value is not None and not fits(value):
            return problem
    reason = record.get("reason")
    if reason is not None and not _REASON_FITS[record["event"]](reason):
        return "recorded a reason its event does not have"
    return None


_NAME_PROBLEM = "that is not a consumer name (at most 64 of A-Z a-z 0-9 . _ : -)"
_FORMATS: tuple[tuple[str, Callable[[str], bool], str], ...] = (
    (
        "message_id",
        lambda value: normalize_message_id(value) == value,
        "recorded a message_id that is not a fabric message id (UUID or ULID)",
    ),
    ("topic", is_topic, "recorded a topic that is not a fabric topic"),
    (
        "body_sha256",
        lambda value: _SHA256_HEX.fullmatch(value) is not None,
        "recorded a body_sha256 that is not 64 lowercase hex digits",
    ),
    (
        "source",
        lambda value: CONSUMER_NAME.fullmatch(value) is not None,
        f"recorded source {_NAME_PROBLEM}",
    ),
    (
        "emitted_by",
        lambda value: CONSUMER_NAME.fullmatch(value) is not None,
        f"recorded emitted_by {_NAME_PROBLEM}",
    ),
)
# The reason each consumer event may have: why the toolkit parked it (dead-lettered), the class
# of the exception that failed the attempt (retried); none for a delivery.
_REASON_FITS: dict[str, Callable[[str], bool]] = {
    "dead-lettered": DEAD_LETTER_REASONS.__contains__,
    "retried": lambda reason: ERROR_NAME.fullmatch(reason) is not None,
    "delivered": lambda reason: False,
}


def group_owns(group: str, queue: str) -> bool:
    """Whether ``queue`` (a RabbitMQ queue name, or an SQS queue's name or ARN) is ``group``'s:
    ``fabric.<group>`` and its emergency, retry and dead-letter queues, or an SQS queue named
    ``...-<group>`` or ``...-<group>-dlq``."""
    name = queue.rsplit(":", 1)[-1]
    return (
        name == f"fabric.{group}"
        or name.startswith(f"fabric.{group}.")
        or name.endswith((f"-{group}", f"-{group}-dlq"))
    )


def _is_fallback_queue(queue: str, group: str, environment: str | None) -> bool:
    """Whether ``queue`` (an SQS queue's name or ARN) is one of ``group``'s fallback queues
    (``fabric.naming.fallback_queue_name``) or their dead-letter queues, in ``environment``
    (any, when None): the SQS queues a group's consumer takes messages from."""
    name = queue.rsplit(":", 1)[-1]
    prefix = queue[: len(queue) - len(name)]
    if prefix and _SQS_ARN_PREFIX.fullmatch(prefix) is None:
        return False
    if environment is not None:
        own = {
            fallback_queue_name(environment, flow, Stakeholder(group)) for flow in FALLBACK_FLOWS
        }
        return name.removesuffix("-dlq") in own
    flows = "|".join(FALLBACK_FLOWS)
    return re.fullmatch(f"fabric-{_ANY_ENVIRONMENT}-(?:{flows})-{group}(?:-dlq)?", name) is not None


_GROUP_OF_USER = {user_name(group): group.value for group in Stakeholder}
# A group's RabbitMQ queues: the work queues, their delay tiers and dead-letter queues.
_RABBITMQ_QUEUES = {
    group.value: frozenset(
        name
        for emergency in (False, True)
        for name in (
            queue_name(group, emergency=emergency),
            dead_letter_queue_name(group, emergency=emergency),
            *(
                retry_queue_name(group, seconds, emergency=emergency)
                for seconds in retry_tiers(emergency=emergency)
            ),
        )
    )
    for group in Stakeholder
}


def _digest(body: bytes, publisher: str = "", trusted: frozenset[str] | None = None) -> str:
    """The id of a batch sent without one to keep: ``sha256-<hex>``. For the platform (no
    ``trusted`` given: SQS; or a RabbitMQ publisher in it), the SHA-256 of the body; for any
    other RabbitMQ publisher, of its user-id (a JSON string, which ends at its closing quote)
    and the body: two stakeholder groups that send the same bytes sent two batches, each kept,
    while a redelivery, from the same user, is still dropped."""
    if trusted is None or publisher in trusted:
        return "sha256-" + hashlib.sha256(body).hexdigest()
    return "sha256-" + hashlib.sha256(json.dumps(publisher).encode() + b"\n" + body).hexdigest()


# A JSON escape of a UTF-16 surrogate: in a valid pair, or alone, which no UTF-8 can hold.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _records(body: bytes) -> tuple[AuditBatch, bool]:
    """(the batch, True), or (an ``unreadable-batch`` stand-in, False) for anything the trail
    cannot hold as it is: not a batch, nested beyond the parser, a NaN, or text no UTF-8 can
    hold (a lone surrogate), which would otherwise fail the whole call's object, the other
    batches with it."""
    try:
        batch = decode_audit_batch(body)
        if _SURROGATE_ESCAPE.search(body):  # rare: check that the records encode
            canonical({"records": batch.records})
        return batch, True
    except (ValueError, UnicodeError, RecursionError):
        return _stand_in(body, "unreadable-batch", "not a fabric.audit-batch/1 document"), False


def _stood_in(batch: AuditBatch) -> bool:
    """Whether ``batch`` is a stand-in (``_stand_in``): one record of a stand-in's event, and
    without ``emitted_by``, which every record of a decoded batch has."""
    return (
        len(batch.records) == 1
        and batch.records[0].get("event") in ("refused-batch", "unreadable-batch")
        and "emitted_by" not in batch.records[0]
    )


def _stand_in(body: bytes, event: str, reason: str, publisher: str | None = None) -> AuditBatch:
    """One record in place of a batch the trail cannot take as it is: what arrived, and why."""
    record: dict[str, object] = {
        "event": event,
        "at": format_timestamp(datetime.now(UTC)),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "reason": reason,
    }
    if publisher is not None:
        record["publisher"] = publisher
    return AuditBatch([record])
