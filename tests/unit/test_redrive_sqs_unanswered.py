"""The redrive of an SQS dead-letter queue whose SendMessageBatch goes unanswered (moto's SQS over
HTTP, answering after the redrive's client gave up; the client as ``build_redrive`` wires it).

Large letters travel one to a request (SQS takes 256 KiB a request), so a batch of 100 letters
may be 100 sends. The first send not answered ends the batch: one request in doubt, one read
timeout, and the run stops ``origin unavailable``. Before, the run went on sending: 6 s a send,
past the function's timeout for a batch begun late, and each send one more stored at the source
without a record.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest

from fabric.adapters import sqs_dlq
from fabric.adapters.memory import MemoryAuditSink
from fabric.settings import SqsDeadLetterQueue as QueueSettings
from tests.message_ids import msg_id
from tests.unit.test_redrive_sqs_client import (
    Faults,
    _bodies,
    _parked,
    _redrive,
    sqs,  # noqa: F401 (a fixture)
    timeouts_divided,
)

LETTERS = 3
SCALE = 2.0  # the clients' timeouts and SQS's lateness, divided by this
PAD = 200_000  # bytes: two such letters do not fit one request


def _large_letters(client: Any) -> tuple[QueueSettings, list[str]]:
    """A source queue and its DLQ holding ``LETTERS`` dead letters of about 200 KB each."""
    queue, _ = _parked(client, 0)
    bodies = [
        json.dumps(
            {"message_id": msg_id(f"big-{i}"), "topic": "media.story.published", "pad": "x" * PAD}
        )
        for i in range(LETTERS)
    ]
    for body in bodies:
        client.send_message(QueueUrl=queue.dlq_url, MessageBody=body)
    return queue, bodies


def test_the_first_send_not_answered_ends_the_batch(
    sqs: tuple[Any, Faults],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, faults = sqs
    queue, bodies = _large_letters(client)
    # Every timeout halved, and the lateness and the time the run may take with them, to keep
    # the test short.
    timeouts_divided(monkeypatch, SCALE)
    monkeypatch.setattr(sqs_dlq, "_RECEIVE_WAIT_S", 0)  # moto has no letter a poll misses
    # Past the redrive client's 5 s read timeout: never answered in time.
    faults.late_s = 6.0 / SCALE
    audit = MemoryAuditSink()

    started = time.monotonic()
    report = _redrive(queue, audit)
    took = (time.monotonic() - started) * SCALE  # as with the deployed timeouts

    # Before: a send for each letter, each given up on after 5 s (about 18 s, and for a batch
    # of 100 such letters 10 minutes), every letter stored at its source without a record.
    assert faults.calls["SendMessageBatch"] == 1
    assert took < 12, took
    assert (report.moved, report.stopped) == (0, "origin unavailable")
    assert audit.records == []
    assert _visible(client, queue.source_url) == 1  # SQS stored the one send in doubt only
    assert _visible(client, queue.dlq_url) == LETTERS  # every letter given back at the end

    # The next run puts every letter back, the one in doubt a second time: never a loss.
    faults.late_s = 0.0
    again = _redrive(queue, audit)

    assert (again.moved, again.stopped) == (LETTERS, "empty")
    assert len(audit.records) == LETTERS
    at_source = Counter(_bodies(client, queue.source_url))
    assert set(at_source) == set(bodies)
    assert sorted(at_source.values()) == [1] * (LETTERS - 1) + [2]
    assert _bodies(client, queue.dlq_url) == []


def _visible(client: Any, url: str) -> int:
    """How many messages ``url`` holds that a receive would get now (none hidden)."""
    attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"
    return int(attributes["ApproximateNumberOfMessages"])


def test_a_send_answered_with_an_error_of_sqs_own_ends_the_batch_too(
    sqs: tuple[Any, Faults],  # noqa: F811
) -> None:
    client, faults = sqs
    queue, _ = _large_letters(client)
    faults.failed_sends = 1  # SQS stored the first send, then answered 500: in doubt

    report = _redrive(queue, MemoryAuditSink())

    # Before: the other two letters were sent (and stored) too, then counted not moved.
    assert faults.calls["SendMessageBatch"] == 1
    assert (report.moved, report.stopped) == (0, "origin unavailable")
    assert _visible(client, queue.source_url) == 1
    assert _visible(client, queue.dlq_url) == LETTERS
