"""Canonical JSON: the bytes the fabric stores and hashes, whichever encoder writes them."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.jsoncodec import canonical_json, canonical_json_unchecked

_STDLIB = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_values(integers: st.SearchStrategy[int]) -> st.SearchStrategy[object]:
    """JSON values without floats, with ``integers`` for numbers and no lone surrogates."""
    text = st.text(st.characters(exclude_categories=["Cs"]))
    return st.recursive(
        st.none() | st.booleans() | integers | text,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4)
        ),
        max_leaves=16,
    )


# Every JSON value but floats: orjson and the standard library write these byte for byte alike.
exact_values = json_values(st.integers())
# What the fabric builds itself (audit records, names): integers within 64 bits too.
own_values = json_values(st.integers(min_value=-(2**63), max_value=2**63 - 1))


def stdlib_canonical(value: object) -> bytes:
    """The standard library's compact, sorted UTF-8, with U+FFFE and U+FFFF escaped."""
    text = _STDLIB.encode(value).replace("\ufffe", "\\ufffe").replace("\uffff", "\\uffff")
    return text.encode("utf-8")


@given(exact_values)
def test_canonical_json_is_the_standard_librarys_compact_sorted_utf8(value: object) -> None:
    assert canonical_json(value) == stdlib_canonical(value)


@given(own_values)
def test_the_unchecked_encoding_of_the_fabrics_own_values_is_the_same_bytes(value: object) -> None:
    assert canonical_json_unchecked(value) == canonical_json(value)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_keep_their_exact_value(number: float) -> None:
    assert json.loads(canonical_json({"n": number})) == {"n": number}


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_float_is_spelled_the_same_beside_an_integer_beyond_64_bits(number: float) -> None:
    # The standard library wrote such a value whole, with its own spelling of small exponents
    # (1e-07, 1.5e-05): one payload had two canonical forms, and a consumer that rebuilt the
    # form to check a hash got another one.
    alone = canonical_json({"n": number})
    assert (
        canonical_json({"big": 2**70, "n": number})
        == b'{"big":1180591620717411303424,' + (alone[1:])
    )


def test_integers_beyond_64_bits_keep_every_digit_at_any_depth() -> None:
    value = {"a": [-(2**64), 2**64 - 1, -(2**63), [2**200]], "b": True, "f": 1e-7}
    assert json.loads(canonical_json(value)) == value
    assert b'"f":1e-7' in canonical_json(value)


def test_control_characters_and_quotes_are_escaped_and_the_rest_is_utf8() -> None:
    assert canonical_json('\n\t"\\\x01é😀') == '"\\n\\t\\"\\\\\\u0001é😀"'.encode()


# Every character SQS takes in a message body or attribute value (the XML 1.0 Char production).
_SQS_CHARACTER = re.compile("[\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]*")


@pytest.mark.parametrize("encode", [canonical_json, canonical_json_unchecked])
def test_the_noncharacters_sqs_refuses_are_escaped_and_keep_their_value(
    encode: Callable[[object], bytes],
) -> None:
    # U+FFFE and U+FFFF are valid in a JSON string, but SQS refuses them: a body holding them
    # raw, taken by SNS on the fallback path, would be lost on delivery to the queues.
    value = {"k\uffff": ["a\ufffeb", "\uffff\ufffd\uffef\U0010ffff"]}
    out = encode(value)
    assert out == b'{"k\\uffff":["a\\ufffeb","\\uffff' + "\ufffd\uffef\U0010ffff".encode() + b'"]}'
    assert json.loads(out) == value


def test_noncharacters_beside_an_integer_beyond_64_bits_are_escaped_too() -> None:
    assert canonical_json({"big": 2**70, "t": "\uffff"}) == (
        b'{"big":1180591620717411303424,"t":"\\uffff"}'
    )


@given(exact_values)
def test_every_character_of_the_encoding_is_one_sqs_takes(value: object) -> None:
    assert _SQS_CHARACTER.fullmatch(canonical_json(value).decode("utf-8"))


@given(st.text(st.sampled_from('\ufffe\uffff\\"aé\uffef\U0001fffe')))
def test_text_of_noncharacters_beside_escapes_reads_back_the_same(text: str) -> None:
    out = canonical_json({"t": text})
    assert json.loads(out) == {"t": text}
    assert out == stdlib_canonical({"t": text})


@pytest.mark.parametrize(
    "value",
    [float("nan"), [None, float("-inf")], {"a": None, "b": float("inf")}, {1: 2}, "\udc00"],
    ids=["nan", "infinity-beside-null", "infinity-in-object", "integer-key", "surrogate"],
)
def test_what_is_not_strict_json_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="not JSON"):
        canonical_json(value)


def test_integers_beyond_64_bits_inside_a_tuple_are_written_like_in_a_list() -> None:
    assert canonical_json({"a": (2**70,)}) == canonical_json({"a": [2**70]})


def test_a_non_string_key_beside_an_integer_beyond_64_bits_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        canonical_json({"a": 2**70, "c": {1: 2}})
