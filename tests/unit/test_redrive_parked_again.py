"""One redrive in several runs (the runbook's chunks): a message it moved that is dead-lettered
again is moved once, counted as parked again and left in the DLQ; another dead-lettering of the
same message goes back too. On an in-memory DLQ whose consumer parks what comes back at once."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.audit import AuditEvent
from fabric.ports import DeadLetter
from fabric.redrive import (
    PARKED_AGAIN_STAYS,
    REDRIVE_ID_HEADER,
    RedriveFilter,
    RedrivePlan,
    Redriver,
    parse_request,
)
from tests.message_ids import msg_id
from tests.unit.test_redrive_runs import (
    NOW,
    Clock,
    MemoryDeadLetterQueue,
    ReparkingDeadLetterQueue,
    letter,
)


def redriver(audit: MemoryAuditSink) -> Redriver:
    clock = Clock()
    return Redriver(
        ledger=MemoryRedriveLedger(), audit=audit, clock=clock, sleep=clock.sleep, now=lambda: NOW
    )


def test_the_chunks_of_one_redrive_move_each_poison_message_once_and_count_it_parked_again() -> (
    None
):
    # The runbook's defaults (--max-messages 1000 --chunk 500) on a DLQ of 501+ poison letters,
    # scaled down: 8 letters, chunks of 5. Before, each chunk was a run of its own: the next
    # chunk met the copies the consumer parked again and moved them again, each of the 8 five
    # times, 40 "redriven" records, and every chunk reported only moves.
    queue = ReparkingDeadLetterQueue([letter(i) for i in range(8)])
    audit = MemoryAuditSink()
    run = redriver(audit)

    reports = [run.run(queue, RedrivePlan(max_messages=5, redrive_id="cmd-1")) for _ in range(8)]

    assert Counter(item.message_id for item in queue.origin) == {
        msg_id(f"m-{i}"): 1 for i in range(8)
    }, "each message moved once"
    assert len([r for r in audit.records if r.event is AuditEvent.REDRIVEN]) == 8
    assert [(r.moved, r.parked_again, r.stopped) for r in reports[:3]] == [
        (5, 0, "message limit"),
        (3, 8, "parked again"),  # the 5 of the first chunk, and its own 3 at the tail
        (0, 8, "parked again"),
    ]
    assert len(queue.letters) == 8, "the copies parked again stay in the DLQ"
    assert {item.headers[REDRIVE_ID_HEADER] for item in queue.origin} == {"cmd-1"}


def test_letters_parked_again_are_counted_whatever_the_filter() -> None:
    # Parked again, a letter says "poison" where it said "rejected": still this redrive's.
    queue = ReparkingDeadLetterQueue([letter(1), letter(2)])
    plan = RedrivePlan(selection=RedriveFilter(reasons=frozenset({"rejected"})), redrive_id="r")
    run = redriver(MemoryAuditSink())

    first = run.run(queue, dataclasses.replace(plan, max_messages=1))
    second = run.run(queue, plan)

    assert (first.moved, second.moved, second.parked_again) == (1, 1, 2)
    assert second.stopped == "parked again"


def test_a_letter_another_redrive_put_back_moves_again_with_this_redrives_mark() -> None:
    earlier = dataclasses.replace(letter(1), headers={REDRIVE_ID_HEADER: "last-week", "k": "v"})
    queue = MemoryDeadLetterQueue([earlier])

    report = redriver(MemoryAuditSink()).run(queue, RedrivePlan(redrive_id="today"))

    assert (report.moved, report.parked_again, report.stopped) == (1, 0, "empty")
    (back,) = queue.origin
    assert back.headers == {REDRIVE_ID_HEADER: "today", "k": "v"}


def test_another_dead_lettering_of_a_moved_message_goes_back_too_in_a_later_batch() -> None:
    # A consumer that parked a message and died before its acknowledgement parks it again with
    # a later time: both go back (docs/dead-letters.md). Before, a copy more than a batch (100
    # letters) behind the first was skipped as "already taken", counted nowhere, and the run
    # reported "empty" with it still in the DLQ.
    first = letter(1, age_s=300)
    again = dataclasses.replace(letter(1, age_s=100), handle="again")
    queue = MemoryDeadLetterQueue([first, *(letter(i) for i in range(2, 122)), again])

    report = redriver(MemoryAuditSink()).run(queue)

    assert (report.moved, report.parked_again, report.stopped) == (122, 0, "empty")
    assert [item.handle for item in queue.origin].count("again") == 1
    assert queue.letters == []


class UnmarkingDeadLetterQueue(MemoryDeadLetterQueue):
    """Parks what comes back at once, as a new dead-lettering (now), without the redrive's mark:
    an SQS message with no room left for it."""

    def move(
        self, letters: Sequence[DeadLetter], *, budget_s: float | None = None
    ) -> list[DeadLetter]:
        moved = super().move(letters, budget_s=budget_s)
        for item in moved:
            headers = {k: v for k, v in item.headers.items() if k != REDRIVE_ID_HEADER}
            self.letters.append(
                dataclasses.replace(
                    item, handle=f"{item.handle}+", headers=headers, dead_lettered_at=NOW
                )
            )
        return moved


def test_a_copy_that_comes_back_unmarked_is_still_known_within_the_run() -> None:
    queue = UnmarkingDeadLetterQueue([letter(i) for i in range(150)])

    report = redriver(MemoryAuditSink()).run(queue, RedrivePlan(max_messages=1000))

    assert (report.moved, report.parked_again, report.stopped) == (150, 150, "parked again")
    assert len(queue.origin) == 150


def test_an_unmarked_copy_dead_lettered_in_the_second_before_the_move_counts_as_parked_again() -> (
    None
):
    # Times are whole seconds: the same second as the move cannot tell before from after.
    queue = UnmarkingDeadLetterQueue([letter(i) for i in range(100)])
    queue.letters.append(
        dataclasses.replace(letter(0), handle="late", dead_lettered_at=NOW - timedelta(seconds=0.5))
    )

    report = redriver(MemoryAuditSink()).run(queue)

    assert (report.moved, report.parked_again) == (100, 101)


def test_a_request_names_its_redrive_or_gets_one_of_its_own() -> None:
    named = parse_request({"source": "rabbitmq", "queue": "q", "redrive_id": "cmd-1"})
    assert named.plan.redrive_id == "cmd-1"
    first, second = (parse_request({"source": "rabbitmq", "queue": "q"}) for _ in range(2))
    assert first.plan.redrive_id != second.plan.redrive_id


@pytest.mark.parametrize("redrive_id", ["", 7, "two words", "x" * 65, "-lead"])
def test_a_malformed_redrive_id_is_refused(redrive_id: object) -> None:
    with pytest.raises(ValueError, match="redrive_id"):
        parse_request({"source": "rabbitmq", "queue": "q", "redrive_id": redrive_id})


def test_the_report_says_its_redrive_and_what_was_parked_again() -> None:
    queue = ReparkingDeadLetterQueue([letter(1)])
    run = redriver(MemoryAuditSink())
    run.run(queue, RedrivePlan(redrive_id="cmd-2"))

    answer = run.run(queue, RedrivePlan(redrive_id="cmd-2")).to_dict()

    assert {k: answer[k] for k in ("redrive_id", "moved", "parked_again", "stopped")} == {
        "redrive_id": "cmd-2",
        "moved": 0,
        "parked_again": 1,
        "stopped": "parked again",
    }


def test_a_dry_run_as_the_redrive_lists_the_letters_it_would_leave_parked_again() -> None:
    # Before, a dry run given the redrive's id counted them in parked_again only: not listed,
    # and not counted as letters the queue keeps.
    queue = ReparkingDeadLetterQueue([letter(1), letter(2), letter(3)])
    run = redriver(MemoryAuditSink())
    run.run(queue, RedrivePlan(redrive_id="cmd-3", max_messages=2))

    report = run.run(queue, RedrivePlan(redrive_id="cmd-3", dry_run=True))

    assert (report.scanned, report.matched, report.parked_again) == (3, 1, 2)
    assert report.stopped == "parked again", "it looked at every letter"
    assert sorted((item.message_id, item.stays) for item in report.listed) == sorted(
        [
            (msg_id("m-1"), PARKED_AGAIN_STAYS),
            (msg_id("m-2"), PARKED_AGAIN_STAYS),
            (msg_id("m-3"), None),
        ]
    )
    assert len(queue.letters) == 3, "a dry run moves nothing"
