"""A redrive command on an SQS dead-letter queue that fails one batch of deletes or of visibility
changes with an error it answers with (an internal error, throttling: the SDK's 3 attempts), not
by going silent: the command says what it left behind and how to go on (moto's SQS over HTTP,
the runbook invoking the real ``Redriver`` in-process, one ledger for all its runs).

Before, such a batch ended the call as a silent SQS does: every letter after it was left too,
and the command exited 0. Letters not deleted (the whole batch of 30 moved) stayed in the DLQ,
``stopped: empty``; held letters not shown again (the first chunk's) stayed hidden for their 16
minutes, the next chunk met none of them and ended ``empty``.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.audit import AuditEvent
from fabric.redrive import Redriver, parse_request
from fabric.settings import SqsDeadLetterQueue as QueueSettings
from scripts import runbook
from tests.unit.test_redrive_sqs_client import (
    Faults,
    _parked,
    sqs,  # noqa: F401 (a fixture)
)
from tests.unit.test_redrive_sqs_deadline import _counts, _dead_letter_queue


class RedriveFunction:
    """Lambda's invoke of the redrive function, run here on the SQS DLQ as deployed."""

    def __init__(self, queue: QueueSettings) -> None:
        self.queue = queue
        self.ledger, self.audit = MemoryRedriveLedger(), MemoryAuditSink()
        self.invocations = 0

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
        self.invocations += 1
        plan = parse_request(json.loads(Payload)).plan
        report = Redriver(ledger=self.ledger, audit=self.audit).run(
            _dead_letter_queue(self.queue), plan
        )
        return {"Payload": io.BytesIO(json.dumps(report.to_dict()).encode())}

    def moves(self) -> Counter[str]:
        """How often each message was put back (its ``redriven`` records)."""
        return Counter(r.message_id for r in self.audit.records if r.event is AuditEvent.REDRIVEN)


def command(function: RedriveFunction, *, chunk: int, **request: Any) -> tuple[int, str]:
    out = io.StringIO()
    status = runbook.redrive(
        "prod",
        client={"lambda": function}.__getitem__,
        request={"source": "sqs", "queue": f"{function.queue.name}-dlq", **request},
        chunk=chunk,
        out=out,
    )
    return status, out.getvalue()


def test_one_failed_delete_batch_leaves_its_letters_only_and_the_command_says_to_go_on(
    sqs: tuple[Any, Faults],  # noqa: F811
) -> None:
    client, faults = sqs
    queue, _ = _parked(client, 30)
    faults.failed_deletes = 3  # the first batch of deletes: an error, in each of its 3 attempts
    function = RedriveFunction(queue)

    status, output = command(function, chunk=500)

    assert faults.calls["DeleteMessageBatch"] == 5, "the failed batch's 3 attempts, then 2 more"
    assert _counts(client, queue.dlq_url) == (10, 0), "the failed batch's letters only"
    assert _counts(client, queue.source_url) == (30, 0)
    assert status == 1, output
    assert "summary: moved 30, stopped: dead-letter queue unavailable" in output
    redrive_id = output.split()[1]
    assert output.splitlines()[-1] == (
        f"go on as the same redrive with the same command and: --redrive-id {redrive_id}"
    )

    status, output = command(function, chunk=500, redrive_id=redrive_id)

    assert status == 0, output
    assert "(10 left over from an earlier run removed)" in output
    assert "summary: moved 0, stopped: empty" in output
    assert _counts(client, queue.dlq_url) == (0, 0)
    assert _counts(client, queue.source_url) == (30, 0), "none put back twice"
    assert Counter(function.moves().values()) == {1: 30}


def test_one_failed_visibility_batch_hides_its_letters_only_and_the_command_says_so(
    sqs: tuple[Any, Faults],  # noqa: F811
) -> None:
    client, faults = sqs
    queue, _ = _parked(client, 25)
    # The first chunk moves 10 and gives back the 15 it holds, 10 and 5: the first batch fails.
    faults.failed_visibility_changes = 3
    function = RedriveFunction(queue)

    status, output = command(function, chunk=10)

    assert faults.calls["ChangeMessageVisibilityBatch"] == 4, "3 attempts, then the next batch"
    assert function.invocations == 2
    assert _counts(client, queue.dlq_url) == (0, 10), "10 hidden until their hold ends"
    assert _counts(client, queue.source_url) == (15, 0)
    assert status == 1, output
    dlq = f"{queue.name}-dlq"
    assert (
        f"10 letter(s) stay hidden in {dlq} until their hold ends (16 minutes): the DLQ did not"
        " show them again after a chunk, so the chunks after it did not see them."
    ) in output
    assert "summary: moved 15, stopped: empty" in output
    assert output.splitlines()[-1].startswith("go on as the same redrive with the same command")


def test_a_dry_run_says_which_letters_it_left_hidden(
    sqs: tuple[Any, Faults],  # noqa: F811
) -> None:
    client, faults = sqs
    queue, _ = _parked(client, 15)
    faults.failed_visibility_changes = 3  # the first of its two batches of letters to show again
    function = RedriveFunction(queue)

    status, output = command(function, chunk=500, dry_run=True)

    assert status == 0, output
    assert f"dry run on {queue.name}-dlq: 15 of 15 match" in output
    assert (
        f"10 letter(s) this dry run looked at stay hidden in {queue.name}-dlq until their hold"
        " ends (16 minutes)"
    ) in output
    assert _counts(client, queue.dlq_url) == (5, 10)
