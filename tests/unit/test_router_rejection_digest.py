"""A rejected restricted message leaves no hash of its plaintext payload in the audit trail.

The trail is kept 7 years and names each record's message id, topic and source: a hash of a
low-entropy payload (a risk level, a case reference) would let anyone who reads it confirm a
guess offline. A rejected restricted message is hashed without its payload instead.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryTransport
from fabric.adapters.memory_cipher import LocalCipher
from fabric.audit import AuditEvent, AuditRecord
from fabric.envelope import Reason
from fabric.errors import EncryptionUnavailable
from fabric.jsoncodec import canonical_json
from fabric.ports import Failure
from fabric.router import Router
from fabric.routing import default_routing_table

RISKS = ("low", "medium", "high")


class _KeysDown(LocalCipher):
    def encrypt(self, plaintext: bytes, context: dict[str, str]) -> bytes:
        raise EncryptionUnavailable("cannot encrypt: EndpointConnectionError")


def _router(
    audit: MemoryAuditSink, *transports: MemoryTransport, keys_down: bool = False
) -> Router:
    return Router(
        table=default_routing_table(),
        transports=list(transports) or [MemoryTransport()],
        cipher=_KeysDown() if keys_down else LocalCipher(),
        audit=audit,
        environment="test",
    )


def case(risk: str = "high", **overrides: object) -> dict[str, Any]:
    message: dict[str, Any] = {
        "message_id": str(uuid.UUID(int=7, version=4)),
        "topic": "case.updated",
        "classification": "restricted",
        "payload": {"child": "Siti A.", "dob": "2019-04-02", "risk": risk},
    }
    message.update(overrides)
    return message


def _rejected(audit: MemoryAuditSink) -> AuditRecord:
    (record,) = [r for r in audit.records if r.event is AuditEvent.REJECTED]
    return record


def _without_payload(message: dict[str, Any]) -> str:
    return hashlib.sha256(
        canonical_json({k: v for k, v in message.items() if k != "payload"})
    ).hexdigest()


def _guesses_confirmed(record: AuditRecord, make_guess: Any) -> list[str]:
    """The risk levels whose guessed input hashes (as canonical JSON, or as the guessed bytes)
    to the record's ``body_sha256``."""
    confirmed = []
    for risk in RISKS:
        guess = make_guess(risk)
        data = guess if isinstance(guess, bytes) else canonical_json(guess)
        if hashlib.sha256(data).hexdigest() == record.body_sha256:
            confirmed.append(risk)
    return confirmed


def test_a_restricted_message_refused_while_keys_are_down_leaves_no_hash_of_its_payload() -> None:
    audit = MemoryAuditSink()
    result = _router(audit, keys_down=True).route([case()], source="government")
    assert result.results[0].reason is Reason.UNAVAILABLE
    record = _rejected(audit)
    assert _guesses_confirmed(record, case) == []
    # It is hashed without its payload, and the record says the message was restricted.
    assert (record.body_sha256, record.classification) == (_without_payload(case()), "restricted")


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"colour": "red"}, Reason.UNKNOWN_FIELD),
        ({"topic": "Case Updated"}, Reason.INVALID_TOPIC),
        ({"message_id": "not-an-id"}, Reason.INVALID_MESSAGE_ID),
        ({"classification": "Restricted"}, Reason.INVALID_CLASSIFICATION),
    ],
)
def test_an_invalid_restricted_message_leaves_no_hash_of_its_payload(
    overrides: dict[str, object], reason: Reason
) -> None:
    audit = MemoryAuditSink()
    result = _router(audit).route([case(**overrides)], source="government")
    assert result.results[0].reason is reason
    record = _rejected(audit)
    assert _guesses_confirmed(record, lambda risk: case(risk, **overrides)) == []
    assert record.body_sha256 == _without_payload(case(**overrides))


# How producers' serializers really send restricted messages the contract refuses: Python's
# json.dumps writes NaN, .NET can write a byte order mark, an old client Latin-1.
REFUSED_TEXT = {
    "NaN": (
        lambda risk: json.dumps({**case(risk), "payload": {"risk": risk, "score": float("nan")}}),
        Reason.MALFORMED_JSON,
    ),
    "a duplicate key": (
        lambda risk: json.dumps(case(risk))[:-1] + ', "topic": "case.updated"}',
        Reason.MALFORMED_JSON,
    ),
    "a byte order mark": (lambda risk: "\ufeff" + json.dumps(case(risk)), Reason.MALFORMED_JSON),
    "Latin-1": (
        lambda risk: json.dumps(
            case(risk, payload={"child": "Zoë", "risk": risk}), ensure_ascii=False
        ).encode("latin-1"),
        Reason.INVALID_UTF8,
    ),
}


@pytest.mark.parametrize(("sent", "reason"), REFUSED_TEXT.values(), ids=REFUSED_TEXT.keys())
def test_restricted_text_the_contract_refuses_leaves_no_hash_of_its_payload(
    sent: Any, reason: Reason
) -> None:
    audit = MemoryAuditSink()
    body = sent("high")
    result = _router(audit).route([body], source="government")
    assert result.results[0].reason is reason
    record = _rejected(audit)

    def as_sent(risk: str) -> bytes:
        text = sent(risk)
        return text if isinstance(text, bytes) else text.encode()

    assert _guesses_confirmed(record, as_sent) == []
    assert record.classification == "restricted"


def test_a_restricted_message_no_transport_stored_is_hashed_without_its_payload() -> None:
    audit = MemoryAuditSink()
    down = [MemoryTransport(name=n, failure=Failure.UNAVAILABLE) for n in ("rabbitmq", "sns")]
    text = json.dumps(case())
    result = _router(audit, *down).route([text], source="government")
    assert result.results[0].reason is Reason.UNAVAILABLE
    record = _rejected(audit)
    assert (record.body_sha256, record.classification) == (_without_payload(case()), "restricted")


def test_a_message_no_transport_stored_is_hashed_as_received_like_every_rejection() -> None:
    audit = MemoryAuditSink()
    down = [MemoryTransport(name=n, failure=Failure.UNAVAILABLE) for n in ("rabbitmq", "sns")]
    text = json.dumps({"topic": "donation.received", "payload": {"amount": 5}})
    _router(audit, *down).route([text], source="business")
    record = _rejected(audit)
    assert record.reason == "unavailable"
    assert (record.body_sha256, record.classification) == (
        hashlib.sha256(text.encode()).hexdigest(),
        None,
    )


def test_child_data_sent_without_the_restricted_label_leaves_no_hash_of_its_payload() -> None:
    # case.# requires restricted: a producer that left the label off is refused, and its
    # payload is child data all the same.
    audit = MemoryAuditSink()
    unlabelled = {k: v for k, v in case().items() if k != "classification"}
    result = _router(audit).route([unlabelled], source="government")
    assert result.results[0].reason is Reason.CLASSIFICATION_TOO_LOW
    record = _rejected(audit)
    assert record.body_sha256 == _without_payload(unlabelled)
    assert record.classification == "restricted"


def test_a_rejected_message_that_is_not_restricted_is_hashed_as_received() -> None:
    audit = MemoryAuditSink()
    message = {"topic": "donation.received", "payload": {"amount": 5}, "colour": "red"}
    _router(audit).route([message], source="business")
    record = _rejected(audit)
    assert (record.body_sha256, record.classification) == (
        hashlib.sha256(canonical_json(message)).hexdigest(),
        None,
    )


def test_text_that_is_not_json_at_all_is_hashed_as_received() -> None:
    # A restricted message cut off mid-way: no reader can tell its payload from the rest, and a
    # guess would have to reproduce its exact bytes.
    audit = MemoryAuditSink()
    cut = json.dumps(case())[:-10]
    _router(audit).route([cut], source="government")
    record = _rejected(audit)
    assert (record.reason, record.body_sha256) == (
        "malformed_json",
        hashlib.sha256(cut.encode()).hexdigest(),
    )


def test_a_refused_request_of_a_restricted_message_as_text_leaves_no_hash_of_its_payload() -> None:
    # A direct invoke may send each message as its JSON text; refused, the event is hashed.
    audit = MemoryAuditSink()
    event = {"messages": [json.dumps(case())]}
    _router(audit).refuse_request(event, reason="unauthenticated", source=None)
    (record,) = audit.records
    assert _guesses_confirmed(record, lambda risk: {"messages": [json.dumps(case(risk))]}) == []
    hashed = {"messages": [{k: v for k, v in case().items() if k != "payload"}]}
    assert record.body_sha256 == hashlib.sha256(canonical_json(hashed)).hexdigest()
    assert record.classification == "restricted"
