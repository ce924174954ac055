"""What reading an HTTPS batch that is not strict JSON costs: the parser finds its messages, and
the scanner (brackets, strings and commas, one Python step a piece) reads only what the parser
cannot, within a budget.

Before, the scanner read every such body whole, a piece at a time: a crafted 4 MiB body of
brackets (one piece a byte) took about 3 s of the router's CPU against 0.03 s for a valid
4 MiB batch, and a body whose ``messages`` is an object was read whole before its 400. Speed is
measured by benchmarks; these tests count the scanner's pieces instead.
"""

from __future__ import annotations

import json
import uuid

import pytest

from fabric.entrypoints import _SCAN_PIECES
from tests.unit.test_http_batch_strict_json import counted, good, ids, post, results

DEEP = "[" * 1100 + "]" * 1100  # too deep for the parser


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
    too_deep = '{"topic": "donation.received", "payload": ' + DEEP + "}"
    status, answer, published, _ = post('{"messages": [' + ", ".join([*nested, too_deep]) + "]}")
    assert status == 207
    assert results(answer) == [("accepted", None)] * 50 + [("rejected", "malformed_json")]
    assert published == ids(*nested)
    assert len(pieces) <= 4


def test_after_a_message_that_is_not_json_in_a_deep_body_the_parser_is_not_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each error of the parser costs a pass over the body up to it (its line and column): 500
    # of them at the end of a 4 MiB body took a second.
    parses = counted(monkeypatch, "_parsed_end")
    status, answer, _, _ = post('{"messages": [' + DEEP + ", x" * 100 + ", " + good() + "]}")
    assert status == 207
    assert results(answer) == [("rejected", "malformed_json")] * 101 + [("accepted", None)]
    assert len(parses) == 2


def test_a_body_the_scanner_cannot_split_within_its_budget_is_one_envelope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A message too deep for the parser, then brackets that are no JSON: one piece a byte.
    pieces = counted(monkeypatch, "_next_piece")
    crafted = "[" * 1100 + "][" * _SCAN_PIECES + "]" * 1100
    status, answer, published, audit = post('{"messages": [' + good() + ", " + crafted + "]}")
    assert status == 400
    assert results(answer) == [("rejected", "malformed_json")]
    assert published == []
    assert len(audit.records) == 1
    assert len(pieces) <= _SCAN_PIECES
