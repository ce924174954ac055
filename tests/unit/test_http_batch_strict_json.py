"""An HTTPS batch with one message the contract's strict JSON refuses: that message is refused in
its place and the others are routed; a body that is not JSON at all is a malformed request.

Before, one duplicate key or NaN anywhere made the whole body "one envelope": one result for N
messages, none of the valid ones routed, and 413 ``too_large`` for a batch over 256 KiB of
small messages.
"""

from __future__ import annotations

import base64
import functools
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric import entrypoints
from fabric.audit import AuditEvent
from fabric.entrypoints import (
    MAX_BATCH,
    _http_messages,
    _lenient_json,
    _lenient_messages,
    dispatch,
)
from tests.unit.test_entrypoints import FUNCTION, audited, event


def post(body: str | bytes, *, b64: bool = False) -> tuple[int, dict[str, Any], list[str], Any]:
    """(status, answer, ids published, audit sink) of ``body`` posted by the community group."""
    built, transport, audit = audited()
    request = event("http_single.json")
    if isinstance(body, bytes):
        body = base64.b64encode(body).decode() if b64 else body.decode()
    request["body"], request["isBase64Encoded"] = body, b64
    response = dispatch(request, FUNCTION, built)
    published = [json.loads(m.body)["message_id"] for m in transport.published]
    return response["statusCode"], json.loads(response["body"]), published, audit


def good() -> str:
    message_id = str(uuid.uuid4())
    return json.dumps({"message_id": message_id, "topic": "donation.received", "payload": 1})


def results(answer: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(r["status"], r.get("reason")) for r in answer["results"]]


def ids(*messages: str) -> list[str]:
    return [json.loads(m)["message_id"] for m in messages]


@functools.cache
def too_deep() -> int:
    """Levels of nesting the JSON parser cannot read on the interpreter running the tests, so
    that the scanner must find a message nested so deeply: about 1,000 on Python 3.11; from
    3.12 the C stack is the limit, some 80,000 levels on 3.14 (the functions' runtime).

    The fewest levels it cannot read from here, and a tenth more: the router parses a little
    further down the stack, and a message in a batch is three levels in."""
    most = 120_000  # "[" * 120_000 + "]" * 120_000 is 234 KiB, near a message's 256 KiB
    if _lenient_json("[" * most + "]" * most) is not None:
        raise AssertionError(f"the JSON parser reads {most} levels: no test message is too deep")
    fewest = 1
    while fewest < most:
        levels = (fewest + most) // 2
        if _lenient_json("[" * levels + "]" * levels) is None:  # too deep
            most = levels
        else:
            fewest = levels + 1
    return most + most // 10


def nested_too_deeply() -> str:
    """A JSON value (lists in lists) too deep for the parser: ``too_deep``."""
    return "[" * too_deep() + "]" * too_deep()


BAD_PAYLOADS: dict[str, Callable[[], str]] = {
    "duplicate key": lambda: '{"a": 1, "a": 2}',
    "NaN": lambda: "NaN",
    "-Infinity": lambda: "-Infinity",
    "out of range": lambda: "1e400",
    "integer over 4300 digits": lambda: "9" * 5000,
    "nested too deeply": nested_too_deeply,
}


@pytest.mark.parametrize("payload", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_only_the_message_with_strict_json_trouble_is_refused_in_its_place(
    payload: Callable[[], str],
) -> None:
    first, last = good(), good()
    bad = '{"topic": "donation.received", "payload": ' + payload() + "}"
    status, answer, published, _ = post('{"messages": [' + ", ".join([first, bad, last]) + "]}")
    assert status == 207
    assert results(answer) == [
        ("accepted", None),
        ("rejected", "malformed_json"),
        ("accepted", None),
    ]
    assert published == ids(first, last)


def test_brackets_commas_and_quotes_in_strings_do_not_split_or_join_messages() -> None:
    tricky = [
        json.dumps(
            {
                "message_id": str(uuid.uuid4()),
                "topic": "donation.received",
                "payload": {"note": text, "list": [[], {}, [{"a": [1, 2]}]]},
            }
        )
        for text in ['a], {"b": [', '\\"}]},{', "\u2028]}"]
    ]
    bad = '{"topic": "donation.received", "payload": [{"x": NaN}]}'
    body = '{ "messages" :\n[' + ",\n".join([tricky[0], bad, tricky[1], tricky[2]]) + "\n] }"
    status, answer, published, _ = post(body)
    assert status == 207
    assert results(answer) == [
        ("accepted", None),
        ("rejected", "malformed_json"),
        ("accepted", None),
        ("accepted", None),
    ]
    assert published == ids(*tricky)


def test_a_big_batch_of_small_messages_with_one_nan_is_not_too_large() -> None:
    small = [
        json.dumps({"topic": "donation.received", "payload": {"text": "x" * 3000}})
        for _ in range(99)
    ]
    bad = '{"topic": "donation.received", "payload": NaN}'
    body = '{"messages": [' + ",".join([*small, bad]) + "]}"
    assert len(body) > 262_144

    status, answer, published, _ = post(body)

    assert status == 207
    assert results(answer) == [("accepted", None)] * 99 + [("rejected", "malformed_json")]
    assert len(published) == 99


def test_a_bad_message_over_256_kib_is_too_large_in_its_place() -> None:
    first = good()
    big = '{"topic": "donation.received", "payload": ["' + "x" * 270_000 + '", NaN]}'
    status, answer, published, _ = post('{"messages": [' + first + ", " + big + "]}")
    assert status == 207
    assert results(answer) == [("accepted", None), ("rejected", "too_large")]
    assert published == ids(first)


def test_every_refused_message_has_its_own_audit_record() -> None:
    bad = '{"topic": "donation.received", "payload": {"a": 1, "a": 2}}'
    _, _, _, audit = post('{"messages": [' + bad + ", " + good() + "]}")
    rejected = [r for r in audit.records if r.event is AuditEvent.REJECTED]
    assert [r.reason for r in rejected] == ["malformed_json"]
    assert len([r for r in audit.records if r.event is AuditEvent.ACCEPTED]) == 1


NOT_JSON = {
    "empty": (b"", "empty_body"),
    "only space": (b" \n ", "empty_body"),
    "not UTF-8": (b'{"messages": [\xff]}', "invalid_utf8"),
    "UTF-16": (json.dumps({"messages": [json.loads(good())]}).encode("utf-16"), "invalid_utf8"),
    "a syntax error": (b"{not json", "malformed_json"),
    "cut off": (
        b'{"messages": [' + good().encode() + b", " + good().encode()[:30],
        "malformed_json",
    ),
    "a trailing comma": (b'{"messages": [' + good().encode() + b",]}", "malformed_json"),
    "a syntax error in one message": (
        b'{"messages": [' + good().encode() + b', {"topic": tru}]}',
        "malformed_json",
    ),
}


@pytest.mark.parametrize(("body", "reason"), NOT_JSON.values(), ids=NOT_JSON.keys())
def test_a_body_that_is_not_json_at_all_is_refused_as_one_envelope(
    body: bytes, reason: str
) -> None:
    # Batch or envelope, it cannot be told: the router names its exact problem, as it does for
    # a single envelope (the contract's reason codes for bad input), and routes nothing.
    status, answer, published, audit = post(body, b64=True)
    assert status == 400
    assert [r["reason"] for r in answer["results"]] == [reason]
    assert published == []
    (record,) = audit.records
    assert (record.event, record.reason, record.message_id) == (AuditEvent.REJECTED, reason, None)


@pytest.mark.parametrize(
    "body",
    [
        '{"messages": [MSG], "messages": [MSG]}',
        '{"messages": [MSG], "priority": NaN}',
        '{"messages": [], "note": {"a": 1, "a": 2}}',
        '{"note": 1, "messages": [MSG]}',
        '{"": 0, "": 0, "messages": [MSG]}',
        '{"\\u006dessages": [MSG], "messages": [MSG]}',
        '{"messages": [MSG], "messa\\u0067es": [MSG]}',
        '{"messages": [MSG], "messages": [MSG, MSG], "messages": [MSG]}',
    ],
)
def test_a_batch_whose_frame_is_not_strict_json_is_a_malformed_request(body: str) -> None:
    bad_message = '{"topic": "donation.received", "payload": NaN}'
    status, answer, published, _ = post(body.replace("MSG", bad_message))
    assert (status, answer["error"]["reason"], published) == (400, "malformed_request", [])


def test_messages_written_with_escapes_is_still_a_batch() -> None:
    first = good()
    bad = '{"topic": "donation.received", "payload": NaN}'
    status, answer, published, _ = post('{"\\u006dessa\\u0067es": [' + first + ", " + bad + "]}")
    assert status == 207
    assert results(answer) == [("accepted", None), ("rejected", "malformed_json")]
    assert published == ids(first)


def counted(monkeypatch: pytest.MonkeyPatch, name: str) -> list[object]:
    """The calls (their arguments) the code under test makes to ``entrypoints.<name>``."""
    calls: list[object] = []
    real = getattr(entrypoints, name)

    def counting(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(entrypoints, name, counting)
    return calls


MANY = 2000
CRAFTED = {
    "keys before messages": "{" + '"": 0, ' * MANY + '"messages": [MSG]}',
    "escaped keys before messages": "{" + '"\\u0061": 0, ' * MANY + '"messages": [MSG]}',
    "keys after messages": '{"messages": [MSG], ' + '"": 0, ' * MANY + '"": 0}',
    "messages again and again": "{" + '"messages": [], ' * MANY + '"messages": [MSG]}',
    "escaped messages again": "{" + '"\\u006dessages": [], ' * MANY + '"messages": [MSG]}',
}


@pytest.mark.parametrize("body", CRAFTED.values(), ids=CRAFTED.keys())
def test_a_body_of_many_keys_is_refused_without_reading_each_key(
    body: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past a batch's first key the answer is known. Parsing each key of a crafted 4 MiB body
    # (or only reading on) took seconds, many times the JSON parse of the body itself.
    parses = counted(monkeypatch, "strict_json")
    pieces = counted(monkeypatch, "_next_piece")
    bad_message = '{"topic": "donation.received", "payload": NaN}'
    status, answer, published, _ = post(body.replace("MSG", bad_message))
    assert (status, answer["error"]["reason"], published) == (400, "malformed_request", [])
    assert len(parses) <= 3
    assert len(pieces) <= 20


def test_a_batch_too_deep_to_parse_with_another_field_is_refused_whole() -> None:
    # Its messages are not read past the other field: the body is one envelope, too deep.
    status, answer, published, audit = post(
        '{"note": 0, "messages": [' + nested_too_deeply() + "]}"
    )
    assert (status, answer["accepted"], published) == (400, 0, [])
    assert len(audit.records) == 1


def test_too_many_messages_with_a_bad_one_among_them_is_still_413() -> None:
    bad = '{"topic": "donation.received", "payload": NaN}'
    body = '{"messages": [' + ",".join([good()] * MAX_BATCH + [bad]) + "]}"
    status, answer, _, _ = post(body)
    assert (status, answer["error"]["reason"]) == (413, "too_large")


def test_a_single_envelope_with_strict_json_trouble_is_still_its_own_result() -> None:
    status, answer, _, _ = post('{"topic": "donation.received", "payload": NaN}')
    assert status == 400
    assert results(answer) == [("rejected", "malformed_json")]


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    # Text full of what gives JSON its structure, to trip the finding of messages.
    | st.text(alphabet='[]{},:"\\ \n\t\u2028ab'),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(JSON, min_size=1, max_size=6), indent=st.sampled_from([None, 0, 2]))
def test_the_lenient_reading_finds_the_messages_the_strict_one_does(
    messages: list[Any], indent: int | None
) -> None:
    raw = json.dumps({"messages": messages}, indent=indent).encode()
    strict = _http_messages(raw)
    assert _lenient_messages(raw) == strict == (False, messages)
