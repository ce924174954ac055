"""The message contract: what producers get back for good and bad envelopes."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.envelope import (
    MAX_ENCODED_BYTES,
    MAX_ENVELOPE_BYTES,
    MAX_HEADERS_BYTES,
    VERSION,
    Classification,
    Envelope,
    JsonValue,
    Priority,
    Reason,
    Rejection,
    from_wire,
    validate_batch,
    validate_envelope,
)
from fabric.errors import MessageRejected
from fabric.stakeholders import Stakeholder

NOW = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
ULID = "01JDQ3ZP5G8Y7K2M4N6R8T0V1W"


def envelope(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"topic": "donation.received", "payload": {"amount": 10}}
    body.update(fields)
    return body


def accept(raw: Any, source: str = "community") -> Envelope:
    result = validate_envelope(raw, source, now=NOW)
    assert isinstance(result, Envelope), result
    return result


def reject(raw: Any) -> Rejection:
    result = validate_envelope(raw, "community", now=NOW)
    assert isinstance(result, Rejection), result
    return result


BAD_INPUTS: dict[Reason, Any] = {
    Reason.EMPTY_BODY: b"  \n",
    Reason.INVALID_UTF8: b'{"topic": "a\xff"}',
    Reason.MALFORMED_JSON: b'{"topic": ',
    Reason.NOT_AN_OBJECT: b"[1, 2]",
    Reason.MISSING_FIELD: {"payload": 1},
    Reason.UNKNOWN_FIELD: envelope(priorty="high"),
    Reason.UNSUPPORTED_VERSION: envelope(version="fabric.envelope/2"),
    Reason.INVALID_FIELD_TYPE: envelope(headers=["region", "jakarta"]),
    Reason.INVALID_MESSAGE_ID: envelope(message_id="order-42"),
    Reason.INVALID_TOPIC: envelope(topic="Donation.Received"),
    Reason.INVALID_PRIORITY: envelope(priority="urgent"),
    Reason.INVALID_CLASSIFICATION: envelope(classification="secret"),
    Reason.INVALID_TIMESTAMP: envelope(occurred_at="2026-11-22T08:00:00"),
    Reason.INVALID_HEADER: envelope(headers={"x-match": "any"}),
    Reason.UNKNOWN_AUDIENCE: envelope(audience=["press"]),
    Reason.EXPIRED: envelope(expires_at="2026-11-22T07:59:59Z"),
    Reason.TOO_LARGE: envelope(payload="x" * MAX_ENVELOPE_BYTES),
}
# Reached elsewhere: duplicate_message_id (batch, below), source_not_allowed,
# audience_not_routable and classification_too_low (routing table, test_routing.py);
# unavailable is reserved for the router when both transports are down.
ELSEWHERE = {
    Reason.DUPLICATE_MESSAGE_ID,
    Reason.SOURCE_NOT_ALLOWED,
    Reason.AUDIENCE_NOT_ROUTABLE,
    Reason.CLASSIFICATION_TOO_LOW,
    Reason.UNAVAILABLE,
}


@pytest.mark.parametrize(("reason", "raw"), BAD_INPUTS.items(), ids=[str(r) for r in BAD_INPUTS])
def test_each_bad_input_is_rejected_with_its_reason_code(reason: Reason, raw: Any) -> None:
    rejection = reject(raw)
    assert rejection.reason is reason
    assert rejection.message


def test_every_reason_code_is_reachable_and_has_a_meaning() -> None:
    assert set(BAD_INPUTS) | ELSEWHERE == set(Reason)
    assert all(reason.meaning for reason in Reason)


@pytest.mark.parametrize(
    "raw",
    [
        b"NaN",
        b'{"topic": "a", "payload": Infinity}',
        b'{"topic": "a", "topic": "b", "payload": 1}',
        b"[" * 100_000,
    ],
    ids=["nan", "infinity", "duplicate-key", "deep-nesting"],
)
def test_json_that_other_parsers_read_differently_is_malformed(raw: bytes) -> None:
    assert reject(raw).reason is Reason.MALFORMED_JSON


@pytest.mark.parametrize(
    "payload",
    [float("nan"), {"total": float("inf")}, ["\ud800"], {1: "one"}, {"at": NOW}, {"tags": {"a"}}],
    ids=["nan", "infinity", "lone-surrogate", "integer-key", "datetime", "set"],
)
def test_an_object_handed_over_that_is_not_json_is_malformed_not_a_crash(payload: Any) -> None:
    # A direct invoke hands over decoded objects; Lambda's own parser accepts NaN.
    rejection = reject(envelope(payload=payload))
    assert rejection.reason is Reason.MALFORMED_JSON
    assert rejection.message.startswith("payload is not JSON")


def test_a_number_too_large_for_a_float_is_malformed() -> None:
    assert reject(b'{"topic": "donation.received", "payload": 1e400}').reason is (
        Reason.MALFORMED_JSON
    )


def test_integers_beyond_64_bits_and_nulls_keep_their_value_on_the_wire() -> None:
    payload = {"big": 2**70, "none": None, "small": 1e-7}
    wire = accept(envelope(payload=payload)).to_json_bytes()
    assert b'"big":1180591620717411303424' in wire
    assert json.loads(wire)["payload"] == payload


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"headers": {"region": 7}}, Reason.INVALID_HEADER),
        ({"headers": {"fabric-to-media": "yes"}}, Reason.INVALID_HEADER),
        ({"headers": {"Region": "x"}}, Reason.INVALID_HEADER),
        ({"audience": []}, Reason.UNKNOWN_AUDIENCE),
        ({"audience": "government"}, Reason.INVALID_FIELD_TYPE),
        ({"correlation_id": ""}, Reason.INVALID_FIELD_TYPE),
        ({"reply_to": "r" * 256}, Reason.INVALID_FIELD_TYPE),
        ({"topic": "a." * 127 + "bc"}, Reason.INVALID_TOPIC),
        ({"topic": "case..updated"}, Reason.INVALID_TOPIC),
        ({"topic": 42}, Reason.INVALID_TOPIC),
        ({"message_id": "00000000-0000-0000-0000-000000000000"}, Reason.INVALID_MESSAGE_ID),
        ({"message_id": 7}, Reason.INVALID_MESSAGE_ID),
        ({"embargo_until": "2026-02-30T00:00:00Z"}, Reason.INVALID_TIMESTAMP),
        ({"expires_at": "2026-11-22T08:00:60Z"}, Reason.INVALID_TIMESTAMP),
        ({"occurred_at": 1732262400}, Reason.INVALID_TIMESTAMP),
        # Valid RFC 3339 whose moment in UTC is before year 1 or after year 9999.
        ({"occurred_at": "0001-01-01T00:00:00+01:00"}, Reason.INVALID_TIMESTAMP),
        ({"expires_at": "9999-12-31T23:59:59-01:00"}, Reason.INVALID_TIMESTAMP),
        # RFC 3339 digits are ASCII, and an offset's minutes are 00-59.
        ({"occurred_at": "\uff12\uff10\uff12\uff16-11-22T08:00:00Z"}, Reason.INVALID_TIMESTAMP),
        ({"occurred_at": "2026-11-22T\u0660\u0668:00:00Z"}, Reason.INVALID_TIMESTAMP),
        ({"occurred_at": "2026-11-22T08:00:00+05:75"}, Reason.INVALID_TIMESTAMP),
        # Lone surrogates: JSON text may escape them ("\ud800"), JSON cannot encode them.
        ({"correlation_id": "\ud800"}, Reason.MALFORMED_JSON),
        ({"reply_to": "\udfff"}, Reason.MALFORMED_JSON),
        ({"headers": {"region": "\ud800"}}, Reason.MALFORMED_JSON),
    ],
)
def test_field_rules(fields: dict[str, Any], reason: Reason) -> None:
    assert reject(envelope(**fields)).reason is reason


def test_a_lone_surrogate_escape_is_refused_as_bytes_text_or_object() -> None:
    text = '{"topic": "donation.received", "payload": 1, "correlation_id": "\\ud800"}'
    for raw in (text, text.encode(), json.loads(text)):
        assert reject(raw).reason is Reason.MALFORMED_JSON
    # A body handed over as text that holds the surrogate itself cannot be UTF-8.
    assert reject('{"topic": "\ud800"}').reason is Reason.INVALID_UTF8


def test_topic_of_exactly_255_bytes_is_accepted() -> None:
    topic = "a." * 126 + "abc"
    assert len(topic) == 255
    assert accept(envelope(topic=topic)).topic == topic


def test_defaults_are_normal_priority_internal_classification_and_a_fresh_uuid4() -> None:
    result = accept(envelope())
    assert result.priority is Priority.NORMAL
    assert result.classification is Classification.INTERNAL
    assert result.audience is None
    assert uuid.UUID(result.message_id).version == 4
    assert result.message_id != accept(envelope()).message_id


def test_null_optional_fields_mean_absent() -> None:
    result = accept(envelope(message_id=None, priority=None, audience=None, headers=None))
    assert result.priority is Priority.NORMAL
    assert result.audience is None
    assert result.headers == {}


def test_source_comes_from_the_authenticated_caller_never_from_the_body() -> None:
    result = accept(envelope(source="government"), source="community")
    assert result.source == "community"


def test_empty_source_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="source"):
        validate_envelope(envelope(), "")


def test_message_ids_are_normalized_uuid_lowercase_ulid_uppercase() -> None:
    upper_uuid = "3F2504E0-4F89-11D3-9A0C-0305E82C3301"
    assert accept(envelope(message_id=upper_uuid)).message_id == upper_uuid.lower()
    assert accept(envelope(message_id=ULID.lower())).message_id == ULID


@pytest.mark.parametrize(
    "look_alike",
    [
        ULID.replace("K", "\u212a"),  # KELVIN SIGN: matched K under IGNORECASE
        ULID.replace("Y", "\u017f"),  # LATIN SMALL LETTER LONG S: matched S, upper() is "S"
    ],
)
def test_a_ulid_with_a_non_ascii_look_alike_letter_is_not_a_message_id(look_alike: str) -> None:
    # The Kelvin sign was kept in the id: an idempotency key that no ULID library can read and
    # that differs from the same ULID typed with a K.
    assert reject(envelope(message_id=look_alike)).reason is Reason.INVALID_MESSAGE_ID


def test_rejection_carries_the_message_id_when_it_was_valid() -> None:
    assert reject(envelope(message_id=ULID, topic="Bad")).message_id == ULID
    assert reject(envelope(message_id="nope")).message_id is None


def test_timestamps_are_parsed_with_their_offset_and_written_in_utc() -> None:
    result = accept(envelope(occurred_at="2026-11-22T15:00:00.1234567+07:00"))
    assert result.occurred_at == datetime(2026, 11, 22, 8, 0, 0, 123456, tzinfo=UTC)
    assert result.to_dict()["occurred_at"] == "2026-11-22T08:00:00.123456Z"


def test_a_year_before_1000_is_written_with_four_digits_and_reads_back() -> None:
    # strftime wrote "99-01-01T00:00:00Z": accepted, then unreadable by every consumer, the
    # drain and the replay (from_wire refused it as invalid_timestamp).
    result = accept(envelope(occurred_at="0099-01-01T00:00:00Z"))
    wire = result.to_json_bytes()
    assert json.loads(wire)["occurred_at"] == "0099-01-01T00:00:00Z"
    assert from_wire(wire) == result


@pytest.mark.parametrize(
    "leap",
    ["2016-12-31T23:59:60Z", "2016-12-31t23:59:60.5z", "2016-12-31T15:59:60.123-08:00"],
)
def test_a_leap_second_is_accepted_as_the_last_moment_of_its_minute(leap: str) -> None:
    # RFC 3339 allows 23:59:60 in UTC (JSON Schema's date-time too); refusing it turned a valid
    # child-safety alert into invalid_timestamp. Python holds no 60th second: it is written as
    # the last microsecond of the minute, so it still sorts between :59 and the next minute.
    result = accept(envelope(occurred_at=leap))
    assert result.to_dict()["occurred_at"] == "2016-12-31T23:59:59.999999Z"
    assert from_wire(result.to_json_bytes()) == result


@pytest.mark.parametrize("wrong", ["2016-12-31T22:59:60Z", "2016-12-31T23:58:60Z"])
def test_a_sixtieth_second_anywhere_but_23_59_utc_is_invalid(wrong: str) -> None:
    assert reject(envelope(occurred_at=wrong)).reason is Reason.INVALID_TIMESTAMP


def test_a_message_expiring_later_is_accepted_and_keeps_its_embargo() -> None:
    result = accept(
        envelope(expires_at="2026-11-22T08:00:01Z", embargo_until="2026-11-23T00:00:00Z")
    )
    assert result.expires_at == NOW + timedelta(seconds=1)
    assert result.embargo_until == datetime(2026, 11, 23, tzinfo=UTC)


def test_audience_is_a_set_of_stakeholder_groups() -> None:
    result = accept(envelope(audience=["media", "government", "media"]))
    assert result.audience == frozenset({Stakeholder.MEDIA, Stakeholder.GOVERNMENT})
    assert result.to_dict()["audience"] == ["government", "media"]


def test_bytes_text_and_decoded_input_give_the_same_envelope() -> None:
    body = envelope(message_id=ULID, headers={"region": "jakarta"})
    text = json.dumps(body)
    assert accept(text) == accept(text.encode()) == accept(body)


def test_headers_are_limited_to_4096_bytes_as_compact_json() -> None:
    def headers_of(size: int) -> dict[str, str]:
        headers = {"region": ""}
        headers["region"] = "j" * (size - len(json.dumps(headers, separators=(",", ":"))))
        return headers

    assert accept(envelope(headers=headers_of(MAX_HEADERS_BYTES))).headers
    rejection = reject(envelope(headers=headers_of(MAX_HEADERS_BYTES + 1)))
    assert rejection.reason is Reason.INVALID_HEADER
    assert "4096" in rejection.message


def test_the_encoded_envelope_may_be_248_kib_leaving_the_fallback_room() -> None:
    base = len(accept(envelope(message_id=ULID, payload="")).to_json_bytes())
    fits = envelope(message_id=ULID, payload="x" * (MAX_ENCODED_BYTES - base))
    assert len(accept(fits).to_json_bytes()) == MAX_ENCODED_BYTES == 253_952
    over = envelope(message_id=ULID, payload="x" * (MAX_ENCODED_BYTES - base + 1))
    assert reject(over).reason is Reason.TOO_LARGE


def test_a_stored_envelope_keeps_the_limits_it_was_accepted_under() -> None:
    # Queues, DLQs and the archive hold messages accepted before the 4 KiB header and 248 KiB
    # limits: reading them back (a consumer, replay) must not refuse them.
    headers = {"region": "j" * 5_000}
    big = accept(envelope(message_id=ULID, payload="")).to_json_bytes()
    padding = MAX_ENCODED_BYTES + 1_000 - len(big)
    stored = json.loads(big)
    stored.update(headers=headers, payload="x" * (padding - len(json.dumps(headers)) - 20))
    wire = json.dumps(stored, sort_keys=True, separators=(",", ":")).encode()
    assert MAX_ENCODED_BYTES < len(wire) <= MAX_ENVELOPE_BYTES

    assert from_wire(wire).headers == headers
    assert reject(json.loads(wire)).reason in (Reason.INVALID_HEADER, Reason.TOO_LARGE)


def test_body_over_256_kib_is_too_large_before_parsing() -> None:
    raw = b" " * MAX_ENVELOPE_BYTES + b"{}"
    assert reject(raw).reason is Reason.TOO_LARGE


def test_wire_form_is_canonical_compact_sorted_and_versioned() -> None:
    result = accept(envelope(message_id=ULID, priority="high"))
    wire = result.to_json_bytes()
    decoded = json.loads(wire)
    assert decoded["version"] == VERSION
    assert decoded["source"] == "community"
    assert list(decoded) == sorted(decoded)
    assert wire == json.dumps(decoded, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("raw", [True, False], ids=["bytes", "object"])
def test_noncharacters_sqs_refuses_are_accepted_and_escaped_on_the_wire(raw: bool) -> None:
    # U+FFFE and U+FFFF are valid JSON text, so producers may send them; the fallback path
    # (SNS, then SQS) must never hold them raw, since SQS refuses them in a body or attribute.
    fields = envelope(
        payload={"note\uffff": "a\ufffeb"},
        headers={"region": "x\uffff"},
        correlation_id="c\ufffe",
        reply_to="r\uffff",
    )
    result = accept(json.dumps(fields).encode() if raw else fields)
    wire = result.to_json_bytes()
    assert not {"\ufffe", "\uffff"} & set(wire.decode())
    assert rb'"note\uffff":"a\ufffeb"' in wire
    assert result.payload == {"note\uffff": "a\ufffeb"}
    assert json.loads(wire)["headers"] == {"region": "x\uffff"}
    assert from_wire(wire) == result


def test_from_wire_round_trips_and_keeps_the_recorded_source() -> None:
    original = accept(envelope(message_id=ULID, expires_at="2026-11-22T09:00:00Z"))
    assert from_wire(original.to_json_bytes()) == original


def test_from_wire_does_not_reject_a_message_that_expired_while_queued() -> None:
    wire = accept(envelope(expires_at="2026-11-22T08:00:01Z")).to_json_bytes()
    assert from_wire(wire).expires_at is not None  # NOW is long past in real time


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"{", Reason.MALFORMED_JSON),
        (b'{"topic": "a", "payload": 1, "source": "x"}', Reason.MISSING_FIELD),
        (json.dumps({**envelope(), "version": VERSION}).encode(), Reason.MISSING_FIELD),
        (
            json.dumps({**envelope(), "version": VERSION, "source": 3}).encode(),
            Reason.INVALID_FIELD_TYPE,
        ),
        (
            json.dumps({**envelope(topic="A"), "version": VERSION, "source": "x"}).encode(),
            Reason.INVALID_TOPIC,
        ),
    ],
)
def test_from_wire_raises_with_the_rejection(wire: bytes, reason: Reason) -> None:
    with pytest.raises(MessageRejected) as caught:
        from_wire(wire)
    assert caught.value.rejection.reason is reason


def test_batch_keeps_input_order_and_rejects_later_duplicates() -> None:
    first = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    items: list[Any] = [
        envelope(message_id=first),
        b"not json",
        envelope(message_id=first.upper(), topic="case.updated"),
        envelope(message_id=ULID),
        envelope(message_id=first),
    ]
    results = validate_batch(items, "government", now=NOW)
    assert [type(r).__name__ for r in results] == [
        "Envelope",
        "Rejection",
        "Rejection",
        "Envelope",
        "Rejection",
    ]
    assert isinstance(results[1], Rejection)
    assert results[1].reason is Reason.MALFORMED_JSON
    for duplicate in (results[2], results[4]):
        assert isinstance(duplicate, Rejection)
        assert duplicate.reason is Reason.DUPLICATE_MESSAGE_ID
        assert duplicate.message_id == first


def test_batch_does_not_let_a_rejected_first_occurrence_block_a_valid_one() -> None:
    results = validate_batch(
        [envelope(message_id=ULID, topic="BAD"), envelope(message_id=ULID)], "media", now=NOW
    )
    assert isinstance(results[0], Rejection)
    assert isinstance(results[1], Envelope)


json_values: st.SearchStrategy[JsonValue] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)
words = st.from_regex(r"[a-z0-9-]{1,8}", fullmatch=True)


@given(
    payload=json_values,
    topic=st.lists(words, min_size=1, max_size=5).map(".".join),
    priority=st.sampled_from(Priority),
    classification=st.sampled_from(Classification),
    audience=st.none() | st.sets(st.sampled_from(Stakeholder), min_size=1),
)
def test_any_valid_envelope_survives_the_wire_unchanged(
    payload: JsonValue,
    topic: str,
    priority: Priority,
    classification: Classification,
    audience: set[Stakeholder] | None,
) -> None:
    body: dict[str, Any] = {
        "topic": topic,
        "payload": payload,
        "priority": str(priority),
        "classification": str(classification),
    }
    if audience is not None:
        body["audience"] = [str(group) for group in audience]
    result = accept(body)
    assert from_wire(result.to_json_bytes()) == result
    assert accept(result.to_json_bytes(), source="community") == result


def test_the_contract_document_lists_every_reason_code_with_its_meaning() -> None:
    doc = (Path(__file__).parents[2] / "docs/message-contract.md").read_text(encoding="utf-8")
    for reason in Reason:
        assert f"| `{reason}` | {reason.meaning} |" in doc, reason


def test_an_in_process_callers_non_string_keys_are_rejected_not_a_crash() -> None:
    # Lambda's JSON always has string keys; a caller of router.route in the same process may
    # hand over any dict, and still gets a reason, never a TypeError.
    assert reject({**envelope(), 1: "a"}).reason is Reason.MALFORMED_JSON
    assert reject(envelope(headers={1: "a"})).reason is Reason.INVALID_HEADER


def test_a_payload_holding_a_big_integer_keeps_the_nesting_limit() -> None:
    # Beyond 64 bits the encoder falls back to the standard library's, which has no depth cap.
    nested: Any = []
    for _ in range(300):
        nested = [nested]
    # The big integer first: the fast encoder gives up on it before it meets the depth.
    assert reject(envelope(payload=[2**70, nested])).reason is Reason.MALFORMED_JSON
    assert accept(envelope(payload=[[2**70]])).payload == [[2**70]]


def test_a_duplicate_key_is_found_in_linear_time() -> None:
    # Finding the duplicate by counting every key was quadratic: the last of 24,000 keys
    # repeated, in a body within the 256 KiB limit, took 5 s to refuse (a 4 MiB HTTPS batch,
    # read whole, hours), holding the function until its timeout and an SQS batch with it.
    keys = ",".join(f'"k{i}":0' for i in range(24_000))
    body = '{"topic":"donation.received","payload":{' + keys + ',"k23999":1}}'
    assert len(body.encode()) <= MAX_ENVELOPE_BYTES
    started = time.perf_counter()
    rejection = reject(body)
    assert time.perf_counter() - started < 1.0
    assert rejection.reason is Reason.MALFORMED_JSON
    assert "'k23999'" in rejection.message


LONG = "\u00e9" * 100_000  # 200 KB as UTF-8, 600 KB once JSON-escaped in a response


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (envelope(**{LONG: 1}), Reason.UNKNOWN_FIELD),
        (envelope(**{f"{LONG}{i}": 1 for i in range(20)}), Reason.UNKNOWN_FIELD),
        (envelope(headers={LONG: "x"}), Reason.INVALID_HEADER),
        (envelope(audience=[LONG]), Reason.UNKNOWN_AUDIENCE),
        (envelope(audience=[[LONG]]), Reason.UNKNOWN_AUDIENCE),
        (envelope(occurred_at=LONG), Reason.INVALID_TIMESTAMP),
        (
            '{"payload": 1, "' + LONG[:60_000] + '": 1, "' + LONG[:60_000] + '": 2}',
            Reason.MALFORMED_JSON,
        ),
    ],
)
def test_a_rejection_quotes_at_most_a_bounded_part_of_the_input(raw: Any, reason: Reason) -> None:
    # The message goes back in the response: quoted whole, 200 KB field names pushed the answer
    # of a 4 MiB batch past Lambda's 6 MB response limit, and the producer got an error instead
    # of the results of the messages that were stored.
    rejection = reject(raw)
    assert rejection.reason is reason
    assert len(rejection.message) < 400, rejection.message[:400]
