"""The router's entry points: who the caller is, and what each kind of caller is answered."""

from __future__ import annotations

import base64
import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from fabric import metrics
from fabric.adapters.memory import MemoryAuditSink, MemoryMetrics, MemoryTransport
from fabric.adapters.memory_cipher import LocalCipher
from fabric.audit import AuditEvent
from fabric.bootstrap import RouterRuntime
from fabric.entrypoints import MAX_BATCH, MAX_REQUEST_BYTES, dispatch
from fabric.errors import EncryptionUnavailable
from fabric.ports import Failure, Outcome
from fabric.router import Router
from fabric.routing import default_routing_table
from fabric.settings import RouterSettings

EVENTS = Path(__file__).resolve().parents[1] / "events"
FUNCTION = "arn:aws:lambda:ap-southeast-3:111111111111:function:fabric-dev-router"


def event(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / name).read_text())  # type: ignore[no-any-return]


def runtime(transport: MemoryTransport | None = None) -> RouterRuntime:
    settings = RouterSettings(
        environment="test",
        rabbitmq_host="unused",
        rabbitmq_port=5671,
        rabbitmq_tls=True,
        rabbitmq_vhost="/",
        rabbitmq_secret_arn="unused",  # noqa: S106 (an ARN, and never read here)
        messages_key_arn="unused",
        identity_claim="fabric:group",
        ingest_queue_prefix="fabric-dev-ingest-",
        fallback_topic_arn="unused",
        emergency_topic_arn="unused",
    )
    router = Router(
        table=default_routing_table(),
        transports=[transport or MemoryTransport()],
        cipher=LocalCipher(),
        audit=MemoryAuditSink(),
        environment="test",
    )
    return RouterRuntime(router=router, settings=settings)


def http(
    body: str | bytes | None, *, claims: dict[str, str] | None = None, b64: bool = False
) -> Any:
    request = event("http_single.json")
    if isinstance(body, bytes):
        body = base64.b64encode(body).decode() if b64 else body.decode()
    request["body"] = body
    request["isBase64Encoded"] = b64
    if claims is not None:
        request["requestContext"]["authorizer"]["jwt"]["claims"] = claims
    response = dispatch(request, FUNCTION, runtime())
    return response["statusCode"], json.loads(response["body"])


def single() -> dict[str, Any]:
    return json.loads(event("http_single.json")["body"])  # type: ignore[no-any-return]


# -- HTTPS --------------------------------------------------------------------------------------


def test_https_all_accepted_is_202_with_one_result() -> None:
    status, body = http(json.dumps(single()))
    assert status == 202
    assert body["accepted"] == 1
    assert body["results"][0]["status"] == "accepted"


def test_https_batch_with_some_rejected_is_207_in_input_order() -> None:
    good = single()
    bad = {**single(), "message_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "priority": "urgent"}
    status, body = http(json.dumps({"messages": [good, bad]}))
    assert status == 207
    assert [r["status"] for r in body["results"]] == ["accepted", "rejected"]
    assert body["results"][1]["reason"] == "invalid_priority"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty_body"),
        (b"{not json", "malformed_json"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (b"[1, 2]", "not_an_object"),
        (b'{"payload": {}}', "missing_field"),
    ],
)
def test_https_a_single_bad_envelope_is_400_with_its_reason(raw: bytes, reason: str) -> None:
    status, body = http(raw, b64=True)
    assert status == 400
    assert body["results"][0]["reason"] == reason


def test_https_a_batch_is_read_as_strictly_as_an_envelope() -> None:
    # "Last one wins" on a duplicate key would route what a gateway, a WAF or a log reader
    # that keeps the first value never saw.
    text = json.dumps({"messages": [single()]})
    duplicated = text.replace('"classification":', '"classification": "public", "classification":')
    assert duplicated != text
    status, body = http(duplicated)
    assert status == 207  # a batch: its one message refused in its place
    assert [r["reason"] for r in body["results"]] == ["malformed_json"]


@pytest.mark.parametrize(
    ("encoding", "reason"),
    [
        ("utf-16", "invalid_utf8"),  # the byte order mark is not UTF-8
        ("utf-32", "invalid_utf8"),
        ("utf-16-le", "malformed_json"),  # without one, it is UTF-8 with a NUL in every pair
    ],
)
def test_https_a_batch_that_is_not_utf8_is_refused_as_a_single_envelope_would_be(
    encoding: str, reason: str
) -> None:
    # JSON between systems is UTF-8. Python's json reads UTF-16 and UTF-32 bytes as well, and
    # so such a batch was routed, while the same envelope alone was refused.
    text = json.dumps({"messages": [single()]})
    for body in (json.dumps(single()), text):
        status, answer = http(body.encode(encoding), b64=True)
        assert status == 400
        assert [r["reason"] for r in answer["results"]] == [reason]


def test_https_json_nested_too_deeply_is_malformed_not_a_crash() -> None:
    nested = '{"topic": "volunteer.shift.offered", "payload": ' + "[" * 1100 + "]" * 1100 + "}"
    status, body = http(nested)
    assert status == 400
    assert [r["reason"] for r in body["results"]] == ["malformed_json"]


def test_https_a_malformed_batch_request_is_400() -> None:
    assert http(json.dumps({"messages": "all of them"}))[0] == 400
    assert http(json.dumps({"messages": []}))[0] == 400
    assert http("!!!not base64!!!", b64=True)[0] == 400


def test_a_batch_request_with_a_field_beside_messages_is_malformed_not_ignored() -> None:
    # A producer who sets "classification" once for the batch meant it for every message;
    # dropped silently, the messages travelled as internal.
    batch = {"messages": [single()], "classification": "restricted"}
    status, body = http(json.dumps(batch))
    assert (status, body["error"]["reason"]) == (400, "malformed_request")
    transport = MemoryTransport()
    response = dispatch(batch, f"{FUNCTION}:community", runtime(transport))
    assert response["error"]["reason"] == "malformed_request"
    assert transport.published == []


def test_https_without_a_verified_identity_is_401() -> None:
    status, body = http(json.dumps(single()), claims={})
    assert status == 401
    assert body["error"]["reason"] == "unauthenticated"


def test_https_an_identity_that_is_no_stakeholder_group_is_403() -> None:
    assert http(json.dumps(single()), claims={"fabric:group": "hackers"})[0] == 403


@pytest.mark.parametrize("claim", [["government"], {"group": "government"}, 7, True])
def test_https_an_identity_claim_that_is_not_a_string_is_403_not_a_crash(claim: Any) -> None:
    status, body = http(json.dumps(single()), claims={"fabric:group": claim})
    assert status == 403
    assert body["error"]["reason"] == "forbidden"


def test_https_a_topic_the_caller_may_not_publish_is_403() -> None:
    status, body = http(json.dumps(single()), claims={"fabric:group": "media"})
    assert status == 403
    assert body["results"][0]["reason"] == "source_not_allowed"


def test_https_too_large_is_413() -> None:
    big = {**single(), "payload": {"blob": "x" * 300_000}}
    assert http(json.dumps(big))[0] == 413
    # Over 4 MiB: base64-encoded (a third larger), the largest body Lambda still hands over.
    status, body = http(b"x" * (4 * 1024 * 1024 + 1), b64=True)
    assert (status, body["error"]["reason"]) == (413, "too_large")
    many = {"messages": [single()] * (MAX_BATCH + 1)}
    assert http(json.dumps(many))[0] == 413


def test_https_the_answer_to_a_batch_of_the_largest_request_fits_a_lambda_response() -> None:
    # Rejection messages that quoted a producer's field names whole made the answer three
    # times the request (JSON escapes each non-ASCII character in six bytes): past Lambda's
    # 6 MB response limit, the call failed and the accepted message's result never arrived.
    odd = {"topic": "donation.received", "payload": 1, "\u00e9" * 120_000: 1}
    body = json.dumps({"messages": [single()] + [odd] * 15}, ensure_ascii=False)
    assert len(body.encode()) <= MAX_REQUEST_BYTES
    request = event("http_single.json")
    request["body"] = body
    response = dispatch(request, FUNCTION, runtime())
    assert response["statusCode"] == 207
    assert len(response["body"]) < 100_000
    results = json.loads(response["body"])["results"]
    assert [r.get("reason") for r in results] == [None] + ["unknown_field"] * 15


def test_https_nothing_stored_is_503_and_never_accepted() -> None:
    request = event("http_single.json")
    response = dispatch(request, FUNCTION, runtime(MemoryTransport(failure=Failure.TIMEOUT)))
    assert response["statusCode"] == 503
    body = json.loads(response["body"])
    assert body["accepted"] == 0
    assert body["results"][0]["reason"] == "unavailable"


def test_https_nothing_stored_is_503_also_when_the_batch_repeats_a_message() -> None:
    # The repeat is a duplicate of a message that could not be stored: nothing was stored, and
    # the answer to retry is the same as for the message alone.
    request = event("http_single.json")
    request["body"] = json.dumps({"messages": [single(), single()]})
    response = dispatch(request, FUNCTION, runtime(MemoryTransport(failure=Failure.TIMEOUT)))
    assert response["statusCode"] == 503
    body = json.loads(response["body"])
    assert [r["reason"] for r in body["results"]] == ["unavailable", "duplicate_message_id"]


def test_https_nothing_stored_is_503_also_beside_messages_refused_for_good() -> None:
    # Nothing was stored, and the outage is why for one of them: 207 read as "done, some
    # refused" to a client that retries on 5xx only, and the storable message was never sent
    # again. The body still says which message was refused for what.
    bad = {**single(), "message_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "priority": "urgent"}
    request = event("http_single.json")
    request["body"] = json.dumps({"messages": [single(), bad]})
    response = dispatch(request, FUNCTION, runtime(MemoryTransport(failure=Failure.TIMEOUT)))
    assert response["statusCode"] == 503
    body = json.loads(response["body"])
    assert [r["reason"] for r in body["results"]] == ["unavailable", "invalid_priority"]
    assert (body["accepted"], body["rejected"]) == (0, 2)


# -- SQS --------------------------------------------------------------------------------------


def test_sqs_rejected_messages_are_final_and_only_unstored_ones_are_retried() -> None:
    records = event("sqs_ingest.json")
    transport = MemoryTransport(fail_ids={"6ecd8c99-4036-403d-bf84-cf8400f67836"})
    response = dispatch(records, FUNCTION, runtime(transport))
    assert response == {"batchItemFailures": [{"itemIdentifier": "m-2"}]}
    (stored,) = transport.published
    assert json.loads(stored.body)["source"] == "business"


def test_sqs_messages_whose_audit_records_were_lost_stay_on_the_queue() -> None:
    # Deleted with their records lost, the refused message would be gone without any trace and
    # the accepted one stored without its audit record or archived body. Kept, each comes back
    # and is routed again with its records (the stored copy is removed by message_id).
    audit, transport = MemoryAuditSink(available=False), MemoryTransport()
    router = Router(
        table=default_routing_table(),
        transports=[transport],
        cipher=LocalCipher(),
        audit=audit,
        environment="test",
    )
    built = RouterRuntime(router=router, settings=runtime().settings)
    response = dispatch(event("sqs_ingest.json"), FUNCTION, built)
    assert response == {"batchItemFailures": [{"itemIdentifier": f"m-{i}"} for i in range(3)]}
    assert len(transport.published) == 2


@pytest.mark.parametrize(
    "body",
    ["{not json", '"a string"', '{"topic": "Bad Topic", "payload": {}}', '{"message_id": "x"}'],
)
def test_sqs_a_refused_message_without_a_readable_id_is_audited_under_its_sqs_id(
    body: str,
) -> None:
    # Deleted from the queue as a final answer, it must stay traceable: its audit record names
    # the SQS message, the id SQS ingest gives a message without one.
    audit = MemoryAuditSink()
    router = Router(
        table=default_routing_table(),
        transports=[MemoryTransport()],
        cipher=LocalCipher(),
        audit=audit,
        environment="test",
    )
    sqs_id = "059f36b4-87a3-44ab-83d2-661975830a7d"
    records = {
        "Records": [
            {
                "messageId": sqs_id,
                "body": body,
                "eventSource": "aws:sqs",
                "eventSourceARN": f"{INGEST}business",
            }
        ]
    }
    built = RouterRuntime(router=router, settings=runtime().settings)
    assert dispatch(records, FUNCTION, built) == {"batchItemFailures": []}
    assert [(r.event, r.message_id) for r in audit.records] == [(AuditEvent.REJECTED, sqs_id)]


def test_sqs_records_from_a_queue_that_is_not_an_ingest_queue_fail_the_batch() -> None:
    records = event("sqs_ingest.json")
    records["Records"][0]["eventSourceARN"] = "arn:aws:sqs:ap-southeast-3:111111111111:other"
    with pytest.raises(ValueError, match="ingest queue"):
        dispatch(records, FUNCTION, runtime())


# -- direct invoke ------------------------------------------------------------------------------


def test_direct_invoke_takes_the_group_from_the_alias() -> None:
    transport = MemoryTransport()
    response = dispatch(event("direct_invoke.json"), f"{FUNCTION}:academic", runtime(transport))
    assert response["accepted"] == 1
    assert json.loads(transport.published[0].body)["source"] == "academic"


def test_direct_invoke_without_a_group_alias_routes_nothing() -> None:
    transport = MemoryTransport()
    response = dispatch(event("direct_invoke.json"), FUNCTION, runtime(transport))
    assert response["error"]["reason"] == "unauthenticated"
    assert transport.published == []


def test_direct_invoke_with_a_malformed_event_says_so() -> None:
    response = dispatch({"message": []}, f"{FUNCTION}:academic", runtime())
    assert response["error"]["reason"] == "malformed_request"
    bad = copy.deepcopy(event("direct_invoke.json"))
    bad["messages"].append({"topic": "research.dataset.synced"})
    response = dispatch(bad, f"{FUNCTION}:academic", runtime())
    assert [r["status"] for r in response["results"]] == ["accepted", "rejected"]


def _incident(**fields: Any) -> dict[str, Any]:
    return {**single(), "message_id": str(uuid.uuid4()), **fields}


BAD_INPUT: list[tuple[Any, str]] = [
    ("", "empty_body"),
    (b"\xc3\x28", "invalid_utf8"),
    ("{nope", "malformed_json"),
    ([1, 2], "not_an_object"),
    ({"payload": {}}, "missing_field"),
    (_incident(priorty="high"), "unknown_field"),
    (_incident(version="fabric.envelope/2"), "unsupported_version"),
    (_incident(headers="not a map"), "invalid_field_type"),
    (_incident(message_id="not-an-id"), "invalid_message_id"),
    (_incident(topic="Child.Safety"), "invalid_topic"),
    (_incident(priority="urgent"), "invalid_priority"),
    (_incident(classification="secret"), "invalid_classification"),
    (_incident(occurred_at="yesterday"), "invalid_timestamp"),
    (_incident(headers={"x-match": "all"}), "invalid_header"),
    (_incident(audience=["aliens"]), "unknown_audience"),
    (_incident(expires_at="2001-01-01T00:00:00Z"), "expired"),
    (_incident(payload={"blob": "x" * 270_000}), "too_large"),
    (_incident(topic="research.dataset.synced", classification="public"), "source_not_allowed"),
    (_incident(audience=["media"]), "audience_not_routable"),
    (_incident(classification="internal"), "classification_too_low"),
]


def test_a_direct_invoke_answer_naming_a_field_with_a_lone_surrogate_can_be_sent() -> None:
    # Lambda's parser turns a "\\ud800" escape in a key into a lone surrogate, and Python 3.12+
    # runtimes encode the answer as UTF-8 (ensure_ascii=False). Before, the unknown field's
    # name went into the detail as it was: the answer could not be encoded, so the call failed
    # after the batch's other message was stored.
    transport = MemoryTransport()
    good = event("direct_invoke.json")["messages"][0]
    bad = {"topic": "research.dataset.synced", "payload": {}, "\ud800": None}
    response = dispatch({"messages": [good, bad]}, f"{FUNCTION}:academic", runtime(transport))
    assert [r["status"] for r in response["results"]] == ["accepted", "rejected"]
    assert response["results"][1]["reason"] == "unknown_field"
    assert "\\ud800" in response["results"][1]["detail"]
    json.dumps(response, ensure_ascii=False).encode("utf-8")  # what the runtime sends


def test_every_reason_code_reaches_the_producer_through_direct_invoke() -> None:
    duplicate = _incident()
    items = [item for item, _ in BAD_INPUT] + [duplicate, duplicate]
    expected = [reason for _, reason in BAD_INPUT] + [None, "duplicate_message_id"]
    transport = MemoryTransport()
    response = dispatch({"messages": items}, f"{FUNCTION}:community", runtime(transport))
    assert [r.get("reason") for r in response["results"]] == expected
    assert [json.loads(m.body)["message_id"] for m in transport.published] == [
        duplicate["message_id"]
    ]


class _KmsDown(LocalCipher):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def encrypt(self, plaintext: bytes, context: Any) -> bytes:
        self.calls += 1
        raise EncryptionUnavailable("kms unreachable")


def keyless(transport: MemoryTransport) -> tuple[RouterRuntime, _KmsDown, MemoryAuditSink]:
    cipher, audit = _KmsDown(), MemoryAuditSink()
    router = Router(
        table=default_routing_table(),
        transports=[transport],
        cipher=cipher,
        audit=audit,
        environment="test",
    )
    return RouterRuntime(router=router, settings=runtime().settings), cipher, audit


def restricted_case() -> dict[str, Any]:
    return {
        "message_id": str(uuid.uuid4()),
        "topic": "case.updated",
        "classification": "restricted",
        "payload": {"child": "canary"},
    }


def test_with_kms_down_a_restricted_message_is_503_unavailable_audited_and_not_stored() -> None:
    transport = MemoryTransport()
    built, _cipher, audit = keyless(transport)
    request = event("http_single.json")
    message = restricted_case()
    request["body"] = json.dumps(message)
    request["requestContext"]["authorizer"]["jwt"]["claims"]["fabric:group"] = "government"

    response = dispatch(request, FUNCTION, built)

    assert response["statusCode"] == 503
    (result,) = json.loads(response["body"])["results"]
    assert (result["message_id"], result["reason"]) == (message["message_id"], "unavailable")
    assert "retry later" in result["detail"]
    assert transport.published == []
    assert [(r.event.value, r.message_id, r.reason) for r in audit.records] == [
        ("rejected", message["message_id"], "unavailable")
    ]


def test_with_kms_down_the_rest_of_an_sqs_batch_goes_on_and_only_restricted_ones_retry() -> None:
    transport = MemoryTransport()
    built, cipher, audit = keyless(transport)
    alert = {
        "message_id": str(uuid.uuid4()),
        "topic": "child-safety.alert.public",
        "priority": "emergency",
        "payload": {"alert": "missing child"},
    }
    bodies = [restricted_case(), alert, "{broken", restricted_case()]
    queue = "arn:aws:sqs:ap-southeast-3:111111111111:fabric-dev-ingest-government"
    records = [
        {
            "messageId": f"m-{i}",
            "body": body if isinstance(body, str) else json.dumps(body),
            "eventSource": "aws:sqs",
            "eventSourceARN": queue,
        }
        for i, body in enumerate(bodies)
    ]

    response = dispatch({"Records": records}, FUNCTION, built)

    assert response == {"batchItemFailures": [{"itemIdentifier": "m-0"}, {"itemIdentifier": "m-3"}]}
    assert [json.loads(m.body)["message_id"] for m in transport.published] == [alert["message_id"]]
    assert cipher.calls == 1  # the key service is not asked again within the call
    assert sorted(r.event.value for r in audit.records) == [
        "accepted",
        "rejected",
        "rejected",
        "rejected",
        "routed",
    ]


@pytest.mark.parametrize("payload", [[{"topic": "a"}], "messages", 42, None])
def test_a_direct_invoke_payload_that_is_not_an_object_is_a_malformed_request(
    payload: Any,
) -> None:
    transport = MemoryTransport()
    response = dispatch(payload, f"{FUNCTION}:community", runtime(transport))
    assert response["error"]["reason"] == "malformed_request"
    assert transport.published == []


def test_input_that_used_to_crash_validation_gets_reason_codes_and_the_batch_goes_on() -> None:
    transport = MemoryTransport()
    good = {"message_id": str(uuid.uuid4()), "topic": "donation.received", "payload": 1}
    items = [
        {"topic": "donation.received", "payload": 1, "occurred_at": "0001-01-01T00:00:00+01:00"},
        '{"topic": "donation.received", "payload": 1, "correlation_id": "\\ud800"}',
        '{"topic": "\ud800"}',
        good,
    ]
    response = dispatch({"messages": items}, f"{FUNCTION}:business", runtime(transport))
    assert [r.get("reason") for r in response["results"]] == [
        "invalid_timestamp",
        "malformed_json",
        "invalid_utf8",
        None,
    ]
    assert [json.loads(m.body)["message_id"] for m in transport.published] == [good["message_id"]]


INGEST = "arn:aws:sqs:ap-southeast-3:111111111111:fabric-dev-ingest-"


def test_an_event_shaped_like_https_or_sqs_sent_to_a_groups_alias_cannot_choose_its_group() -> None:
    # A media producer may invoke only the media alias. The shape of what it sends must not let
    # it speak for government: a JWT claim or an ingest queue in the event is not an identity.
    transport = MemoryTransport()
    built = runtime(transport)
    case = json.dumps({"topic": "case.opened", "classification": "restricted", "payload": {}})
    as_https = event("http_single.json")
    as_https["body"] = case
    as_https["requestContext"]["authorizer"]["jwt"]["claims"]["fabric:group"] = "government"
    as_sqs = {
        "Records": [
            {
                "messageId": "m-0",
                "body": case,
                "eventSource": "aws:sqs",
                "eventSourceARN": f"{INGEST}government",
            }
        ]
    }

    answers = [dispatch(forged, f"{FUNCTION}:media", built) for forged in (as_https, as_sqs)]

    assert [a["error"]["reason"] for a in answers] == ["malformed_request"] * 2
    assert transport.published == []


class _StoredButUnconfirmed(MemoryTransport):
    """The broker stores the first call's messages, but their confirms never arrive."""

    def publish(self, messages: Any, *, meanwhile: Any = None) -> list[Outcome]:
        outcomes = super().publish(messages, meanwhile=meanwhile)
        if len(self.published) > len(outcomes):  # a later call: confirmed
            return outcomes
        return [Outcome(o.message_id, failure=Failure.TIMEOUT) for o in outcomes]


def test_sqs_a_message_without_an_id_keeps_one_id_across_its_redeliveries() -> None:
    # A confirm timeout leaves a message's fate unknown: the broker may have stored it, and SQS
    # delivers it again. Given a new random id each time, the copies could not be told apart by
    # the consumers, who remove duplicates by message_id; the SQS message id stays the same.
    transport = _StoredButUnconfirmed()
    built = runtime(transport)
    sqs_id = "059f36b4-87a3-44ab-83d2-661975830a7d"
    body = json.dumps({"topic": "donation.received", "payload": {"amount": 1}})
    records = {
        "Records": [
            {
                "messageId": sqs_id,
                "body": body,
                "eventSource": "aws:sqs",
                "eventSourceARN": f"{INGEST}business",
            }
        ]
    }
    first = dispatch(records, FUNCTION, built)
    assert first == {"batchItemFailures": [{"itemIdentifier": sqs_id}]}
    assert dispatch(records, FUNCTION, built) == {"batchItemFailures": []}
    ids = [json.loads(m.body)["message_id"] for m in transport.published]
    assert ids == [sqs_id, sqs_id]


def test_sqs_a_message_with_its_own_id_keeps_it() -> None:
    transport = MemoryTransport()
    records = event("sqs_ingest.json")
    records["Records"][0]["messageId"] = "059f36b4-87a3-44ab-83d2-661975830a7d"
    dispatch(records, FUNCTION, runtime(transport))
    assert json.loads(transport.published[0].body)["message_id"] == (
        "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
    )


# -- requests refused as a whole: one audit record each ---------------------------------------

CANARY = "CANARY-child-name-Siti-Rahayu"


def audited() -> tuple[RouterRuntime, MemoryTransport, MemoryAuditSink]:
    transport, audit = MemoryTransport(), MemoryAuditSink()
    router = Router(
        table=default_routing_table(),
        transports=[transport],
        cipher=LocalCipher(),
        audit=audit,
        environment="test",
    )
    return RouterRuntime(router=router, settings=runtime().settings), transport, audit


def _canary_case() -> dict[str, Any]:
    return {**single(), "message_id": str(uuid.uuid4()), "payload": {"child": CANARY}}


def _the_refusal(audit: MemoryAuditSink, *, reason: str, source: str) -> None:
    """Exactly one record: rejected, for the request (no message id, no topic), its reason,
    the group (or the marker), and nothing of the body, not even its hash (a hash of child data
    would let a reader of the trail confirm a guess at it)."""
    (record,) = audit.records
    assert (record.event, record.message_id, record.topic) == (AuditEvent.REJECTED, None, None)
    assert (record.reason, record.source, record.body_sha256) == (reason, source, None)
    assert audit.bodies == {}
    assert CANARY.encode() not in record.encoded()
    assert b"secret-token" not in record.encoded()


def _direct_refusal(payload: Any, arn: str, *, reason: str, source: str) -> None:
    built, transport, audit = audited()
    response = dispatch(payload, arn, built)
    assert response["error"]["reason"] == reason
    assert transport.published == []
    _the_refusal(audit, reason=reason, source=source)


def test_a_direct_invoke_without_a_group_alias_is_audited_as_unauthenticated() -> None:
    payload = {"messages": [_canary_case()]}
    _direct_refusal(payload, FUNCTION, reason="unauthenticated", source="unauthenticated")
    _direct_refusal(
        payload, f"{FUNCTION}:$LATEST", reason="unauthenticated", source="unauthenticated"
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"message": [{"child": CANARY}]},
        {"messages": []},
        {"messages": "all of them"},
        [{"topic": "a", "payload": CANARY}],
        CANARY,
        None,
    ],
)
def test_a_malformed_direct_invoke_is_audited_once_under_its_group(payload: Any) -> None:
    _direct_refusal(payload, f"{FUNCTION}:academic", reason="malformed_request", source="academic")


def test_a_direct_invoke_of_too_many_messages_is_audited_once_as_too_large() -> None:
    payload = {"messages": [_canary_case() for _ in range(MAX_BATCH + 1)]}
    _direct_refusal(payload, f"{FUNCTION}:community", reason="too_large", source="community")


def _http_refusal(
    body: str,
    *,
    b64: bool = False,
    claims: dict[str, Any] | None = None,
    status: int,
    reason: str,
    source: str,
) -> None:
    built, transport, audit = audited()
    request = event("http_single.json")
    request["body"] = body
    request["isBase64Encoded"] = b64
    request["headers"]["authorization"] = "Bearer secret-token"
    if claims is not None:
        request["requestContext"]["authorizer"]["jwt"]["claims"] = claims
    response = dispatch(request, FUNCTION, built)
    assert response["statusCode"] == status
    assert json.loads(response["body"])["error"]["reason"] == reason
    assert transport.published == []
    _the_refusal(audit, reason=reason, source=source)


def test_an_https_request_without_identity_is_audited_as_unauthenticated() -> None:
    body = json.dumps(_canary_case())
    _http_refusal(
        body,
        claims={},
        status=401,
        reason="unauthenticated",
        source="unauthenticated",
    )


@pytest.mark.parametrize("claim", ["hackers", ["government"], 7])
def test_an_https_identity_that_is_no_group_is_audited_without_the_claim(claim: Any) -> None:
    raw = json.dumps(_canary_case()).encode()
    _http_refusal(
        base64.b64encode(raw).decode(),
        b64=True,
        claims={"fabric:group": claim},
        status=403,
        reason="forbidden",
        source="unauthenticated",
    )


def test_an_https_body_that_is_not_base64_is_audited_under_its_group() -> None:
    body = f"!!!{CANARY}!!!"
    _http_refusal(
        body,
        b64=True,
        status=400,
        reason="malformed_request",
        source="community",
    )


def test_an_https_body_over_4_mib_is_audited_as_too_large() -> None:
    raw = CANARY.encode() * (MAX_REQUEST_BYTES // len(CANARY) + 1)
    _http_refusal(
        base64.b64encode(raw).decode(),
        b64=True,
        status=413,
        reason="too_large",
        source="community",
    )


@pytest.mark.parametrize(
    ("batch", "status", "reason"),
    [
        ({"messages": CANARY}, 400, "malformed_request"),
        ({"messages": []}, 400, "malformed_request"),
        ({"messages": [{"payload": CANARY}] * (MAX_BATCH + 1)}, 413, "too_large"),
    ],
)
def test_a_malformed_https_batch_is_audited_once(
    batch: dict[str, Any], status: int, reason: str
) -> None:
    body = json.dumps(batch)
    _http_refusal(body, status=status, reason=reason, source="community")


def test_a_refused_request_whose_record_is_lost_still_gets_its_answer_and_is_counted() -> None:
    audit, sink = MemoryAuditSink(available=False), MemoryMetrics()
    router = Router(
        table=default_routing_table(),
        transports=[MemoryTransport()],
        cipher=LocalCipher(),
        audit=audit,
        environment="test",
        metrics=sink,
    )
    built = RouterRuntime(router=router, settings=runtime().settings)
    response = dispatch({"messages": []}, f"{FUNCTION}:media", built)
    assert response["error"]["reason"] == "malformed_request"
    assert sink.totals == {metrics.AUDIT_RECORDS_LOST: 1}


def test_a_routed_request_leaves_no_request_level_record() -> None:
    built, _transport, audit = audited()
    dispatch(event("direct_invoke.json"), f"{FUNCTION}:academic", built)
    assert [r.event for r in audit.records] == [AuditEvent.ACCEPTED, AuditEvent.ROUTED]
    assert all(r.message_id is not None for r in audit.records)
