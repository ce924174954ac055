"""Redrive review: a message dead-lettered afresh after an earlier redrive, on an in-memory DLQ."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.audit import AuditEvent
from fabric.redrive import Redriver
from tests.message_ids import msg_id
from tests.unit.test_redrive_runs import NOW, Clock, MemoryDeadLetterQueue, letter


def test_a_message_dead_lettered_afresh_after_a_redrive_is_moved_not_dropped() -> None:
    # m-1 was dead-lettered and redriven (ledger: redrive count 0). Weeks later the same message
    # comes again without the redrive counter (a replay, or its producer sending it again: the
    # message id is the producer's) and is dead-lettered again: redrive count 0 once more, but
    # a new dead-lettering. Before, the ledger took it for the letter already moved, and the run
    # removed it from the DLQ without putting it back: the message was gone.
    ledger, audit = MemoryRedriveLedger(), MemoryAuditSink()
    run = Redriver(ledger=ledger, audit=audit, clock=Clock(), sleep=Clock().sleep, now=lambda: NOW)
    first = letter(1, age_s=30 * 86400)
    assert run.run(MemoryDeadLetterQueue([first])).moved == 1

    again = dataclasses.replace(
        first, handle="7", dead_lettered_at=NOW - timedelta(seconds=60)
    )  # same id, same redrive count (0), dead-lettered a month later
    queue = MemoryDeadLetterQueue([again])
    report = run.run(queue)

    assert (report.moved, report.already_moved) == (1, 0)
    assert [item.message_id for item in queue.origin] == [msg_id("m-1")]
    assert [r.message_id for r in audit.records if r.event is AuditEvent.REDRIVEN] == [
        msg_id("m-1")
    ] * 2


def test_a_moved_letter_whose_removal_was_lost_is_only_removed_by_the_next_run() -> None:
    # The exactly-once case the ledger is for: the same dead-lettering read again.
    ledger = MemoryRedriveLedger()
    run = Redriver(
        ledger=ledger, audit=MemoryAuditSink(), clock=Clock(), sleep=Clock().sleep, now=lambda: NOW
    )
    moved = letter(1)
    run.run(MemoryDeadLetterQueue([moved]))

    queue = MemoryDeadLetterQueue([dataclasses.replace(moved, handle="9")])
    report = run.run(queue)

    assert (report.moved, report.already_moved) == (0, 1)
    assert queue.origin == []
    assert queue.letters == []
