"""The public message contract `fabric.envelope/1`: the Envelope, its validation and wire format."""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from typing import Any, TypeAlias, TypeVar

from fabric.errors import MessageRejected
from fabric.jsoncodec import canonical_json
from fabric.stakeholders import Stakeholder

JsonValue: TypeAlias = bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"] | None

VERSION = "fabric.envelope/1"
MAX_ENVELOPE_BYTES = 262_144  # 256 KiB, the SNS/SQS message limit: the largest body read
MAX_HEADERS_BYTES = 4_096  # the envelope's headers as compact JSON: routing values, not data
# SNS counts message attributes in its 256 KiB. The fallback sends the message id, topic,
# audience and delivery headers (the envelope's, plus the audience gate) as attributes; 8 KiB
# covers them, so an envelope of at most MAX_ENCODED_BYTES fits both transports.
FALLBACK_ATTRIBUTE_BYTES = 8_192
MAX_ENCODED_BYTES = MAX_ENVELOPE_BYTES - FALLBACK_ATTRIBUTE_BYTES  # 248 KiB
MAX_TOPIC_BYTES = 255  # an AMQP routing key is a shortstr
MAX_SHORT_STRING = 255  # correlation_id and reply_to travel as AMQP shortstr properties

TOPIC_RE = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)*")
HEADER_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# RabbitMQ ignores `x-` headers when matching; `fabric-` headers are set by the fabric itself.
RESERVED_HEADER_PREFIXES = ("x-", "fabric-")
# RabbitMQ reserves `amq.` names; a publish whose reply-to is `amq.rabbitmq.reply-to` (its direct
# reply-to) on a channel without a reply consumer has the broker close that channel (406).
RESERVED_REPLY_TO_PREFIX = "amq."

# ASCII: with IGNORECASE alone, the Kelvin sign and the long s match K and S.
_UUID_RE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I | re.ASCII
)
_ULID_RE = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", re.I | re.ASCII)
_NIL_UUID = "00000000-0000-0000-0000-000000000000"
_RFC3339_RE = re.compile(  # ASCII: \d would take any Unicode digit, and int() reads them
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


class Priority(StrEnum):
    """How urgent a message is for its consumers; the emergency *path* is chosen by routing."""

    EMERGENCY = "emergency"
    HIGH = "high"
    NORMAL = "normal"
    BULK = "bulk"


class Classification(StrEnum):
    """Data sensitivity; `restricted` (child data) is encrypted at message level."""

    PUBLIC = "public"
    INTERNAL = "internal"
    RESTRICTED = "restricted"

    @property
    def rank(self) -> int:
        """Order from least (0, public) to most (2, restricted) sensitive."""
        return _CLASSIFICATION_RANK[self]


_CLASSIFICATION_RANK = {
    Classification.PUBLIC: 0,
    Classification.INTERNAL: 1,
    Classification.RESTRICTED: 2,
}


class Reason(StrEnum):
    """Why a message was rejected; a stable public code, see `meaning` and the contract doc."""

    EMPTY_BODY = "empty_body"
    INVALID_UTF8 = "invalid_utf8"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_FIELD_TYPE = "invalid_field_type"
    INVALID_MESSAGE_ID = "invalid_message_id"
    INVALID_TOPIC = "invalid_topic"
    INVALID_PRIORITY = "invalid_priority"
    INVALID_CLASSIFICATION = "invalid_classification"
    INVALID_TIMESTAMP = "invalid_timestamp"
    INVALID_HEADER = "invalid_header"
    UNKNOWN_AUDIENCE = "unknown_audience"
    EXPIRED = "expired"
    TOO_LARGE = "too_large"
    DUPLICATE_MESSAGE_ID = "duplicate_message_id"
    SOURCE_NOT_ALLOWED = "source_not_allowed"
    AUDIENCE_NOT_ROUTABLE = "audience_not_routable"
    CLASSIFICATION_TOO_LOW = "classification_too_low"
    UNAVAILABLE = "unavailable"

    @property
    def meaning(self) -> str:
        """One line saying what the code means, for responses and docs."""
        return _MEANINGS[self]


_MEANINGS: dict[Reason, str] = {
    Reason.EMPTY_BODY: "the body is empty or only whitespace",
    Reason.INVALID_UTF8: "the body is not valid UTF-8",
    Reason.MALFORMED_JSON: "the body is not valid JSON (including NaN/Infinity and duplicate keys)",
    Reason.NOT_AN_OBJECT: "the envelope is valid JSON but not a JSON object",
    Reason.MISSING_FIELD: "a required field (topic, payload) is absent",
    Reason.UNKNOWN_FIELD: "the envelope has a field that fabric.envelope/1 does not define",
    Reason.UNSUPPORTED_VERSION: "`version` is present and is not fabric.envelope/1",
    Reason.INVALID_FIELD_TYPE: "a field has the wrong JSON type or is out of its bounds",
    Reason.INVALID_MESSAGE_ID: "message_id is neither a UUID (non-nil) nor a ULID",
    Reason.INVALID_TOPIC: "topic is not dot-separated [a-z0-9-]+ words of at most 255 bytes",
    Reason.INVALID_PRIORITY: "priority is not one of emergency, high, normal, bulk",
    Reason.INVALID_CLASSIFICATION: "classification is not one of public, internal, restricted",
    Reason.INVALID_TIMESTAMP: "a timestamp is not RFC 3339 with a timezone",
    Reason.INVALID_HEADER: "a header name is malformed or reserved (x-, fabric-), its value is "
    "not a string, or the headers exceed 4096 bytes as JSON",
    Reason.UNKNOWN_AUDIENCE: "audience is empty or names something that is not a stakeholder group",
    Reason.EXPIRED: "expires_at is already in the past when the fabric receives the message",
    Reason.TOO_LARGE: "the body exceeds 256 KiB (262144 bytes), or the encoded envelope 248 "
    "KiB (253952 bytes), which leaves the SNS fallback room for its message attributes",
    Reason.DUPLICATE_MESSAGE_ID: "an earlier message of the same batch with the same message_id "
    "was taken (a copy refused for good does not count)",
    Reason.SOURCE_NOT_ALLOWED: "the authenticated source may not publish this topic",
    Reason.AUDIENCE_NOT_ROUTABLE: "audience names a group the routing table does not route "
    "this message to",
    Reason.CLASSIFICATION_TOO_LOW: "the routing table requires a stricter classification for "
    "this topic",
    Reason.UNAVAILABLE: "the message could not be stored now (neither RabbitMQ nor the SNS/SQS "
    "fallback took it, or its restricted payload could not be encrypted); retry later",
}

_FIELDS = frozenset(
    {
        "version",
        "message_id",
        "topic",
        "priority",
        "classification",
        "source",
        "audience",
        "headers",
        "correlation_id",
        "reply_to",
        "occurred_at",
        "expires_at",
        "embargo_until",
        "payload",
    }
)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A valid `fabric.envelope/1` message; build it with `validate_envelope` or `from_wire`.

    `audience` is None when the producer left routing to the table. Timestamps are timezone-aware.
    The dataclass is frozen but `payload` and `headers` are plain containers: do not mutate them.
    """

    message_id: str
    topic: str
    source: str
    payload: JsonValue
    priority: Priority = Priority.NORMAL
    classification: Classification = Classification.INTERNAL
    audience: frozenset[Stakeholder] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    correlation_id: str | None = None
    reply_to: str | None = None
    occurred_at: datetime | None = None
    expires_at: datetime | None = None
    embargo_until: datetime | None = None
    # The wire form, computed once (validation needs its size, the router its bytes). Not an
    # init field, so `dataclasses.replace` (e.g. sealing the payload) starts without it.
    _wire: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def to_dict(self) -> dict[str, JsonValue]:
        """The envelope as a JSON object; absent optional fields and empty headers are omitted."""
        out: dict[str, JsonValue] = {
            "version": VERSION,
            "message_id": self.message_id,
            "topic": self.topic,
            "source": self.source,
            "priority": str(self.priority),
            "classification": str(self.classification),
            "payload": self.payload,
        }
        if self.audience is not None:
            out["audience"] = [str(group) for group in sorted(self.audience)]
        if self.headers:
            out["headers"] = dict(self.headers)
        for name in ("correlation_id", "reply_to"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for name in ("occurred_at", "expires_at", "embargo_until"):
            moment = getattr(self, name)
            if moment is not None:
                out[name] = format_timestamp(moment)
        return out

    def to_json_bytes(self) -> bytes:
        """Canonical wire form: compact UTF-8 JSON with sorted keys (stable for hashing)."""
        if self._wire is None:
            object.__setattr__(self, "_wire", canonical_json(self.to_dict()))
        return self._wire  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one message was refused; `message_id` is set when the input carried a valid one."""

    reason: Reason
    message: str
    message_id: str | None = None


ValidationResult: TypeAlias = Envelope | Rejection


class _Invalid(Exception):
    """Internal short-circuit carrying a rejection out of nested checks."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@functools.lru_cache(maxsize=256)
def format_timestamp(moment: datetime) -> str:
    """Render an aware datetime as RFC 3339 in UTC with a `Z` suffix (microseconds if any)."""
    utc = moment.astimezone(UTC)
    # Not strftime: its %Y writes the year 99 as "99", which no RFC 3339 reader takes back.
    text = utc.replace(tzinfo=None).isoformat(timespec="seconds")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_timestamp(text: str) -> datetime:
    """Parse an RFC 3339 timestamp that carries a timezone (`Z` or `±hh:mm`).

    Fractional seconds beyond microseconds are truncated. A leap second is `23:59:60` in UTC
    (RFC 3339 §5.7; any other `:60` is refused): Python's datetime has no 60th second, so it
    reads as 23:59:59.999999, after every other moment of that minute and before the next.

    Raises:
        ValueError: the text is not RFC 3339 with a timezone, or names an impossible moment.
    """
    match = _RFC3339_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp with timezone: {_quoted(text)}")
    year, month, day, hour, minute, second, frac, zulu, sign, off_h, off_m = match.groups()
    if zulu:
        tz = UTC
    else:
        offset = timedelta(hours=int(off_h), minutes=int(off_m))
        if offset >= timedelta(hours=24) or int(off_m) > 59:
            raise ValueError(f"timezone offset out of range: {_quoted(text)}")
        tz = timezone(-offset if sign == "-" else offset)
    leap = second == "60"
    whole, micro = (59, 999_999) if leap else (int(second), int((frac or "0")[:6].ljust(6, "0")))
    moment = datetime(
        int(year), int(month), int(day), int(hour), int(minute), whole, micro, tzinfo=tz
    )
    if tz is not UTC or leap:
        try:  # 0001-01-01T00:00:00+01:00 is before the first moment Python can hold in UTC
            utc = moment.astimezone(UTC)
        except OverflowError:
            raise ValueError(f"timestamp out of range: {_quoted(text)}") from None
        if leap and (utc.hour, utc.minute) != (23, 59):
            raise ValueError(f"a leap second is 23:59:60 in UTC: {_quoted(text)}")
    return moment


_QUOTED_CHARS = 60


def _quoted(value: object) -> str:
    """``repr(value)`` for a rejection message, cut to a few dozen characters.

    Rejection messages go back to the producer in the response: a field name of 200 KB quoted
    whole (six bytes a character once JSON escapes it) would push a batch's answer past
    Lambda's 6 MB response limit.
    """
    try:
        text = repr(value)
    except RecursionError:  # nested about as deeply as the event's parser could go
        return f"<{type(value).__name__} nested too deeply to quote>"
    return text if len(text) <= _QUOTED_CHARS else f"{text[: _QUOTED_CHARS - 4]}...{text[-1]}"


def new_message_id() -> str:
    """A fresh message id for messages that arrive without one (random UUID version 4)."""
    return str(uuid.uuid4())


def normalize_message_id(value: str) -> str | None:
    """The canonical form of a UUID (lowercase) or ULID (uppercase), or None if it is neither.

    The nil UUID is refused: it is a placeholder, and as an idempotency key it would make
    unrelated messages look like duplicates.
    """
    if _UUID_RE.fullmatch(value):
        lowered = value.lower()
        return None if lowered == _NIL_UUID else lowered
    if _ULID_RE.fullmatch(value):
        return value.upper()
    return None


def validate_envelope(
    raw: bytes | str | JsonValue,
    source: str,
    *,
    now: datetime | None = None,
    default_id: str | None = None,
) -> ValidationResult:
    """Validate one incoming message and return an Envelope, or a Rejection saying why not.

    `raw` is the body as bytes or text, or an already-decoded JSON value (e.g. one element of a
    router batch). `source` is the authenticated caller (a stakeholder group or service identity);
    any `source` field in the body is ignored and replaced by it. `now` is the clock used for the
    expiry check (default: the current UTC time). `default_id` (normalized, see
    `normalize_message_id`) is the message id of a message without one, instead of a random one:
    an SQS ingest message's own id, the same on every delivery of it; a rejection of a message
    without a readable id carries it too, so its audit record names the SQS message. Never
    raises for bad input.

    Raises:
        ValueError: `source` is empty (a caller bug, not bad input).
    """
    if not source:
        raise ValueError("source must be the authenticated caller's identity")
    if isinstance(raw, bytes | str):
        try:
            size = len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw)
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a "\ud800" escape
            return Rejection(
                Reason.INVALID_UTF8, f"body is not UTF-8 at character {exc.start}", default_id
            )
        if size > MAX_ENVELOPE_BYTES:
            return Rejection(
                Reason.TOO_LARGE, f"body is {size} bytes, limit {MAX_ENVELOPE_BYTES}", default_id
            )
    try:
        obj = _decode(raw)
    except _Invalid as bad:
        return Rejection(bad.reason, bad.message, default_id)
    return _build(
        obj, source=source, now=now or datetime.now(UTC), ingress=True, default_id=default_id
    )


def validate_batch(
    items: Sequence[bytes | str | JsonValue], source: str, *, now: datetime | None = None
) -> list[ValidationResult]:
    """Validate a batch: one result per item, in input order.

    A valid message whose `message_id` equals an earlier *valid* message of the same batch is
    rejected as `duplicate_message_id` (the first occurrence wins; a rejected first occurrence
    never entered the fabric, so it does not block a later valid one). This is the envelope's
    view only: the router decides duplicates after the routing table, so that a copy refused
    there does not block a corrected one either (`fabric.router`).

    Raises:
        ValueError: `source` is empty.
    """
    return list(iter_validated(items, source, now=now))


def iter_validated(
    items: Iterable[bytes | str | JsonValue], source: str, *, now: datetime | None = None
) -> Iterator[ValidationResult]:
    """`validate_batch`, one result at a time (so a caller can act on each as it comes).

    Raises:
        ValueError: `source` is empty.
    """
    moment = now or datetime.now(UTC)
    seen: set[str] = set()
    for item in items:
        result = validate_envelope(item, source, now=moment)
        if isinstance(result, Envelope):
            if result.message_id in seen:
                result = Rejection(
                    Reason.DUPLICATE_MESSAGE_ID,
                    f"message_id {result.message_id} already appears earlier in this batch",
                    result.message_id,
                )
            else:
                seen.add(result.message_id)
        yield result


def from_wire(data: bytes | str) -> Envelope:
    """Parse an envelope the fabric itself produced (broker, fallback queue, archive).

    The wire form carries `version` and `source`; expiry is not checked (the consumer decides
    what to do with a message that expired while queued).

    Raises:
        MessageRejected: the data is not a valid `fabric.envelope/1` wire envelope.
    """
    try:
        obj = _decode(data)
        if not isinstance(obj, dict):
            raise _Invalid(Reason.NOT_AN_OBJECT, "envelope must be a JSON object")
        for required in ("version", "source"):
            if required not in obj:
                raise _Invalid(Reason.MISSING_FIELD, f"wire envelope has no {required!r}")
        source = obj["source"]
        if not isinstance(source, str) or not source:
            raise _Invalid(Reason.INVALID_FIELD_TYPE, "source must be a non-empty string")
    except _Invalid as bad:
        raise MessageRejected(Rejection(bad.reason, bad.message)) from None
    # Stored before today's ingress limits, perhaps: only the wire's own limit applies.
    result = _build(obj, source=source, now=datetime.now(UTC), ingress=False)
    if isinstance(result, Rejection):
        raise MessageRejected(result)
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:  # linear: counting each key's occurrences was quadratic
            if key in seen:
                raise ValueError(f"duplicate key {_quoted(key)}")
            seen.add(key)
    return obj


def strict_json(text: str | bytes) -> JsonValue:
    """``text`` parsed as the contract reads JSON: no duplicate keys, no NaN or Infinity.

    Raises:
        ValueError: it is not such JSON (also: too deeply nested for the parser, or not UTF-8).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # json.loads would read UTF-16 and UTF-32 bytes too
    try:
        decoded: JsonValue = json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys
        )
    except RecursionError:
        raise ValueError("nested too deeply") from None
    return decoded


def _decode(raw: bytes | str | JsonValue) -> JsonValue:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Invalid(Reason.INVALID_UTF8, f"body is not UTF-8 at byte {exc.start}") from None
    if not isinstance(raw, str):
        return raw
    if not raw.strip():
        raise _Invalid(Reason.EMPTY_BODY, "body is empty")
    try:
        return strict_json(raw)
    except ValueError as exc:
        raise _Invalid(Reason.MALFORMED_JSON, f"body is not valid JSON: {exc}") from None


def _build(
    obj: JsonValue, *, source: str, now: datetime, ingress: bool, default_id: str | None = None
) -> ValidationResult:
    """The envelope, or why not. ``ingress``: a producer's message, so its expiry and the
    limits new messages must keep (headers, the encoded size the fallback can carry) are
    checked; otherwise a stored one, which keeps the limits it was accepted under."""
    if not isinstance(obj, dict):
        return Rejection(Reason.NOT_AN_OBJECT, "envelope must be a JSON object", default_id)
    message_id: str | None = None
    try:
        message_id = _message_id(obj.get("message_id"))
        unknown = set(obj) - _FIELDS
        if unknown:
            if not all(isinstance(key, str) for key in unknown):  # an in-process caller's dict
                raise _Invalid(Reason.MALFORMED_JSON, "object keys must be strings")
            names = [_plain(name) for name in sorted(unknown)[:_LISTED]]
            if len(unknown) > _LISTED:
                names.append(f"and {len(unknown) - _LISTED} more")
            raise _Invalid(Reason.UNKNOWN_FIELD, f"unknown field(s): {', '.join(names)}")
        version = obj.get("version")
        if version is not None and version != VERSION:
            raise _Invalid(Reason.UNSUPPORTED_VERSION, f"version must be {VERSION!r}")
        for required in ("topic", "payload"):
            if required not in obj:
                raise _Invalid(Reason.MISSING_FIELD, f"{required!r} is required")
        envelope = Envelope(
            message_id=message_id or default_id or new_message_id(),
            topic=_topic(obj["topic"]),
            source=source,
            payload=obj["payload"],
            priority=_choice(obj, "priority", Priority, Reason.INVALID_PRIORITY),
            classification=_choice(
                obj, "classification", Classification, Reason.INVALID_CLASSIFICATION
            ),
            audience=_audience(obj.get("audience")),
            headers=_headers(obj.get("headers"), limit=ingress),
            correlation_id=_short_string(obj, "correlation_id"),
            reply_to=_reply_to(obj, ingress=ingress),
            occurred_at=_timestamp(obj, "occurred_at"),
            expires_at=_timestamp(obj, "expires_at"),
            embargo_until=_timestamp(obj, "embargo_until"),
        )
        if ingress and envelope.expires_at is not None and envelope.expires_at <= now:
            raise _Invalid(Reason.EXPIRED, f"expired at {format_timestamp(envelope.expires_at)}")
        try:
            size = len(envelope.to_json_bytes())
        except ValueError as exc:  # e.g. NaN in a payload handed over as an object, not text
            raise _Invalid(Reason.MALFORMED_JSON, f"payload is {exc}") from None
        limit = MAX_ENCODED_BYTES if ingress else MAX_ENVELOPE_BYTES
        if size > limit:
            raise _Invalid(
                Reason.TOO_LARGE,
                f"encoded envelope is {size} bytes, limit {limit}; "
                "send large payloads by claim-check",
            )
    except _Invalid as bad:
        return Rejection(bad.reason, bad.message, message_id or default_id)
    return envelope


_LISTED = 5  # unknown field names named in a rejection


def _plain(name: str) -> str:
    """A field name as rejection messages list it: as is, unless it is long or holds what is
    not printable (then ``_quoted``, escaped). A lone surrogate (a direct invoke's event may
    hold one in a key) put in an answer as is made the answer unencodable: Lambda's runtime
    encodes it as UTF-8 after the batch's other messages were stored."""
    return name if len(name) <= _QUOTED_CHARS and name.isprintable() else _quoted(name)


def _message_id(value: JsonValue) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(Reason.INVALID_MESSAGE_ID, "message_id must be a UUID or ULID string")
    normalized = normalize_message_id(value)
    if normalized is None:
        raise _Invalid(Reason.INVALID_MESSAGE_ID, "message_id must be a non-nil UUID or a ULID")
    return normalized


def _topic(value: JsonValue) -> str:
    if not isinstance(value, str) or not TOPIC_RE.fullmatch(value):
        raise _Invalid(
            Reason.INVALID_TOPIC, "topic must be dot-separated lowercase words [a-z0-9-]+"
        )
    if len(value) > MAX_TOPIC_BYTES:  # the regex admits ASCII only, so chars == bytes
        raise _Invalid(Reason.INVALID_TOPIC, f"topic exceeds {MAX_TOPIC_BYTES} bytes")
    return value


_E = TypeVar("_E", bound=StrEnum)
_DEFAULTS = {"priority": Priority.NORMAL.value, "classification": Classification.INTERNAL.value}
_MEMBERS: dict[type[StrEnum], dict[str, StrEnum]] = {
    kind: {member.value: member for member in kind} for kind in (Priority, Classification)
}


def _choice(obj: dict[str, JsonValue], name: str, kind: type[_E], reason: Reason) -> _E:
    value = obj.get(name)
    if value is None:
        value = _DEFAULTS[name]
    # A dict lookup: calling the enum costs a microsecond, twice a message.
    member = _MEMBERS[kind].get(value) if isinstance(value, str) else None
    if member is not None:
        return member  # type: ignore[return-value]
    allowed = ", ".join(member.value for member in kind)
    raise _Invalid(reason, f"{name} must be one of {allowed}")


def _audience(value: JsonValue) -> frozenset[Stakeholder] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _Invalid(Reason.INVALID_FIELD_TYPE, "audience must be a list of stakeholder groups")
    if not value:
        raise _Invalid(Reason.UNKNOWN_AUDIENCE, "audience, when given, must name a group")
    groups: set[Stakeholder] = set()
    for item in value:
        if not isinstance(item, str) or item not in _GROUP_NAMES:
            known = ", ".join(sorted(_GROUP_NAMES))
            raise _Invalid(
                Reason.UNKNOWN_AUDIENCE, f"audience {_quoted(item)} is not one of {known}"
            )
        groups.add(Stakeholder(item))
    return frozenset(groups)


_GROUP_NAMES = frozenset(group.value for group in Stakeholder)


def _headers(value: JsonValue, *, limit: bool = True) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(Reason.INVALID_FIELD_TYPE, "headers must be an object of strings")
    headers: dict[str, str] = {}
    for name, item in value.items():
        if not isinstance(name, str):  # an in-process caller's dict
            raise _Invalid(Reason.INVALID_HEADER, "header names must be strings")
        problem = header_name_problem(name)
        if problem is not None:
            raise _Invalid(Reason.INVALID_HEADER, problem)
        if not isinstance(item, str):
            raise _Invalid(Reason.INVALID_HEADER, f"header {name!r} must have a string value")
        headers[name] = item
    if headers and limit:
        try:
            size = len(canonical_json(headers))
        except ValueError as exc:  # a lone surrogate in a value
            raise _Invalid(Reason.MALFORMED_JSON, f"headers are {exc}") from None
        if size > MAX_HEADERS_BYTES:
            raise _Invalid(
                Reason.INVALID_HEADER, f"headers exceed {MAX_HEADERS_BYTES} bytes as JSON"
            )
    return headers


def header_name_problem(name: str) -> str | None:
    """Why `name` cannot be a routing header (None if it can); shared with the routing table."""
    if not HEADER_NAME_RE.fullmatch(name):
        return f"header name {_quoted(name)} must match {HEADER_NAME_RE.pattern}"
    if name.startswith(RESERVED_HEADER_PREFIXES):
        return f"header name {_quoted(name)} uses a reserved prefix {RESERVED_HEADER_PREFIXES}"
    return None


def _short_string(obj: dict[str, JsonValue], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _Invalid(
            Reason.INVALID_FIELD_TYPE, f"{name} must be a string of 1..{MAX_SHORT_STRING} bytes"
        )
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, as in the payload: not JSON text
        raise _Invalid(Reason.MALFORMED_JSON, f"{name} is not JSON: a lone surrogate") from None
    if size > MAX_SHORT_STRING:
        raise _Invalid(
            Reason.INVALID_FIELD_TYPE, f"{name} must be a string of 1..{MAX_SHORT_STRING} bytes"
        )
    return value


def _reply_to(obj: dict[str, JsonValue], *, ingress: bool) -> str | None:
    """``reply_to``; a new message's may not name an address RabbitMQ reserves (``amq.``). One
    stored before this rule still reads (``amqp_reply_to`` leaves it off the broker)."""
    value = _short_string(obj, "reply_to")
    if ingress and value is not None and value.startswith(RESERVED_REPLY_TO_PREFIX):
        raise _Invalid(
            Reason.INVALID_FIELD_TYPE,
            f"reply_to must not start with {RESERVED_REPLY_TO_PREFIX!r}: RabbitMQ reserves it",
        )
    return value


def amqp_reply_to(value: str | None) -> str | None:
    """``value`` as the reply-to property of a publish to RabbitMQ: None (no property) for a
    name RabbitMQ reserves (``amq.``).

    The router refuses such a ``reply_to``, but a message stored before that (in a fallback
    queue, the archive, a dead-letter queue) still carries it. Published with it, the exact value
    ``amq.rabbitmq.reply-to`` makes the broker close the publishing channel, so the message could
    never be moved and took the messages in flight beside it down with it: every publish of a
    stored or forwarded reply-to goes through here, and the message moves without it.
    """
    if value is None or value.startswith(RESERVED_REPLY_TO_PREFIX):
        return None
    return value


def _timestamp(obj: dict[str, JsonValue], name: str) -> datetime | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(Reason.INVALID_TIMESTAMP, f"{name} must be an RFC 3339 string")
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise _Invalid(Reason.INVALID_TIMESTAMP, f"{name}: {exc}") from None
