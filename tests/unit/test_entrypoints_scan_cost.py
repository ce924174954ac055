"""What reading an HTTPS batch that is not strict JSON costs: the parser finds its messages, and
the scanner (brackets, strings and commas, one Python step a piece) reads only what the parser
cannot, within a budget.

Before, the scanner read every such body whole, a piece at a time: a crafted 4 MiB body of
brackets (one piece a byte) took about 3 s of the router's CPU against 0.03 s for a valid
4 MiB batch, and a body whose ``messages`` is an object was read whole before its 400. Speed is
measured by benchmarks; these tests count the scanner's pieces instead. A message "too deep for
the parser" is as deep as the Python running the tests makes it (``too_deep``).
"""

from __future__ import annotations

import json
import uuid

import pytest

from fabric.audit import AuditEvent
from fabric.entrypoints import _SCAN_PIECES
from tests.unit.test_http_batch_strict_json import (
    counted,
    good,
    ids,
    nested_too_deeply,
    post,
    results,
)


def test_a_batch_with_one_bad_value_among_many_brackets_is_split_without_the_scanner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pieces = counted(monkeypatch, "_next_piece")
    first = good()
    bad = '{"topic": "donation.received", "payload": [' + "[]," * 20_000 + "NaN]}"
    status, answer, published, _ = post('{"messages": [' + first + ", " + bad + "]}")
    assert status == 207
    assert results(answer) == [("accepted", None), ("rejected", "malformed_json")]
    assert published == ids(first)
    assert pieces == []


def test_a_batch_whose_messages_is_an_object_is_refused_without_the_scanner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pieces = counted(monkeypatch, "_next_piece")
    status, answer, published, _ = post('{"messages": {' + '"a": [], ' * 20_000 + '"z": NaN}}')
    assert (status, answer["error"]["reason"], published) == (400, "malformed_request", [])
    assert pieces == []


def test_a_message_too_deep_to_parse_is_the_only_one_the_scanner_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pieces = counted(monkeypatch, "_next_piece")
    nested = [
        json.dumps(
            {
                "message_id": str(uuid.uuid4()),
                "topic": "donation.received",
                "payload": [[i, {"a": [i]}] for i in range(100)],
            }
        )
        for _ in range(50)
    ]
    deep = '{"topic": "donation.received", "payload": ' + nested_too_deeply() + "}"
    status, answer, published, _ = post('{"messages": [' + ", ".join([*nested, deep]) + "]}")
    assert status == 207
    assert results(answer) == [("accepted", None)] * 50 + [("rejected", "malformed_json")]
    assert published == ids(*nested)
    assert 0 < len(pieces) <= 4  # the scanner read it (on any Python: see too_deep)


ORDERS = {
    "after a message too deep": ["good", "deep", "x", "good"],
    "before a message too deep": ["good", "x", "deep", "good"],
    "many after a message too deep": ["deep", *["x"] * 100, "good"],
}


@pytest.mark.parametrize("order", ORDERS.values(), ids=ORDERS.keys())
def test_a_message_that_is_not_json_makes_the_body_one_envelope_wherever_it_sits(
    order: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, one after a message too deep for the parser was read by the scanner and refused
    # in its place (207, the others routed), one before it took the body down (400): and how
    # deep is too deep depends on the Python version (about 1,000 levels on 3.11, 80,000 on
    # 3.14). The parser stops at the first error: each costs it a pass over the body up to it
    # (500 of them at the end of a 4 MiB body took a second).
    parses = counted(monkeypatch, "_parsed_end")
    deep = nested_too_deeply()
    messages = [{"good": good(), "deep": deep, "x": "x"}[kind] for kind in order]
    status, answer, published, audit = post('{"messages": [' + ", ".join(messages) + "]}")
    assert status == 400
    assert results(answer) == [("rejected", "malformed_json")]
    assert published == []
    assert len(audit.records) == 1
    assert len(parses) == order.index("x") + 1


def test_a_batch_whose_messages_the_scanner_cannot_tell_apart_is_a_malformed_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A message too deep for the parser whose lists hold 34,000 pieces (one "[" and one "]"
    # each) before its deep part, among 12 good messages: the body, over 256 KiB, was one
    # envelope refused 413 too_large, as if the batch were too large, a message of it not.
    pieces = counted(monkeypatch, "_next_piece")
    payload = '{"items": [' + "[]," * 16_999 + '[]], "tree": ' + nested_too_deeply() + "}"
    crafted = '{"topic": "donation.received", "payload": ' + payload + "}"
    assert len(crafted) < 256 * 1024
    fine = [
        json.dumps({"topic": "donation.received", "payload": {"note": "y" * 20_000, "i": i}})
        for i in range(12)
    ]
    body = '{"messages": [' + ", ".join([*fine, crafted]) + "]}"
    assert len(body) > 256 * 1024
    status, answer, published, audit = post(body)
    assert (status, published) == (400, [])
    assert answer["error"]["reason"] == "malformed_request"
    assert answer["error"]["detail"].startswith("messages nested too deeply to tell apart")
    (record,) = audit.records
    assert (record.event, record.reason, record.message_id) == (
        AuditEvent.REJECTED,
        "malformed_request",
        None,
    )
    assert len(pieces) <= _SCAN_PIECES
