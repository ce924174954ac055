"""What JSON text can carry and no writer can write: a lone surrogate (``"\\ud800"``, which no
UTF-8 holds) or nesting deeper than the parser, put as a new version of a checkpoint or an
audit object. The daily compliance report names the key and is not verified; it used to crash
(a UnicodeEncodeError or RecursionError: ComplianceReportErrors fired, TrailNotVerified never
did, and every later day's report stopped at the same checkpoint)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from fabric.audit_chain import canonical
from fabric.compliance_run import Period
from tests.unit.test_compliance_run import DAY, WRITER, Trail, accepted_and_routed, reporter

NO_FORM = "a lone surrogate, or nested deeper than the encoder"
SURROGATE = b"\\ud800"  # the JSON escape


def problem_of(trail: Trail, day: datetime) -> str:
    report = reporter(trail)[0].report(Period.day(day.date()))
    assert report["verification"]["verified"] is False
    return str(report["verification"]["problem"])


def three_days() -> Trail:
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 72)
    return trail


def checkpoint_of_the_day(trail: Trail) -> str:
    return trail.store.keys(f"checkpoints/{WRITER}/")[36]  # 13:00 on DAY


def test_a_checkpoint_with_a_lone_surrogate_is_named() -> None:
    trail = three_days()
    key = checkpoint_of_the_day(trail)
    trail.store.put(key, trail.store.objects[key].data[:-1] + b',"note":"' + SURROGATE + b'"}')

    problem = problem_of(trail, datetime(2026, 12, 2, tzinfo=UTC))

    assert problem == f"{key}: not a checkpoint ({NO_FORM})"


def test_a_checkpoint_naming_a_key_with_a_lone_surrogate_is_named_and_the_key_not_read() -> None:
    # Its objects are read before its signature is checked: S3's client fails on such a key.
    trail = three_days()
    key = checkpoint_of_the_day(trail)
    body = json.loads(trail.store.objects[key].data)
    body["objects"][0]["key"] = f"audit/{WRITER}/2026/12/02/x-DAY.jsonl"
    forged = canonical(body).replace(b"DAY", SURROGATE)
    trail.store.put(key, forged)
    trail.store.reads.clear()

    problem = problem_of(trail, datetime(2026, 12, 2, tzinfo=UTC))

    assert problem == f"{key}: not a checkpoint ({NO_FORM})"
    assert all(read.isascii() for read in trail.store.reads)


def test_a_checkpoint_nested_deeper_than_the_parser_is_named() -> None:
    trail = three_days()
    key = checkpoint_of_the_day(trail)
    trail.store.put(key, b"[" * 100_000)

    problem = problem_of(trail, datetime(2026, 12, 2, tzinfo=UTC))

    assert problem == f"{key}: not a checkpoint (a UTC at, named objects, a last_seq)"


def test_a_sealed_object_with_a_lone_surrogate_is_named_and_its_record_not_counted() -> None:
    trail = three_days()
    key = trail.store.keys(f"audit/{WRITER}/{DAY:%Y/%m/%d}/")[5]
    data = trail.store.objects[key].data
    trail.store.put(key, data.replace(b'"message_id":"m-', b'"message_id":"' + SURROGATE))

    problem = problem_of(trail, datetime(2026, 12, 2, tzinfo=UTC))

    assert problem == f"{key}: its SHA-256 differs from the checkpoint's"


def _surrogate_id(line: bytes) -> bytes:
    return line.replace(b'"message_id":"late"', b'"message_id":"' + SURROGATE + b'"')


def _too_deep(line: bytes) -> bytes:
    return line[:-2] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_surrogate_id, "{key} record 202: not a record the writer could have written ({why})"),
        (_too_deep, "{key}: not a batch object: nested deeper than the parser"),
    ],
    ids=["lone-surrogate", "too-deep"],
)
def test_an_unsealed_record_the_writer_could_not_have_written_is_named(
    change: Callable[[bytes], bytes], expected: str
) -> None:
    # Its writer, sequence and prev still match; nothing but its text vouches for it.
    trail = Trail()
    trail.hours(datetime(2026, 12, 1, tzinfo=UTC), 50)  # sealed to 02:00 on the 3rd
    key = trail.write(datetime(2026, 12, 3, 3, tzinfo=UTC), *accepted_and_routed("late"))
    accepted, routed = trail.store.objects[key].data.splitlines(keepends=True)
    trail.store.put(key, accepted + change(routed))

    problem = problem_of(trail, datetime(2026, 12, 3, tzinfo=UTC))

    assert problem == expected.format(key=key, why=NO_FORM)
