"""An SQS that answers slowly or not at all no longer takes a redrive run past the function's
timeout (moto's SQS over HTTP; the client as ``build_redrive`` wires it).

A run's sends stop at its time limit, however many its batch has left (one a letter over 128
KiB); after SQS does not answer a visibility change or a delete (the SDK's 3 attempts: 15 to 20
s), the run makes no more of them: held letters come back by themselves after their hold (the
report counts them, ``hidden``), letters not deleted are removed by the next run (the ledger
knows them), and the run stops ``dead-letter queue unavailable``. An SQS that does not answer
is played by one that drops the connection: the same errors for the client, without the wait.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.redrive import RedrivePlan, Redriver
from tests.message_ids import msg_id
from tests.unit.test_redrive_sqs_client import (
    Faults,
    _dead_letter_queue,
    _parked,
    _redrive,
    sqs,  # noqa: F401 (a fixture)
)

LARGE = 12
PAD = 200_000  # bytes: one such letter to a request (SQS takes 256 KiB a request)


def _counts(client: Any, url: str) -> tuple[int, int]:
    """How many messages ``url`` holds: visible, and hidden (held by a receive)."""
    attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


def test_slow_sends_stop_at_the_runs_time_limit(
    sqs: tuple[Any, Faults],  # noqa: F811
) -> None:
    client, faults = sqs
    queue, _ = _parked(client, 0)
    for i in range(LARGE):
        body = {"message_id": msg_id(f"large-{i}"), "topic": "media.story.published"}
        client.send_message(
            QueueUrl=queue.dlq_url, MessageBody=json.dumps(body | {"pad": "x" * PAD})
        )
    faults.late_s = 2.5  # each send answered, within the client's 5 s: none in doubt
    audit = MemoryAuditSink()

    started = time.monotonic()
    report = Redriver(ledger=MemoryRedriveLedger(), audit=audit).run(
        _dead_letter_queue(queue), RedrivePlan(max_seconds=3)
    )
    took = time.monotonic() - started

    # Before: every send of the batch, 12 x 2.5 s (31 s; a batch of 100 such letters begun at
    # 839 s of the function's 900 went on for 4 minutes more, and was killed with each letter
    # sent so far at its source without a record).
    sends = faults.calls["SendMessageBatch"]
    assert sends <= 2, sends
    assert took < 15, took
    assert (report.moved, report.stopped) == (sends, "time limit")
    assert len(audit.records) == report.moved, "each letter at its source has its record"
    assert _counts(client, queue.source_url) == (report.moved, 0)
    assert _counts(client, queue.dlq_url) == (LARGE - report.moved, 0), "the rest given back"


def test_showing_held_letters_again_stops_at_the_first_batch_sqs_does_not_answer(
    sqs: tuple[Any, Faults],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, faults = sqs
    queue, _ = _parked(client, 30)
    faults.failed_sends = 1  # the send in doubt ends the run, holding its 30 letters
    faults.dropped_visibility_changes = 100  # SQS answers no visibility change

    with caplog.at_level(logging.WARNING, logger="fabric.adapters.sqs_dlq"):
        report = _redrive(queue, MemoryAuditSink())

    # Before: every batch of 10 held letters, 3 attempts each (9 calls here; silent, 15 to 20 s
    # a batch: a filtered run holding 1000 letters went on for 25 minutes).
    assert (report.moved, report.stopped, report.hidden) == (0, "origin unavailable", 30)
    assert faults.calls["ChangeMessageVisibilityBatch"] == 3, "one batch, the SDK's 3 attempts"
    assert f"30 letter(s) of {queue.name}-dlq reappear by themselves only after 960s" in (
        caplog.text
    )
    assert _counts(client, queue.dlq_url) == (0, 30), "held until their hold ends"


def test_deleting_stops_at_the_first_batch_sqs_does_not_answer(
    sqs: tuple[Any, Faults],  # noqa: F811
) -> None:
    client, faults = sqs
    queue, _ = _parked(client, 30)
    faults.dropped_deletes = 100  # SQS answers no delete
    audit = MemoryAuditSink()

    report = _redrive(queue, audit)

    # Before: every batch of 10 moved letters, 3 attempts each (9 calls here; silent, 15 to 20 s
    # a batch, 10 batches for a batch of 100 letters).
    assert faults.calls["DeleteMessageBatch"] == 3, "one batch, the SDK's 3 attempts"
    assert (report.moved, len(audit.records)) == (30, 30)
    assert report.stopped == "dead-letter queue unavailable"
    assert _counts(client, queue.source_url) == (30, 0)
    assert _counts(client, queue.dlq_url) == (30, 0), "not deleted: given back, moved already"
