"""The router: one result per message in order, accepted only when stored, audited, encrypted."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryTransport
from fabric.adapters.memory_cipher import LocalCipher
from fabric.audit import AuditEvent, AuditRecord, decode_audit_batch
from fabric.audit_sink import TransportAuditSink
from fabric.envelope import Reason
from fabric.errors import EncryptionUnavailable
from fabric.ports import Failure, PreparedAudit
from fabric.protection import encryption_context, open_payload
from fabric.router import ACCEPTED, REJECTED, BatchResult, Router
from fabric.routing import default_routing_table
from fabric.stakeholders import Stakeholder
from fabric.topology import queue_name

CANARY = "CANARY-child-name-Siti-Rahayu"
NOW = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


def _router(*transports: MemoryTransport, audit: MemoryAuditSink | None = None) -> Router:
    return Router(
        table=default_routing_table(),
        transports=list(transports) or [MemoryTransport()],
        cipher=LocalCipher(),
        audit=audit or MemoryAuditSink(),
        environment="test",
        clock=lambda: NOW,
    )


def incident(**overrides: object) -> dict[str, object]:
    message: dict[str, object] = {
        "message_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "topic": "child-safety.incident.reported",
        "priority": "emergency",
        "classification": "restricted",
        "payload": {"child": CANARY, "location": "Jakarta Timur"},
    }
    message.update(overrides)
    return message


def test_an_accepted_message_is_stored_with_the_callers_identity_not_the_bodys() -> None:
    transport = MemoryTransport()
    result = _router(transport).route([incident(source="media")], source="community")
    assert result.to_dict()["accepted"] == 1
    assert result.results[0].transport == "memory"
    (stored,) = transport.published
    assert json.loads(stored.body)["source"] == "community"


def test_results_come_one_per_message_in_input_order() -> None:
    items = [
        incident(message_id="0f8fad5b-d9cb-469f-a165-70867728950e"),
        b"{not json",
        incident(message_id="7c9e6679-7425-40de-944b-e07fc1f90ae7", topic="Bad Topic"),
        incident(message_id="16fd2706-8baf-433b-82eb-8c7fada847da"),
    ]
    result = _router().route(items, source="community")
    assert [(r.status, r.reason) for r in result.results] == [
        (ACCEPTED, None),
        (REJECTED, Reason.MALFORMED_JSON),
        (REJECTED, Reason.INVALID_TOPIC),
        (ACCEPTED, None),
    ]
    assert result.results[3].message_id == "16fd2706-8baf-433b-82eb-8c7fada847da"
    assert (result.accepted, result.rejected) == (2, 2)


def test_a_source_may_only_publish_the_topics_the_table_allows() -> None:
    result = _router().route([incident()], source="media")
    assert result.results[0].reason is Reason.SOURCE_NOT_ALLOWED


def test_restricted_payloads_are_stored_only_as_ciphertext_bound_to_their_context() -> None:
    transport = MemoryTransport()
    router = _router(transport)
    router.route([incident()], source="community")
    (stored,) = transport.published
    assert CANARY.encode() not in stored.body
    envelope = json.loads(stored.body)
    context = encryption_context(
        message_id=envelope["message_id"], source="community", environment="test"
    )
    plaintext = open_payload(router._cipher, envelope["payload"], context)
    assert json.loads(plaintext)["child"] == CANARY


def test_emergency_routes_take_the_emergency_path() -> None:
    transport = MemoryTransport()
    _router(transport).route([incident()], source="community")
    (stored,) = transport.published
    assert stored.emergency is True
    assert {g.value for g in stored.audience} >= {"government", "community"}


def test_nothing_is_accepted_when_no_transport_stores_it() -> None:
    audit = MemoryAuditSink()
    result = _router(MemoryTransport(failure=Failure.UNAVAILABLE), audit=audit).route(
        [incident()], source="community"
    )
    assert result.results[0].status == REJECTED
    assert result.results[0].reason is Reason.UNAVAILABLE
    assert [r.event for r in audit.records] == [AuditEvent.REJECTED]
    # Nothing was stored, so no hash: its unstored body's would be a hash of its plaintext.
    assert audit.records[0].body_sha256 is None
    assert audit.bodies == {}


def test_messages_the_first_transport_refuses_go_to_the_next() -> None:
    broker = MemoryTransport(name="rabbitmq", fail_ids={"7c9e6679-7425-40de-944b-e07fc1f90ae7"})
    fallback = MemoryTransport(name="fallback")
    items = [incident(), incident(message_id="7c9e6679-7425-40de-944b-e07fc1f90ae7")]
    result = _router(broker, fallback).route(items, source="community")
    assert [r.transport for r in result.results] == ["rabbitmq", "fallback"]
    assert [m.message_id for m in fallback.published] == ["7c9e6679-7425-40de-944b-e07fc1f90ae7"]


def test_bad_input_leaves_one_record_and_an_accepted_message_its_route_without_plaintext() -> None:
    audit = MemoryAuditSink()
    transport = MemoryTransport()
    items = [incident(), b"", incident(topic="UPPER")]
    _router(transport, audit=audit).route(items, source="community")
    assert [(r.event, r.reason) for r in audit.records] == [
        (AuditEvent.REJECTED, "empty_body"),
        (AuditEvent.REJECTED, "invalid_topic"),
        (AuditEvent.ACCEPTED, None),
        (AuditEvent.ROUTED, None),
    ]
    for record in audit.records:
        # The hash of what was stored; a rejection stored nothing, and the hash of its input
        # would let a reader of the trail confirm a guess at a child's data.
        stored = record.event is not AuditEvent.REJECTED
        assert (record.body_sha256 is not None) == stored
        assert record.body_sha256 is None or len(record.body_sha256) == 64
        assert CANARY not in json.dumps(record.to_dict())
    accepted, routed = audit.records[2:]
    assert accepted.encrypted is True
    (stored,) = transport.published
    assert routed.queues == tuple(
        sorted(queue_name(Stakeholder(g), emergency=stored.emergency) for g in accepted.groups)
    )
    # The archive gets the stored (encrypted) bytes, named by the records' hash.
    assert audit.bodies == {accepted.body_sha256: stored.body}
    assert CANARY.encode() not in stored.body


def test_a_rejected_messages_record_holds_no_text_the_producer_sent() -> None:
    # The trail is locked for seven years: a rejected message's topic, id or field names are
    # whatever the producer sent (a child's name, say), so its record keeps only the reason
    # code, the hash of the input, and the id when the input had a valid one (the compliance
    # report counts rejections by id).
    audit = MemoryAuditSink()
    valid = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
    items = [
        incident(message_id=valid, topic=f"child-safety.{CANARY} hurt"),
        incident(message_id=f"{CANARY} case 7"),
        incident(message_id=valid, **{f"{CANARY} notes": "x"}),
        incident(message_id=valid, priority=CANARY),
        f'{{"topic": "{CANARY}", "payload": ',
    ]
    result = _router(audit=audit).route(items, source="community")
    assert [r.reason for r in result.results] == [
        Reason.INVALID_TOPIC,
        Reason.INVALID_MESSAGE_ID,
        Reason.UNKNOWN_FIELD,
        Reason.INVALID_PRIORITY,
        Reason.MALFORMED_JSON,
    ]
    assert [(r.event, r.message_id, r.topic) for r in audit.records] == [
        (AuditEvent.REJECTED, valid, None),
        (AuditEvent.REJECTED, None, None),
        (AuditEvent.REJECTED, valid, None),
        (AuditEvent.REJECTED, valid, None),
        (AuditEvent.REJECTED, None, None),
    ]
    for record in audit.records:
        assert CANARY not in json.dumps(record.to_dict())


def test_a_payload_that_is_not_json_is_rejected_alone_and_audited_once() -> None:
    audit = MemoryAuditSink()
    first, second = "7c9e6679-7425-40de-944b-e07fc1f90ae7", "0f8fad5b-d9cb-469f-a165-70867728950e"
    items = [
        incident(message_id=first),
        incident(message_id="3b241101-e2bb-4255-8caf-4136c566a962", payload={"n": float("nan")}),
        incident(message_id=second),
    ]
    result = _router(audit=audit).route(items, source="community")
    assert [(r.status, r.reason) for r in result.results] == [
        (ACCEPTED, None),
        (REJECTED, Reason.MALFORMED_JSON),
        (ACCEPTED, None),
    ]
    rejected = [r for r in audit.records if r.event is AuditEvent.REJECTED]
    assert [(r.message_id, r.reason) for r in rejected] == [
        ("3b241101-e2bb-4255-8caf-4136c566a962", "malformed_json")
    ]
    assert rejected[0].body_sha256 is None  # nothing of it stored, nothing of it recorded


def test_a_message_the_broker_refused_is_audited_as_fallback_with_the_reason() -> None:
    audit = MemoryAuditSink()
    broker = MemoryTransport(name="rabbitmq", failure=Failure.NACKED)
    _router(broker, MemoryTransport(name="sns"), audit=audit).route(
        [incident()], source="community"
    )
    assert [(r.event, r.transport, r.reason) for r in audit.records] == [
        (AuditEvent.ACCEPTED, "sns", None),
        (AuditEvent.FALLBACK, "sns", "nacked"),
    ]


def test_a_lost_audit_batch_does_not_change_what_producers_are_told() -> None:
    result = _router(audit=MemoryAuditSink(available=False)).route([incident()], source="community")
    assert result.results[0].status == ACCEPTED
    # The entry points learn it (SQS ingest keeps the messages); producers' answers do not.
    assert result.audited is False
    assert "audited" not in result.to_dict()


def test_an_envelope_that_grows_past_the_limit_when_encrypted_is_rejected_too_large() -> None:
    payload = {"note": "x" * 200_000}
    result = _router().route([incident(payload=payload)], source="community")
    assert result.results[0].reason is Reason.TOO_LARGE


def test_a_missing_source_is_a_wiring_error_not_a_rejection() -> None:
    with pytest.raises(ValueError, match="source"):
        _router().route([incident()], source="")


class _Spy(TransportAuditSink):
    """The production sink, remembering what it prepared."""

    prepared: list[PreparedAudit]

    def prepare(
        self, records: Sequence[AuditRecord], bodies: Mapping[str, bytes] | None = None
    ) -> PreparedAudit:
        prepared = super().prepare(records, bodies)
        self.prepared.append(prepared)
        return prepared


def _audited(broker: MemoryTransport, *fallback: MemoryTransport) -> tuple[_Spy, MemoryTransport]:
    audit_path = MemoryTransport(name="rabbitmq")
    sink = _Spy([audit_path], emitted_by="router")
    sink.prepared = []
    router = Router(
        table=default_routing_table(),
        transports=[broker, *fallback],
        cipher=LocalCipher(),
        audit=sink,
        environment="test",
        clock=lambda: NOW,
    )
    items = [
        incident(message_id="0f8fad5b-d9cb-469f-a165-70867728950e"),
        b"{not json",
        incident(message_id="16fd2706-8baf-433b-82eb-8c7fada847da"),
    ]
    router.route(items, source="community")
    return sink, audit_path


def _events(audit_path: MemoryTransport) -> list[tuple[str, str | None]]:
    records = [r for m in audit_path.published for r in decode_audit_batch(m.body).records]
    return [(str(r["event"]), str(r.get("transport"))) for r in records]


def test_the_audit_batch_prepared_while_the_broker_stores_is_the_one_emitted() -> None:
    sink, audit_path = _audited(MemoryTransport(name="rabbitmq"))
    (prepared,) = sink.prepared
    assert audit_path.published == list(prepared.encoded)
    assert _events(audit_path) == [
        ("rejected", "None"),
        ("accepted", "rabbitmq"),
        ("routed", "rabbitmq"),
        ("accepted", "rabbitmq"),
        ("routed", "rabbitmq"),
    ]


def test_a_prepared_audit_batch_is_dropped_when_a_message_goes_to_the_fallback() -> None:
    broker = MemoryTransport(name="rabbitmq", fail_ids={"16fd2706-8baf-433b-82eb-8c7fada847da"})
    sink, audit_path = _audited(broker, MemoryTransport(name="sns"))
    ahead, at_emit = sink.prepared  # the batch prepared ahead no longer says what happened
    assert audit_path.published == list(at_emit.encoded)
    assert not {m.message_id for m in audit_path.published} & {m.message_id for m in ahead.encoded}
    assert _events(audit_path) == [
        ("rejected", "None"),
        ("accepted", "rabbitmq"),
        ("routed", "rabbitmq"),
        ("accepted", "sns"),
        ("fallback", "sns"),
    ]


# -- duplicates: decided after admission -----------------------------------------------------

RETRIED = "3b241101-e2bb-4255-8caf-4136c566a962"


@pytest.mark.parametrize(
    ("refused", "reason"),
    [
        (incident(message_id=RETRIED, topic="case.updated"), Reason.SOURCE_NOT_ALLOWED),
        (incident(message_id=RETRIED, audience=["media"]), Reason.AUDIENCE_NOT_ROUTABLE),
        (incident(message_id=RETRIED, classification="internal"), Reason.CLASSIFICATION_TOO_LOW),
        # Fits before encryption, not after it (base64 makes it a third larger).
        (incident(message_id=RETRIED, payload={"note": "x" * 200_000}), Reason.TOO_LARGE),
    ],
)
def test_a_copy_the_router_refused_does_not_block_its_corrected_retry_in_the_same_batch(
    refused: dict[str, object], reason: Reason
) -> None:
    transport, audit = MemoryTransport(), MemoryAuditSink()
    result = _router(transport, audit=audit).route(
        [refused, incident(message_id=RETRIED)], source="community"
    )
    assert [(r.status, r.reason) for r in result.results] == [
        (REJECTED, reason),
        (ACCEPTED, None),
    ]
    assert [m.message_id for m in transport.published] == [RETRIED]
    assert [(r.event, r.reason) for r in audit.records] == [
        (AuditEvent.REJECTED, str(reason)),
        (AuditEvent.ACCEPTED, None),
        (AuditEvent.ROUTED, None),
    ]


def test_a_copy_the_key_service_could_not_encrypt_holds_its_id_for_its_retry() -> None:
    # `unavailable` is no final answer: the producer (or SQS) retries that copy, so a later copy
    # in the same call is a duplicate, as it would be of one the broker stored.
    class _KmsDown(LocalCipher):
        def encrypt(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
            raise EncryptionUnavailable("kms unreachable")

    transport = MemoryTransport()
    router = _router(transport)
    router._cipher = _KmsDown()
    alert = {
        "message_id": RETRIED,
        "topic": "child-safety.alert.public",
        "classification": "public",
        "payload": {"alert": "missing child"},
    }
    result = router.route([incident(message_id=RETRIED), alert], source="government")
    assert [(r.status, r.reason) for r in result.results] == [
        (REJECTED, Reason.UNAVAILABLE),
        (REJECTED, Reason.DUPLICATE_MESSAGE_ID),
    ]
    assert transport.published == []


def test_two_admitted_copies_of_one_message_id_are_one_accepted_and_one_duplicate() -> None:
    transport, audit = MemoryTransport(), MemoryAuditSink()
    items = [
        incident(message_id=RETRIED),
        incident(message_id=RETRIED.upper(), payload={"other": "body"}),
        incident(message_id=RETRIED, topic="case.updated"),  # refused for what it is
    ]
    result = _router(transport, audit=audit).route(items, source="community")
    assert [(r.status, r.reason, r.message_id) for r in result.results] == [
        (ACCEPTED, None, RETRIED),
        (REJECTED, Reason.DUPLICATE_MESSAGE_ID, RETRIED),
        (REJECTED, Reason.SOURCE_NOT_ALLOWED, RETRIED),
    ]
    assert [m.message_id for m in transport.published] == [RETRIED]
    rejected = [(r.reason, r.topic) for r in audit.records if r.event is AuditEvent.REJECTED]
    assert rejected == [
        ("duplicate_message_id", "child-safety.incident.reported"),
        ("source_not_allowed", "case.updated"),
    ]


def test_a_taken_copy_no_transport_stored_still_makes_a_later_one_a_duplicate() -> None:
    # The same call would hand the later copy to the same transports; the first copy's
    # `unavailable` is the answer to retry, and retrying it never meets a duplicate.
    result = _router(MemoryTransport(failure=Failure.UNAVAILABLE)).route(
        [incident(message_id=RETRIED), incident(message_id=RETRIED)], source="community"
    )
    assert [r.reason for r in result.results] == [Reason.UNAVAILABLE, Reason.DUPLICATE_MESSAGE_ID]


def _deepest_list_json_reads() -> object:
    """The most deeply nested list ``json.loads`` reads here: what Lambda's runtime could hand
    over in a direct invoke's event."""
    depth = sys.getrecursionlimit()
    while True:
        try:
            return json.loads("[" * depth + "]" * depth)
        except RecursionError:
            depth -= 5


def _deeper(frames: int, call: Callable[[], object]) -> object:
    return call() if frames == 0 else _deeper(frames - 1, call)


def test_input_nested_as_deeply_as_the_event_parser_allows_is_rejected_not_a_crash() -> None:
    # The router runs deeper on the stack than the runtime's parser did (the handler, the
    # transport's I/O loop, the generator), and quoting or hashing such a value with repr()
    # ran out of recursion there: the call failed, results and audit records lost with it.
    nested = _deepest_list_json_reads()
    audit = MemoryAuditSink()
    items = [
        {"topic": "donation.received", "payload": 1, "audience": [nested]},
        {"topic": "donation.received", "payload": nested},
        nested,
        {"topic": "donation.received", "payload": 1},
    ]
    result = _deeper(60, lambda: _router(audit=audit).route(items, source="community"))
    assert isinstance(result, BatchResult)
    assert [r.reason for r in result.results] == [
        Reason.UNKNOWN_AUDIENCE,
        Reason.MALFORMED_JSON,
        Reason.NOT_AN_OBJECT,
        None,
    ]
    rejected = [r for r in audit.records if r.event is AuditEvent.REJECTED]
    assert [r.reason for r in rejected] == ["unknown_audience", "malformed_json", "not_an_object"]


class _StopsReading(MemoryTransport):
    """A transport that stores the first message and stops reading the batch (a defect)."""

    def publish(self, messages, *, meanwhile=None):  # type: ignore[no-untyped-def]
        return super().publish([next(iter(messages))], meanwhile=meanwhile)


def test_a_call_whose_transport_stopped_reading_fails_instead_of_answering_for_fewer() -> None:
    three = [incident(message_id=f"0f8fad5b-d9cb-469f-a165-7086772895{i:02d}") for i in range(3)]

    with pytest.raises(RuntimeError, match="2 message"):
        _router(_StopsReading()).route(three, source="government")


def test_a_refused_request_is_one_rejected_record_with_nothing_of_it() -> None:
    audit = MemoryAuditSink()
    assert _router(audit=audit).refuse_request(reason="too_large", source="government")
    (record,) = audit.records
    assert record.to_dict() == {
        "event": "rejected",
        "at": "2026-11-22T09:00:00Z",
        "message_id": None,
        "source": "government",
        "reason": "too_large",
    }
    assert CANARY.encode() not in record.encoded()


def test_a_refused_request_without_a_group_is_recorded_as_unauthenticated() -> None:
    audit = MemoryAuditSink()
    _router(audit=audit).refuse_request(reason="unauthenticated", source=None)
    (record,) = audit.records
    assert (record.source, record.body_sha256) == ("unauthenticated", None)


def test_a_refused_request_whose_record_cannot_be_stored_says_so_and_never_raises() -> None:
    audit = MemoryAuditSink(available=False)
    assert not _router(audit=audit).refuse_request(reason="malformed_request", source=None)
