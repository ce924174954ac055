"""Canonical JSON: compact UTF-8, keys sorted, text unescaped (but U+FFFE, U+FFFF), strict.

The fabric stores, hashes and encrypts this encoding. orjson writes it, about fifteen times
faster than the standard library, which matters on the router's path (an envelope and two audit
records per message). Integers beyond 64 bits, which orjson refuses, go in as fragments of their
decimal digits, so a value's floats are spelled the same with or without one (orjson's
``1e-7`` and ``0.000015``, never the standard library's ``1e-07`` and ``1.5e-05``). The standard
library still checks what orjson lets through (NaN and the infinities, which orjson writes as
null).

U+FFFE and U+FFFF (Unicode noncharacters, valid in a JSON string) are written as the escapes
``\\ufffe`` and ``\\uffff``: SQS takes only the characters XML allows, which leave these two
out, and a body it refuses (or stores with U+FFFD instead) on the fallback path would be lost
(or changed) after the producer was told ``accepted``. The escapes are the same JSON value, in
bytes every transport takes; every other character JSON allows raw, SQS allows too (JSON
escapes the controls below U+0020 itself, and a lone surrogate is refused).
"""

from __future__ import annotations

import json
import re

import orjson

_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_STRICT = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(value: object) -> bytes:
    """``value`` as canonical JSON bytes.

    Raises:
        ValueError: ``value`` is not strict JSON: a NaN or infinite number, an object key that
            is not a string, text that is not Unicode (a lone surrogate), a value of a type JSON
            does not have (a datetime, a set), or nesting deeper than 254 levels.
    """
    try:
        out = orjson.dumps(value, option=_OPTIONS)
    except orjson.JSONEncodeError as exc:
        if "Integer exceeds 64-bit range" not in str(exc):
            raise ValueError(f"not JSON: {exc}") from None
        _check(value)
        try:
            out = orjson.dumps(_big_integers_as_fragments(value), option=_OPTIONS)
        except orjson.JSONEncodeError as again:  # e.g. a non-string key the standard one takes
            raise ValueError(f"not JSON: {again}") from None
    if b"null" in out:
        # orjson writes NaN and the infinities as null; only a strict encoder tells them apart.
        _check(value)
    return out if out.isascii() else _escape_noncharacters(out)


# U+FFFE and U+FFFF in UTF-8. Outside strings JSON is ASCII, and UTF-8 never holds these bytes
# in another character's encoding: each match is one of the two characters inside a string.
_NONCHARACTERS = re.compile(b"\xef\xbf[\xbe\xbf]")


def _escape_noncharacters(out: bytes) -> bytes:
    """``out`` with U+FFFE and U+FFFF written as JSON escapes (see the module docstring).

    Callers pass only output that is not ASCII: ``isascii`` costs a tenth of this call, and
    the router encodes an envelope and two audit records a message, nearly always ASCII.
    """
    # A byte search first (memchr): most text holds no character from U+F000 up, and the
    # pattern's search costs a third of the encoding on a large non-ASCII payload.
    if b"\xef" in out and _NONCHARACTERS.search(out):
        return out.replace(b"\xef\xbf\xbe", b"\\ufffe").replace(b"\xef\xbf\xbf", b"\\uffff")
    return out


def _check(value: object) -> None:
    """Raise ValueError unless the standard library's strict encoder takes ``value``."""
    if _depth(value) > _MAX_DEPTH:  # orjson's limit, which the standard encoder does not keep
        raise ValueError(f"not JSON: nested deeper than {_MAX_DEPTH} levels")
    try:
        _STRICT.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"not JSON: {exc}") from None


def _big_integers_as_fragments(value: object) -> object:
    """``value`` with each integer orjson cannot write replaced by its digits as a fragment
    (recursive: ``_check`` has bounded the nesting)."""
    if isinstance(value, dict):
        return {key: _big_integers_as_fragments(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_big_integers_as_fragments(item) for item in value]
    if type(value) is int and not -(2**63) <= value < 2**64:
        return orjson.Fragment(str(value))
    return value


_MAX_DEPTH = 254


def _depth(value: object) -> int:
    """How deeply ``value``'s lists and objects nest (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def canonical_json_unchecked(value: object) -> bytes:
    """``canonical_json`` of a value the fabric built itself from strings, integers, booleans,
    None, lists and string-keyed objects (an audit record, a name): the same bytes (U+FFFE and
    U+FFFF escaped too: audit batches travel through SQS), without the checks for what only
    outside input holds (NaN, infinities, integers beyond 64 bits).

    Those checks cost more than the encoding: scanning the output for the ``null`` that
    orjson writes for NaN takes 0.4 µs for an audit record, and the router encodes two records
    a message.

    Raises:
        orjson.JSONEncodeError: ``value`` is not such a value (a TypeError: a caller's bug).
    """
    out = orjson.dumps(value, option=_OPTIONS)
    return out if out.isascii() else _escape_noncharacters(out)
