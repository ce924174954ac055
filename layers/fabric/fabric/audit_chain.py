"""The tamper-evident audit trail: hash-chained records, batch objects, signed checkpoints.

A writer numbers its records 1, 2, 3, ... and puts into each the SHA-256 of the previous one
(``prev``), so removing, reordering or changing a record breaks the chain after it. Records are
stored in batch objects (JSON lines). A checkpoint names the objects written since the previous
checkpoint with their SHA-256, seals them with an RFC 6962 Merkle root (domain-separated: leaf
``0x00``, node ``0x01``), carries the previous checkpoint's signature, and is signed itself
(``Signer``: the asymmetric KMS key in AWS) and names that key. The verifier (``verify_trail``)
checks all of it against the keys it trusts (``Keyring``) and names the first bad record,
object or checkpoint.

This is CloudTrail's digest design, at message granularity.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

CHECKPOINT_VERSION = "fabric.audit-checkpoint/1"
GENESIS = "0" * 64  # the ``prev`` of a writer's first record


# One encoder for every call: json.dumps with arguments builds a new one each time.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(value: Mapping[str, Any]) -> bytes:
    """The one byte form a record or checkpoint is hashed and signed in."""
    return _CANONICAL.encode(value).encode()


def has_canonical_form(value: Mapping[str, Any]) -> bool:
    """Whether ``value`` (read from JSON) has a canonical form (see ``NO_CANONICAL_FORM``)."""
    try:
        canonical(value)
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a chained record's canonical form."""
    return hashlib.sha256(canonical(record)).hexdigest()


def merkle_root(leaves: Sequence[bytes]) -> str:
    """RFC 6962 Merkle tree hash (hex) of ``leaves``; the empty tree is SHA-256 of nothing."""
    if not leaves:
        return hashlib.sha256(b"").hexdigest()
    return _mth(list(leaves)).hex()


def _mth(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    split = 1 << ((len(leaves) - 1).bit_length() - 1)  # largest power of two below n
    return hashlib.sha256(b"\x01" + _mth(leaves[:split]) + _mth(leaves[split:])).digest()


class Signer(Protocol):
    """Signs and verifies checkpoint bytes (the asymmetric KMS key in AWS)."""

    key_id: str

    def sign(self, message: bytes) -> bytes:
        """The signature of ``message``."""
        ...

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's signature of ``message``."""
        ...


class Keyring:
    """The keys whose checkpoint signatures a verifier trusts, in the order the environment put
    them in service: retired keys first, the current key last.

    KMS cannot rotate an asymmetric key, so a rotation puts a new key in service and keeps the
    old one for verifying. A checkpoint must name one of these keys (its ``key_id``, covered by
    its signature), and no checkpoint may name a key older than its predecessor's: once a trail
    has moved to a newer key, a later checkpoint signed with a retired key was not made by the
    writer (whose grants name only the current key), however valid the signature.
    """

    def __init__(self, signers: Sequence[Signer]) -> None:
        """``signers`` oldest first; at least one, each key once.

        Raises:
            ValueError: no key, or a key named twice.
        """
        self._by_id: dict[str, tuple[int, Signer]] = {}
        for rank, signer in enumerate(signers):
            if signer.key_id in self._by_id:
                raise ValueError(f"the signing key {signer.key_id} is named twice")
            self._by_id[signer.key_id] = (rank, signer)
        if not self._by_id:
            raise ValueError("a keyring needs at least one signing key")

    def find(self, key_id: object) -> tuple[int, Signer] | None:
        """The rank (0 the oldest) and the key named ``key_id``, or None if not trusted."""
        return self._by_id.get(key_id) if isinstance(key_id, str) else None


@dataclass
class Chain:
    """One writer's position in its chain: the last sequence number and record hash."""

    writer: str
    seq: int = 0
    last_hash: str = GENESIS

    def link(self, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``records`` numbered and chained after the current position (which moves on)."""
        out = []
        for record in records:
            chained = {**record, "writer": self.writer, "seq": self.seq + 1, "prev": self.last_hash}
            self.seq += 1
            self.last_hash = record_hash(chained)
            out.append(chained)
        return out


def encode_object(records: Sequence[Mapping[str, Any]]) -> bytes:
    """A batch object: one canonical record per line."""
    return b"".join(canonical(record) + b"\n" for record in records)


def decode_object(data: bytes) -> list[dict[str, Any]]:
    """The records of a batch object.

    Raises:
        ValueError: a line is not a JSON object.
    """
    records = []
    for line in data.splitlines():
        value = json.loads(line)
        if not isinstance(value, dict):
            raise ValueError("a record line is not a JSON object")
        records.append(value)
    return records


def make_checkpoint(
    *,
    writer: str,
    sequence: int,
    objects: Sequence[tuple[str, str]],
    last_seq: int,
    last_hash: str,
    previous_signature: str | None,
    at: str,
    signer: Signer,
    abandoned: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Checkpoint ``sequence`` of ``writer`` over ``objects`` (key, SHA-256 hex) written since the
    previous checkpoint, signed by ``signer``. An empty ``objects`` still makes a checkpoint: a
    quiet hour is proven quiet. ``abandoned`` (key, SHA-256 hex): objects an attempt of the
    writer may have stored and that are not part of the chain (a write whose state update
    failed, retried under another key); listed only when there are any."""
    body: dict[str, Any] = {
        "version": CHECKPOINT_VERSION,
        "writer": writer,
        "checkpoint": sequence,
        "at": at,
        "objects": [{"key": key, "sha256": digest} for key, digest in objects],
        "merkle_root": merkle_root([bytes.fromhex(digest) for _, digest in objects]),
        "last_seq": last_seq,
        "last_hash": last_hash,
        "previous_signature": previous_signature,
        "key_id": signer.key_id,
    }
    if abandoned:
        body["abandoned"] = [{"key": key, "sha256": digest} for key, digest in abandoned]
    body["signature"] = base64.b64encode(signer.sign(canonical(body))).decode()
    return body


# What every accepted message must also have in the trail: where it was stored.
OUTCOME_EVENTS = ("routed", "fallback")
NOT_A_CHECKPOINT = "not a checkpoint (not a JSON object)"
# What JSON text can carry and the canonical form cannot (a lone surrogate, ``"\\ud800"``,
# which no UTF-8 holds): no writer wrote it.
NO_CANONICAL_FORM = "a lone surrogate, or nested deeper than the encoder"
_NO_OUTCOME = "an accepted message has no outcome (routed or fallback)"


@dataclass(frozen=True)
class Problem:
    """The first place where the trail is not what was written, and why."""

    where: str  # an object key, "<key> record <seq>", or a checkpoint key
    why: str
    # False for a gap found after every checkpoint, object and record checked out as written
    # (an accepted message without an outcome): the trail is incomplete, not forged.
    authentic: bool = True


@dataclass
class Verification:
    """The verifier's result: counts, and the first problem (None: the trail verifies)."""

    records: int = 0
    objects: int = 0
    checkpoints: int = 0
    problem: Problem | None = None
    message_ids: dict[str, set[str]] = field(default_factory=dict)  # event -> message ids

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return self.problem is None


def verify_trail(
    *,
    objects: Mapping[str, bytes],
    checkpoints: Sequence[tuple[str, Mapping[str, Any]]],
    keys: Keyring,
    writer: str,
    anchor: tuple[str, Mapping[str, Any]] | None = None,
) -> Verification:
    """Check one writer's trail: every checkpoint's signature (by a key of ``keys``, never an
    older one than its predecessor's) and chain, that the objects it names exist with their
    hashes and Merkle root, that every object is covered by a checkpoint (except those after
    the last one), and the records' sequence and hash chain across objects.

    ``checkpoints`` in checkpoint order (key, body); ``objects`` by key, ordered by key.
    ``anchor`` (key, body), to check a window of a long trail: the checkpoint just before
    ``checkpoints``; its signature is checked, and the numbering, the signature link and the
    record chain continue from it instead of from the start (what precedes it is not read).
    Stops at the first problem and names it.
    """
    result = Verification()
    covered: list[str] = []
    previous_signature: str | None = None
    number, chain, rank = 1, Chain(writer), 0
    if anchor is not None:
        key, body = anchor
        # Its own number and link are taken as they are: only its signature can be checked.
        own: Mapping[str, Any] = (
            body if isinstance(body, Mapping) else {}
        )  # else seal_check names it
        number = cast(int, own.get("checkpoint"))
        problem, rank = seal_check(
            key,
            body,
            number,
            own.get("previous_signature"),
            keys=keys,
            newest_rank=rank,
            writer=writer,
        )
        if problem is not None:
            result.problem = problem
            return result
        previous_signature = str(body["signature"])
        number = int(body["checkpoint"]) + 1
        chain = Chain(writer, int(body["last_seq"]), str(body["last_hash"]))
    # key -> SHA-256s of the attempts the writer gave up on under it (any may be the stored one)
    abandoned: dict[str, set[str]] = {}
    for expected, (key, checkpoint) in enumerate(checkpoints, start=number):
        problem, rank = seal_check(
            key,
            checkpoint,
            expected,
            previous_signature,
            keys=keys,
            newest_rank=rank,
            writer=writer,
        )
        problem = problem or _check_objects(key, checkpoint, objects)
        if problem is not None:
            result.problem = problem
            return result
        previous_signature = str(checkpoint["signature"])
        covered.extend(item["key"] for item in checkpoint["objects"])
        for item in checkpoint.get("abandoned", ()):
            abandoned.setdefault(str(item["key"]), set()).add(str(item["sha256"]))
        result.checkpoints += 1
    for key in covered:  # written again later: the chain's object, checked as such above
        abandoned.pop(key, None)
    ordered = sorted((key for key in objects if key not in abandoned), key=sequence_order)
    uncovered_tail = ordered[len(covered) :]
    problem = _check_abandoned(abandoned, objects.get) or _extra_among_sealed(ordered, covered)
    if problem is not None:
        result.problem = problem
        return result
    first_accepted: dict[str, str] = {}  # message id -> where it was first accepted
    problem = _walk_records([*covered, *uncovered_tail], objects, chain, result, first_accepted)
    if problem is not None:
        result.problem = problem
        return result
    if checkpoints:
        last = checkpoints[-1][1]
        if not uncovered_tail and (chain.seq, chain.last_hash) != (
            last["last_seq"],
            last["last_hash"],
        ):
            result.problem = Problem(
                checkpoints[-1][0], f"the trail ends at record {chain.seq}, not {last['last_seq']}"
            )
            return result
    result.problem = _without_outcome(first_accepted, result.message_ids)
    return result


def _checkpoint_body(data: bytes) -> dict[str, Any] | None:
    """A checkpoint object's body as stored, or None when it is not a JSON object (its
    signature, checked by the verifier, tells whether it is a checkpoint)."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def verify_intervals(
    *,
    object_keys: Sequence[str],
    checkpoint_keys: Sequence[str],
    read: Callable[[str], bytes | None],
    keys: Keyring,
    writer: str,
) -> Verification:
    """``verify_trail`` over a whole trail, one checkpoint's interval at a time, so memory holds
    the objects of one interval, never the trail's records: one interval's objects, the keys,
    and the ids of the messages with an outcome (a keyed digest each, ``fabric.compliance.IdSet``:
    tens of bytes, against about 600 for a record read whole). ``message_ids`` of the result
    stays empty.

    ``checkpoint_keys`` and ``object_keys`` as listed (key order; the checkpoints listed first,
    so an object sealed between the two listings is in both); ``read`` gives an object's bytes,
    None when there is none. Each checkpoint's seal is checked before anything it names is read
    (its signature, key, number and link to the checkpoint before it: a forged one names what
    it likes), and what it names must be listed under ``audit/<writer>/`` (nothing else is
    read); then it is verified with those objects from the checkpoint before it (the
    ``anchor``: the numbering, key rank, signature link and record chain go on from it), and its
    records must end where it says; then the objects after the last checkpoint. What spans
    intervals is checked across them: the abandoned attempts (read for their hash, if listed,
    once every checkpoint is read: a later one may name the key as the chain's), an object among
    the sealed ones that no checkpoint names, and last an accepted message with no outcome
    anywhere in the trail. Stops at the first problem and names it.
    """
    result = Verification()
    outcomes = _Outcomes()
    keys = remembering(keys)  # each checkpoint is checked again with its objects, and as anchor
    listed, prefix = set(object_keys), f"audit/{writer}/"
    anchor: tuple[str, Mapping[str, Any]] | None = None
    expected, previous_signature, rank = 1, None, 0
    covered: list[str] = []
    abandoned: dict[str, set[str]] = {}
    for key in checkpoint_keys:
        data = read(key)
        checkpoint = None if data is None else _checkpoint_body(data)
        if checkpoint is None:
            result.problem = Problem(key, "listed but gone" if data is None else NOT_A_CHECKPOINT)
            return result
        # Its seal first: a forged checkpoint may name any key, any number of times; none of
        # them is read, nor any key outside the writer's objects as listed.
        problem, rank = seal_check(
            key,
            checkpoint,
            expected,
            previous_signature,
            keys=keys,
            newest_rank=rank,
            writer=writer,
        )
        named = [] if problem is not None else [str(i["key"]) for i in checkpoint["objects"]]
        problem = problem or unlisted_key(key, named, listed, prefix)
        if problem is not None:
            result.problem = problem
            return result
        interval = {name: stored for name in named if (stored := read(name)) is not None}
        checked = verify_trail(
            objects=interval,
            checkpoints=[(key, checkpoint)],
            keys=keys,
            writer=writer,
            anchor=anchor,
        )
        result.problem = _tally(result, checked, outcomes, named, interval)
        if result.problem is not None:
            return result
        del interval
        covered.extend(named)
        for item in checkpoint.get("abandoned", ()):
            abandoned.setdefault(str(item["key"]), set()).add(str(item["sha256"]))
        anchor = (key, checkpoint)
        expected, previous_signature = expected + 1, str(checkpoint["signature"])
    for key in covered:  # written again later: the chain's object, checked as such
        abandoned.pop(key, None)
    ordered = sorted((key for key in object_keys if key not in abandoned), key=sequence_order)

    def listed_only(name: str) -> bytes | None:  # an abandoned attempt not listed: never stored
        return read(name) if name in listed else None

    result.problem = _check_abandoned(abandoned, listed_only) or _extra_among_sealed(
        ordered, covered
    )
    if result.problem is not None:
        return result
    tail = ordered[len(covered) :]
    interval = {}
    for key in tail:
        stored = read(key)
        if stored is None:
            result.problem = Problem(key, "listed but gone")
            return result
        interval[key] = stored
    checked = verify_trail(
        objects=interval, checkpoints=[], keys=keys, writer=writer, anchor=anchor
    )
    result.problem = _tally(result, checked, outcomes, tail, interval) or outcomes.problem()
    return result


def unlisted_key(key: str, named: Sequence[str], listed: Set[str], prefix: str) -> Problem | None:
    """The first key checkpoint ``key`` names that is not to be read, if any: outside ``prefix``
    (the writer's objects), or not in the listing ``listed`` (missing)."""
    for name in named:
        if not name.startswith(prefix):
            return Problem(name, f"named by {key}, outside {prefix}")
        if name not in listed:
            return Problem(name, f"named by {key} but missing")
    return None


def _tally(
    result: Verification,
    checked: Verification,
    outcomes: _Outcomes,
    walked: Sequence[str],
    objects: Mapping[str, bytes],
) -> Problem | None:
    """Add one interval's counts to ``result`` and its records' outcomes to ``outcomes``; its
    problem, unless only an acceptance without an outcome (it may be in another interval)."""
    result.records += checked.records
    result.objects += checked.objects
    result.checkpoints += checked.checkpoints
    if checked.problem is not None and checked.problem.authentic:
        return checked.problem
    for key in walked:
        outcomes.add(key, decode_object(objects[key]))
    return None


class _Outcomes:
    """The accepted messages without an outcome (``routed`` or ``fallback``) so far, across
    intervals: the ids with an outcome (an acceptance after it needs none), and the first
    place of each acceptance still waiting for one."""

    def __init__(self) -> None:
        from fabric.compliance import IdSet  # not at the top: fabric.compliance imports this

        self._answered = IdSet()
        self._waiting: dict[str, str] = {}  # message id -> "<key> record <seq>", in trail order

    def add(self, key: str, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            event, message_id = record.get("event"), record.get("message_id")
            if not isinstance(event, str) or not isinstance(message_id, str):
                continue
            if event in OUTCOME_EVENTS:
                self._answered.add(message_id)
                self._waiting.pop(message_id, None)
            elif event == "accepted" and message_id not in self._answered:
                self._waiting.setdefault(message_id, f"{key} record {record.get('seq')}")

    def problem(self) -> Problem | None:
        where = next(iter(self._waiting.values()), None)
        return None if where is None else Problem(where, _NO_OUTCOME, authentic=False)


class _RememberedSigner:
    """A signer that remembers the last two signatures it found good, so a checkpoint checked
    again (its seal before its objects are read, then with them, then as the next interval's
    anchor, beside that interval's checkpoint) costs no second KMS call."""

    def __init__(self, signer: Signer) -> None:
        self.key_id, self._signer = signer.key_id, signer
        self._good: list[tuple[bytes, bytes]] = []

    def sign(self, message: bytes) -> bytes:
        return self._signer.sign(message)

    def verify(self, message: bytes, signature: bytes) -> bool:
        if (message, signature) in self._good:
            return True
        good = self._signer.verify(message, signature)
        if good:
            self._good = [*self._good[-1:], (message, signature)]
        return good


def remembering(keys: Keyring) -> Keyring:
    """``keys``, each signer remembering the last signatures it found good: a checkpoint whose
    seal is checked twice (before its objects are read, then with them) is verified once."""
    ranked = sorted(keys._by_id.values(), key=lambda found: found[0])
    return Keyring([_RememberedSigner(signer) for _, signer in ranked])


def _walk_records(
    keys: Sequence[str],
    objects: Mapping[str, bytes],
    chain: Chain,
    result: Verification,
    first_accepted: dict[str, str],
) -> Problem | None:
    """Every record of ``keys`` in order: writer, sequence and hash chain; counts into
    ``result``, accepted message ids (first place) into ``first_accepted``."""
    for key in keys:
        try:
            records = decode_object(objects[key])
        except ValueError as exc:
            return Problem(key, f"not a batch object: {exc}")
        except RecursionError:  # an unsealed object is read before anything vouches for it
            return Problem(key, "not a batch object: nested deeper than the parser")
        for record in records:
            problem = _check_record(key, record, chain)
            if problem is not None:
                return problem
            result.records += 1
            event, message_id = record.get("event"), record.get("message_id")
            if isinstance(event, str) and isinstance(message_id, str):
                result.message_ids.setdefault(event, set()).add(message_id)
                if event == "accepted":
                    first_accepted.setdefault(message_id, f"{key} record {record.get('seq')}")
        result.objects += 1
    return None


def _without_outcome(
    first_accepted: Mapping[str, str], message_ids: Mapping[str, set[str]]
) -> Problem | None:
    """The first accepted message the trail does not say where it went (``routed`` to its
    queues, or stored on the ``fallback`` path): a component lost part of what it recorded."""
    answered = set().union(*(message_ids.get(event, set()) for event in OUTCOME_EVENTS))
    for message_id, where in first_accepted.items():
        if message_id not in answered:
            # No message id here: problems go to the compliance topic's summary too.
            return Problem(where, _NO_OUTCOME, authentic=False)
    return None


def _extra_among_sealed(ordered: Sequence[str], covered: Sequence[str]) -> Problem | None:
    """The first object among the sealed ones that no checkpoint names, if any (every named
    object exists, checked before, so the first difference is an extra one)."""
    if list(ordered[: len(covered)]) == list(covered):
        return None
    first = next((k for k, c in zip(ordered, covered, strict=False) if k != c), None)
    return Problem(first or covered[-1], "an object no checkpoint names, among sealed ones")


def sequence_order(key: str) -> tuple[str, str]:
    """Sorts audit object keys by the sequence numbers in their names (``<first>-<last>.jsonl``,
    zero-padded), not by the day folder: a write at 23:59:59.9 by a clock half a second behind
    the previous write's 00:00:00.4 is later in the chain, though its day is earlier."""
    return key.rsplit("/", 1)[-1], key


def _check_abandoned(
    abandoned: Mapping[str, set[str]], read: Callable[[str], bytes | None]
) -> Problem | None:
    """An abandoned attempt a checkpoint names may be missing (it never got stored); if stored,
    it must be one of the objects the writer meant to store there, by its SHA-256."""
    for key, digests in abandoned.items():
        data = read(key)
        if data is not None and hashlib.sha256(data).hexdigest() not in digests:
            return Problem(key, "an abandoned attempt whose SHA-256 differs")
    return None


def seal_check(
    key: str,
    checkpoint: Mapping[str, Any],
    expected: int,
    previous_signature: str | None,
    *,
    keys: Keyring,
    newest_rank: int,
    writer: str,
) -> tuple[Problem | None, int]:
    """The problem with ``checkpoint``'s seal, if any, and the rank of the key that signed it.

    The key must be trusted and not older than ``newest_rank`` (the previous checkpoint's);
    then its signature, number and link are checked, and that it is ``writer``'s (every writer
    signs with the same key: another's checkpoint is validly signed)."""
    if not isinstance(checkpoint, Mapping):  # what a JSON checkpoint object can be
        return Problem(key, NOT_A_CHECKPOINT), newest_rank
    found = keys.find(checkpoint.get("key_id"))
    if found is None:
        return Problem(key, "signed by a key that is not trusted"), newest_rank
    rank, signer = found
    if rank < newest_rank:
        return Problem(key, "signed by a retired key after a newer one"), newest_rank
    problem = _check_seal(key, checkpoint, expected, previous_signature, signer)
    if problem is None and checkpoint.get("writer") != writer:
        problem = Problem(key, f"a checkpoint of {checkpoint.get('writer')!r}, not {writer!r}")
    return problem, rank


def _check_seal(
    key: str,
    checkpoint: Mapping[str, Any],
    expected: int,
    previous_signature: str | None,
    signer: Signer,
) -> Problem | None:
    unsigned = {name: value for name, value in checkpoint.items() if name != "signature"}
    try:
        signature = base64.b64decode(str(checkpoint["signature"]), validate=True)
    except (KeyError, ValueError):
        return Problem(key, "no valid signature")
    try:
        message = canonical(unsigned)
    except (UnicodeEncodeError, RecursionError):
        return Problem(key, f"not a checkpoint ({NO_CANONICAL_FORM})")
    if not signer.verify(message, signature):
        return Problem(key, "the signature does not match the checkpoint")
    if checkpoint.get("checkpoint") != expected:
        return Problem(key, f"checkpoint {checkpoint.get('checkpoint')}, expected {expected}")
    if checkpoint.get("previous_signature") != previous_signature:
        return Problem(key, "does not chain to the previous checkpoint's signature")
    return None


def _check_objects(
    key: str, checkpoint: Mapping[str, Any], objects: Mapping[str, bytes]
) -> Problem | None:
    leaves = []
    for item in checkpoint["objects"]:
        data = objects.get(item["key"])
        if data is None:
            return Problem(item["key"], f"named by {key} but missing")
        if hashlib.sha256(data).hexdigest() != item["sha256"]:
            return Problem(item["key"], "its SHA-256 differs from the checkpoint's")
        leaves.append(hashlib.sha256(data).digest())
    if merkle_root(leaves) != checkpoint["merkle_root"]:
        return Problem(key, "the Merkle root does not match its objects")
    return None


def _check_record(key: str, record: Mapping[str, Any], chain: Chain) -> Problem | None:
    where = f"{key} record {record.get('seq')}"
    if record.get("writer") != chain.writer:
        return Problem(where, f"written by {record.get('writer')!r}, not {chain.writer!r}")
    if record.get("seq") != chain.seq + 1:
        return Problem(where, f"sequence gap: expected record {chain.seq + 1}")
    if record.get("prev") != chain.last_hash:
        return Problem(where, "its prev hash does not match the record before it")
    try:
        last_hash = record_hash(record)
    except (UnicodeEncodeError, RecursionError):  # only in the unsealed tail: nothing vouches
        return Problem(where, f"not a record the writer could have written ({NO_CANONICAL_FORM})")
    chain.seq += 1
    chain.last_hash = last_hash
    return None
