"""The router's three entry points: direct invoke, HTTPS (API Gateway HTTP API), SQS ingest.

Each turns its event into (raw messages, authenticated source), calls the router once, and
shapes the answer its caller expects. The source always comes from the authenticated channel:

- direct invoke: the alias the caller invoked (``...:function:<name>:<group>``); each group's
  alias has its own resource policy, so IAM decides who may speak for a group;
- HTTPS: a claim of the JWT that API Gateway's authorizer verified (``FABRIC_IDENTITY_CLAIM``);
- SQS: the ingest queue (``<prefix><group>``); who may send to it is for IAM to decide.

An invocation through an alias is always the direct entry point (``dispatch``).

A ``source`` field in an envelope is never trusted.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fabric.envelope import Reason, normalize_message_id, strict_json
from fabric.router import REJECTED, BatchResult, MessageResult, Router
from fabric.stakeholders import Stakeholder

if TYPE_CHECKING:
    from fabric.bootstrap import RouterRuntime

# Lambda takes a synchronous event of at most 6 MB; API Gateway hands a binary body over as
# base64 (a third larger): 4 MiB is the most whose 413 the function can still answer itself.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_BATCH = 500
_JSON = {"content-type": "application/json"}
_GROUPS = frozenset(group.value for group in Stakeholder)


class BadRequest(Exception):
    """The request (not one message in it) is malformed; ``status`` says which HTTP status."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail

    def body(self) -> dict[str, object]:
        """The error as a response body, same shape as a batch result plus ``error``."""
        return {
            "results": [],
            "accepted": 0,
            "rejected": 0,
            "error": {"reason": self.reason, "detail": self.detail},
        }


# -- direct invoke ------------------------------------------------------------------------------


def handle_direct(event: object, invoked_function_arn: str, router: Router) -> dict[str, object]:
    """``{"messages": [...]}`` → ``{"results": [...], "accepted": n, "rejected": m}``.

    A malformed event or an invocation without a stakeholder alias returns ``error`` instead of
    results; nothing is routed then, and the refusal leaves one audit record
    (``Router.refuse_request``: nothing of the event, not even its hash).
    """
    source: str | None = None
    try:
        source = _alias_group(invoked_function_arn)
        items = _messages_of(event)
        return router.route(items, source=source).to_dict()
    except BadRequest as bad:
        router.refuse_request(reason=bad.reason, source=source)
        return bad.body()


def _qualifier(invoked_function_arn: str) -> str:
    """The alias or version an invocation named (``...:function:<name>:<qualifier>``), or ""."""
    parts = invoked_function_arn.split(":")
    return parts[7] if len(parts) == 8 else ""


def _alias_group(invoked_function_arn: str) -> str:
    qualifier = _qualifier(invoked_function_arn)
    if qualifier not in _GROUPS:
        raise BadRequest(
            401,
            "unauthenticated",
            "invoke the router through the alias of your stakeholder group "
            f"({', '.join(sorted(_GROUPS))})",
        )
    return qualifier


def _messages_of(event: object) -> Sequence[Any]:
    if not isinstance(event, Mapping) or not isinstance(event.get("messages"), list):
        raise BadRequest(400, "malformed_request", 'expected {"messages": [<envelope>, ...]}')
    if len(event) > 1:
        # As in an envelope: a batch-wide "priority" or "classification" the producer meant for
        # every message must not be silently dropped.
        raise BadRequest(400, "malformed_request", "a batch request has no field but messages")
    messages: list[Any] = event["messages"]
    if not messages:
        raise BadRequest(400, "malformed_request", "messages is empty")
    if len(messages) > MAX_BATCH:
        raise BadRequest(413, "too_large", f"at most {MAX_BATCH} messages per request")
    return messages


# -- HTTPS ----------------------------------------------------------------------------------------


def handle_http(event: Mapping[str, Any], router: Router, *, identity_claim: str) -> dict[str, Any]:
    """``POST /v1/messages`` with one envelope or ``{"messages": [...]}``.

    202 all accepted; 207 some rejected; 400 malformed request (or a single invalid envelope);
    401 no verified identity; 403 unknown group or topic not permitted; 413 too large; 503
    nothing accepted and some message ``unavailable``. The body is the batch result (plus
    ``error`` for request errors).
    A request refused as a whole leaves one audit record (see ``Router.refuse_request``).
    """
    source: str | None = None
    try:
        source = _jwt_group(event, identity_claim)
        raw = _http_body(event)
        single, items = _http_messages(raw)
        result = router.route(items, source=source)
    except BadRequest as bad:
        router.refuse_request(reason=bad.reason, source=source)
        return _response(bad.status, bad.body())
    return _response(_http_status(result, single=single), result.to_dict())


def _jwt_group(event: Mapping[str, Any], claim: str) -> str:
    context = event.get("requestContext") or {}
    claims = ((context.get("authorizer") or {}).get("jwt") or {}).get("claims") or {}
    value = claims.get(claim)
    if not value:
        raise BadRequest(401, "unauthenticated", "no verified identity on the request")
    if not isinstance(value, str) or value not in _GROUPS:  # a list claim is unhashable
        raise BadRequest(403, "forbidden", f"{claim} does not name a stakeholder group")
    return value


def _http_body(event: Mapping[str, Any]) -> bytes:
    body = event.get("body")
    if body is None or body == "":
        return b""
    if event.get("isBase64Encoded"):
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(400, "malformed_request", "body is not valid base64") from None
    else:
        data = body.encode("utf-8", "surrogatepass")
    if len(data) > MAX_REQUEST_BYTES:
        raise BadRequest(413, "too_large", f"request body exceeds {MAX_REQUEST_BYTES} bytes")
    return data


def _http_messages(raw: bytes) -> tuple[bool, Sequence[Any]]:
    """(single, items): a batch object is unpacked; anything else is one message as raw bytes,
    so that the router reports its exact problem (bad JSON, too large...).

    A body the contract's strict JSON refuses is read again leniently (``_lenient_messages``):
    a batch with one bad message in it is still a batch, and only that message is refused."""
    try:
        decoded = strict_json(raw)
    except ValueError:  # UnicodeDecodeError is one
        return _lenient_messages(raw)
    if _is_batch(decoded):
        return False, _messages_of(decoded)
    return True, [raw]


def _is_batch(decoded: object) -> bool:
    return isinstance(decoded, dict) and "messages" in decoded and "topic" not in decoded


def _lenient_messages(raw: bytes) -> tuple[bool, Sequence[Any]]:
    """(single, items) of a body that is not strict JSON.

    It is read again, letting through what the contract refuses in JSON that parses (NaN,
    Infinity, integers too long to read, duplicate keys; nesting too deep for the parser). A
    body that is not JSON even so (empty, not UTF-8, a syntax error), or that is no batch, is
    one envelope: the router refuses it for its exact problem (``empty_body``,
    ``invalid_utf8``, ``malformed_json``, ``too_large``). In a batch, each message's text is
    found by the parser, or by brackets, strings and commas where it cannot read
    (``_message_spans``), and the body with each message replaced by ``null`` must be strict
    JSON; each message is then read on its own: one that is not strict JSON goes to the router
    as its text, which refuses it ``malformed_json`` (or ``too_large``, by its own size) in its
    place, and the others are routed.

    Raises:
        BadRequest: a batch whose frame is not strict JSON, or whose messages nested too deeply
            for the parser cannot be told apart (``_message_spans``).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return True, [raw]
    spans = _message_spans(text)
    if spans is None:
        return True, [raw]
    frame = _without_messages(text, spans)
    try:
        shape = _lenient_json(frame)
    except ValueError:
        return True, [raw]
    if not _is_batch(shape):  # also a body nested too deeply for the parser outside messages
        return True, [raw]
    _messages_of(shape)
    try:
        strict_json(frame)
    except ValueError as exc:
        raise BadRequest(400, "malformed_request", f"the batch is not valid JSON: {exc}") from None
    return False, [_message(text[start:end]) for start, end in spans]


def _message(text: str) -> Any:
    """A batch's message read on its own: its value, or its text when that is not strict JSON
    (the router refuses it with the reason and detail such a body gets)."""
    try:
        return strict_json(text)
    except ValueError:
        return text


def _lenient_json(text: str) -> object:
    """``text`` read as JSON, letting through what the contract refuses in JSON that parses
    (NaN, Infinity, integers too long to read, duplicate keys); None when it is nested too
    deeply for the parser.

    Raises:
        ValueError: ``text`` is not JSON.
    """
    try:
        return json.loads(text, parse_constant=float, parse_int=float)
    except RecursionError:
        return None


_LENIENT = json.JSONDecoder(parse_constant=float, parse_int=float)  # as _lenient_json reads
_SPACE = r"[ \t\n\r]*"
_SPACES = re.compile(_SPACE)
# What gives JSON text its structure where the parser cannot read it: a whole string (which may
# hold any of the others), a run of opening or of closing brackets, a comma. A quote that starts
# no whole string is text that is not JSON. Inside a message, where commas do not matter,
# strings with no bracket between them are one piece. (The lookahead makes the search for a
# piece skip other text about three times faster.)
_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*"'
_STRUCTURE = re.compile(r'(?=[\[\]{}",])(?:' + _STRING + r'|[\[{]+|[\]}]+|[,"])')
_NESTED = re.compile(
    r'(?=[\[\]{}"])(?:' + _STRING + r'(?:[^"\[\]{}]*' + _STRING + r')*|[\[{]+|[\]}]+|")'
)
# The opening of a batch, up to its messages array: "{", the first key, ":", "[".
_BATCH_START = re.compile(_SPACE + r"\{" + _SPACE + f"({_STRING})" + _SPACE + ":" + _SPACE + r"\[")
# The most pieces the scanner reads for one body (about 15 ms): a crafted 4 MiB body of brackets,
# one piece a byte, took 3 s of the router's CPU. A batch whose messages it cannot tell apart
# within these is a malformed request.
_SCAN_PIECES = 32_768


def _message_spans(text: str) -> list[tuple[int, int]] | None:
    """Where each element of the ``messages`` array that opens the top-level object lies in
    ``text``, however deeply nested and whatever values it holds; [] when no such array opens
    it; None when ``text`` is not JSON. A message's text runs from the comma or bracket before
    it to the comma or bracket after it.

    The parser (as lenient as ``_lenient_json``) finds each message, at C speed; a message it
    finds not JSON makes the body not JSON, wherever it sits (and the reading stops there: each
    such error costs the parser a pass over the body up to it, for its line and column). Only a
    message nested too deeply for the parser is found by the scanner (``_scanned_end``), within
    ``_SCAN_PIECES`` for the whole body; the parser reads on from the message after it.

    The count stops past ``MAX_BATCH`` messages (the request is too large then), and at the end
    of the array: what else the top-level object holds is for the frame's parse to judge, as a
    first key that is not ``messages`` is (``_lenient_messages``).

    Raises:
        BadRequest: the scanner could not tell the messages apart within ``_SCAN_PIECES``.
    """
    head = _BATCH_START.match(text)
    if head is None or not _is_messages(head.group(1)):
        return []
    spans: list[tuple[int, int]] = []
    start = head.end()
    if text.startswith("]", _space_end(text, start)):
        return spans
    pieces = _SCAN_PIECES
    while len(spans) <= MAX_BATCH:
        try:
            end = _parsed_end(text, start)
        except RecursionError:
            scanned = _scanned_end(text, start, pieces)
            if scanned is None:
                return None
            end, read = scanned
            pieces -= read
        if end is None:
            return None
        spans.append((start, end))
        if text[end] != ",":
            break
        start = end + 1
    return spans


def _parsed_end(text: str, start: int) -> int | None:
    """Where the message that starts at ``start`` ends (the comma or bracket after it), as the
    parser reads it; None when that is not JSON.

    Raises:
        RecursionError: it is nested too deeply for the parser.
    """
    try:
        _, end = _LENIENT.raw_decode(text, _space_end(text, start))
    except ValueError:
        return None
    end = _space_end(text, end)
    return end if text.startswith((",", "]"), end) else None


def _scanned_end(text: str, start: int, pieces: int) -> tuple[int, int] | None:
    """(end, pieces read): where the message that starts at ``start`` ends (the comma or the
    closing bracket after it), found by brackets, strings and commas alone; None when they show
    ``text`` is not JSON.

    Brackets are counted, not matched by kind: a message whose brackets do not match is not
    JSON on its own, and the body around the messages is parsed as JSON after this.

    Raises:
        BadRequest: the message's end is not found within ``pieces``.
    """
    depth = 2  # in the top-level object and in its messages array
    at = start
    for read in range(1, pieces + 1):
        match = _next_piece(text, at, depth)
        if match is None or match.group() == '"':  # the body ends in it, or a string never does
            return None
        piece, at = match.group(), match.end()
        if piece[0] in "[{":
            depth += len(piece)
        elif piece[0] in "]}":
            if depth - len(piece) < 2:  # the messages array ends in this run
                return match.start() + depth - 2, read
            depth -= len(piece)
        elif piece == "," and depth == 2:
            return match.start(), read
    raise BadRequest(
        400,
        "malformed_request",
        f"messages nested too deeply to tell apart (over {_SCAN_PIECES} strings, runs of "
        "brackets and commas in those too deep for the JSON parser)",
    )


def _space_end(text: str, at: int) -> int:
    """Where the JSON whitespace from ``at`` ends."""
    match = _SPACES.match(text, at)
    return match.end() if match else at


def _next_piece(text: str, at: int, depth: int) -> re.Match[str] | None:
    """The next piece of ``text`` from ``at``; commas count only directly in the messages
    array."""
    return (_STRUCTURE if depth == 2 else _NESTED).search(text, at)


def _is_messages(piece: str) -> bool:
    """Whether a string token is the key ``messages``; only one with escapes is parsed."""
    if "\\" not in piece:
        return piece == '"messages"'
    try:
        return strict_json(piece) == "messages"
    except ValueError:
        return False


def _without_messages(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """``text`` with each message (each span) replaced by ``null``: the frame of a batch."""
    parts: list[str] = []
    at = 0
    for start, end in spans:
        parts += (text[at:start], "null")
        at = end
    parts.append(text[at:])
    return "".join(parts)


def _http_status(result: BatchResult, *, single: bool) -> int:
    if result.rejected == 0:
        return 202
    rejected = [r for r in result.results if r.status == REJECTED]
    reasons = {r.reason for r in rejected}
    if result.accepted == 0:
        # Nothing stored, and for some of it the fabric, not the input, is why: "retry later"
        # is the answer, even beside messages refused for good (they are refused again).
        if Reason.UNAVAILABLE in reasons:
            return 503
        if reasons == {Reason.SOURCE_NOT_ALLOWED}:
            return 403
        if single:
            return 413 if reasons == {Reason.TOO_LARGE} else 400
    return 207


def _response(status: int, body: Mapping[str, object]) -> dict[str, Any]:
    return {"statusCode": status, "headers": _JSON, "body": json.dumps(body)}


# -- SQS ingest -----------------------------------------------------------------------------------


def handle_sqs(event: Mapping[str, Any], router: Router, *, queue_prefix: str) -> dict[str, Any]:
    """An SQS batch from the per-group ingest queues; partial batch failures.

    A rejected message is a final answer (audited, deleted from the queue); only messages that
    could not be stored (``unavailable``) are reported as failures, so SQS retries them later.
    When the audit records of a group's messages could not be stored on any path, all of them
    are reported as failures: SQS keeps each message until it is routed with its record (an
    accepted one is published again then; consumers remove the copy by ``message_id``).
    A message without a ``message_id`` is given its SQS message id, the same on every delivery:
    a copy that a timed-out broker did store and its redelivery are one message to consumers.

    Raises:
        ValueError: a record comes from a queue that is not an ingest queue (a wiring error:
            the whole batch is retried and ends in the DLQ rather than being routed as nobody).
    """
    records = event.get("Records") or []
    by_source: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_source.setdefault(_queue_group(record, queue_prefix), []).append(index)
    failures: list[dict[str, str]] = []
    for source, indices in by_source.items():
        result = router.route(
            [records[i].get("body", "") for i in indices],
            source=source,
            default_ids=[normalize_message_id(str(records[i].get("messageId"))) for i in indices],
        )
        for index, outcome in zip(indices, result.results, strict=True):
            if not result.audited or _retry(outcome):
                failures.append({"itemIdentifier": records[index]["messageId"]})
    return {"batchItemFailures": failures}


def _queue_group(record: Mapping[str, Any], prefix: str) -> str:
    queue = str(record.get("eventSourceARN", "")).rsplit(":", 1)[-1]
    group = queue.removeprefix(prefix)
    if not queue.startswith(prefix) or group not in _GROUPS:
        raise ValueError(f"record from {queue!r}, which is not a {prefix}<group> ingest queue")
    return group


def _retry(result: MessageResult) -> bool:
    return result.status == REJECTED and result.reason is Reason.UNAVAILABLE


def dispatch(event: object, invoked_function_arn: str, runtime: RouterRuntime) -> Any:
    """Pick the entry point and handle the event.

    An invocation through a qualifier (a stakeholder group's alias) is a producer's direct
    invoke, whatever the event looks like: a producer may invoke only its own group's alias,
    and an event shaped like an HTTP request (with a JWT claim in it) or an SQS batch (naming
    another group's ingest queue) would otherwise choose its own identity. API Gateway and the
    SQS event source invoke the function itself, unqualified; only then is the shape looked at.
    """
    settings = runtime.settings
    if _qualifier(invoked_function_arn) or not isinstance(event, Mapping):
        return handle_direct(event, invoked_function_arn, runtime.router)
    if "requestContext" in event and "routeKey" in event:
        return handle_http(event, runtime.router, identity_claim=settings.identity_claim)
    records = event.get("Records")
    if isinstance(records, list) and records and records[0].get("eventSource") == "aws:sqs":
        return handle_sqs(event, runtime.router, queue_prefix=settings.ingest_queue_prefix)
    return handle_direct(event, invoked_function_arn, runtime.router)
