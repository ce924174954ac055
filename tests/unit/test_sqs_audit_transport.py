"""The SQS audit path: each audit part one SendMessage, in order, within the call's budget."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError

from fabric.adapters import sqs_audit
from fabric.adapters.sns import MESSAGE_ID_ATTRIBUTE
from fabric.adapters.sqs_audit import SqsAuditTransport
from fabric.audit_sink import AUDIT_TOPIC
from fabric.ports import Failure, MessageKind, OutboundMessage
from fabric.stakeholders import Stakeholder

QUEUE = "https://sqs.ap-southeast-3.amazonaws.com/111111111111/fabric-test-audit"


def part() -> OutboundMessage:
    message_id = str(uuid.uuid4())
    body = f'{{"batch": "{message_id}"}}'.encode()
    return OutboundMessage(message_id, AUDIT_TOPIC, body, frozenset(), kind=MessageKind.AUDIT)


class Sqs:
    """A client that stores what it is sent in ``sent``; the ids in ``refuse`` are refused,
    and a request for an id in ``hang`` waits until ``release`` is set (at most 2 s)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.refuse: set[str] = set()
        self.hang: set[str] = set()
        self.release = threading.Event()

    def send_message(self, **request: Any) -> dict[str, str]:
        message_id = request["MessageAttributes"][MESSAGE_ID_ATTRIBUTE]["StringValue"]
        if message_id in self.hang:
            self.release.wait(timeout=2)
        if message_id in self.refuse:
            raise ClientError({"Error": {"Code": "InternalError"}}, "SendMessage")
        self.sent.append(request)
        return {"MessageId": "x"}


def test_each_part_is_one_message_with_its_id_and_the_outcomes_keep_their_order() -> None:
    sqs = Sqs()
    parts = [part() for _ in range(3)]
    not_audit = OutboundMessage("m1", "t.x", b"{}", frozenset({Stakeholder.GOVERNMENT}))
    sqs.refuse.add(parts[1].message_id)

    outcomes = SqsAuditTransport(QUEUE, lambda: sqs).publish([parts[0], not_audit, *parts[1:]])

    assert [o.message_id for o in outcomes] == [parts[0].message_id, "m1"] + [
        p.message_id for p in parts[1:]
    ]
    assert [o.transport for o in outcomes] == ["sqs-audit", None, None, "sqs-audit"]
    assert [o.failure for o in outcomes] == [None, Failure.UNAVAILABLE, Failure.UNAVAILABLE, None]
    assert [r["MessageBody"].encode() for r in sqs.sent] == [parts[0].body, parts[2].body]
    assert {r["QueueUrl"] for r in sqs.sent} == {QUEUE}


def test_past_the_budget_the_part_in_flight_is_given_up_on_and_the_rest_are_not_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sqs_audit, "PUBLISH_BUDGET_S", 0.2)
    sqs = Sqs()
    parts = [part() for _ in range(4)]
    sqs.hang.add(parts[1].message_id)
    try:
        outcomes = SqsAuditTransport(QUEUE, lambda: sqs).publish(parts)
    finally:
        sqs.release.set()

    assert [o.stored for o in outcomes] == [True, False, False, False]
    assert {o.failure for o in outcomes[1:]} == {Failure.UNAVAILABLE}
    # The abandoned request ends on its own (here: stored late); the last two were never sent.
    sent = {r["MessageAttributes"][MESSAGE_ID_ATTRIBUTE]["StringValue"] for r in sqs.sent}
    assert sent <= {parts[0].message_id, parts[1].message_id}
