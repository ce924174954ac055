"""The redrive's request validation, filters, pacing and failure handling, on an in-memory DLQ."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.audit import AuditEvent
from fabric.errors import TransportUnavailable
from fabric.ports import DeadLetter
from fabric.redrive import RedriveFilter, RedrivePlan, Redriver, ledger_key, parse_request
from tests.message_ids import msg_id

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def letter(
    i: int, *, topic: str = "case.updated", reason: str = "rejected", age_s: float = 60
) -> DeadLetter:
    return DeadLetter(
        handle=str(i),
        message_id=msg_id(f"m-{i}"),
        topic=topic,
        body=b"{}",
        origin="fabric.government",
        reason=reason,
        dead_lettered_at=NOW - timedelta(seconds=age_s),
    )


class MemoryDeadLetterQueue:
    name = "fabric.government.dlq"
    out_of_time = False  # its moves send all at once

    def __init__(self, letters: list[DeadLetter], *, origin_fails: set[str] | None = None) -> None:
        self.letters = list(letters)
        self.origin: list[DeadLetter] = []
        self.origin_fails = origin_fails or set()
        self._cursor = 0
        self.released = 0

    def peek(self, limit: int) -> list[DeadLetter]:
        taken = self.letters[self._cursor : self._cursor + limit]
        self._cursor += len(taken)
        return taken

    def move(
        self, letters: Sequence[DeadLetter], *, budget_s: float | None = None
    ) -> list[DeadLetter]:
        moved = [item for item in letters if item.message_id not in self.origin_fails]
        self.origin.extend(moved)
        return moved

    def remove(self, letters: Sequence[DeadLetter]) -> set[str]:
        handles = {item.handle for item in letters}
        self.letters = [item for item in self.letters if item.handle not in handles]
        self._cursor -= len(handles)
        return handles

    def release(self) -> int:
        self._cursor = 0
        self.released += 1
        return 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def redriver(ledger: MemoryRedriveLedger | None = None, clock: Clock | None = None) -> Redriver:
    clock = clock or Clock()
    return Redriver(
        ledger=ledger or MemoryRedriveLedger(),
        audit=MemoryAuditSink(),
        clock=clock,
        sleep=clock.sleep,
        now=lambda: NOW,
    )


def test_filters_combine_topic_reason_age_and_ids() -> None:
    selection = RedriveFilter(
        topics=("case.#",), reasons=frozenset({"rejected"}), older_than_s=30, newer_than_s=3600
    )
    assert selection.admits(letter(1), NOW)
    assert not selection.admits(letter(2, topic="media.story"), NOW)
    assert not selection.admits(letter(3, reason="delivery_limit"), NOW)
    assert not selection.admits(letter(4, age_s=5), NOW)
    assert not selection.admits(letter(5, age_s=7200), NOW)
    assert RedriveFilter(message_ids=frozenset({msg_id("m-6")})).admits(letter(6), NOW)
    assert not RedriveFilter(message_ids=frozenset({msg_id("m-6")})).admits(letter(7), NOW)


def test_the_rate_limit_paces_the_run() -> None:
    clock = Clock()
    queue = MemoryDeadLetterQueue([letter(i) for i in range(250)])
    report = redriver(clock=clock).run(queue, RedrivePlan(rate_per_s=50))
    assert report.moved == 250
    assert clock.now >= 250 / 50 - 1, "250 messages at 50/s take about five seconds"
    assert queue.letters == []


def test_max_messages_stops_the_run_and_leaves_the_rest() -> None:
    queue = MemoryDeadLetterQueue([letter(i) for i in range(30)])
    report = redriver().run(queue, RedrivePlan(max_messages=12))
    assert (report.moved, report.stopped) == (12, "message limit")
    assert len(queue.letters) == 18
    assert queue.released == 1


def test_an_origin_that_refuses_stops_the_run_and_keeps_the_refused_letters() -> None:
    queue = MemoryDeadLetterQueue([letter(i) for i in range(5)], origin_fails={msg_id("m-3")})
    report = redriver().run(queue)
    assert report.stopped == "origin unavailable"
    assert [item.message_id for item in queue.letters] == [msg_id("m-3")]


def test_a_ledger_that_cannot_be_read_moves_nothing() -> None:
    queue = MemoryDeadLetterQueue([letter(i) for i in range(5)])
    report = redriver(MemoryRedriveLedger(available=False)).run(queue)
    assert (report.moved, report.stopped) == (0, "ledger unavailable")
    assert queue.origin == []
    assert len(queue.letters) == 5


@pytest.mark.parametrize(
    ("event", "problem"),
    [
        ([], "JSON object"),
        ({"source": "kafka", "queue": "q"}, "source"),
        ({"source": "sqs"}, "queue"),
        ({"source": "sqs", "queue": "q", "max_messages": 0}, "max_messages"),
        ({"source": "sqs", "queue": "q", "max_messages": True}, "max_messages"),
        ({"source": "sqs", "queue": "q", "dry_run": "yes"}, "dry_run"),
        ({"source": "sqs", "queue": "q", "topics": "case.#"}, "topics"),
        ({"source": "sqs", "queue": "q", "topics": ["case..x"]}, "topic filter"),
        ({"source": "sqs", "queue": "q", "rate_per_s": -1}, "rate_per_s"),
        ({"source": "sqs", "queue": "q", "older_than_s": "1h"}, "older_than_s"),
        ({"source": "sqs", "queue": "q", "everything": True}, "unknown fields: everything"),
    ],
)
def test_a_malformed_request_is_refused_with_its_reason(event: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_request(event)


def test_a_request_is_bounded_by_the_functions_time() -> None:
    request = parse_request(
        {"source": "rabbitmq", "queue": "fabric.media.dlq", "max_seconds": 5000}, max_seconds=840
    )
    assert request.plan.max_seconds == 840


@dataclass
class _LedgerWriteFails(MemoryRedriveLedger):
    """The ledger can be read, but recording fails (throttled) until ``available`` again."""

    failing: bool = True

    def record(self, keys: Any) -> None:
        if self.failing:
            raise TransportUnavailable("the ledger: ProvisionedThroughputExceeded")
        super().record(keys)


def test_letters_back_at_their_origin_are_audited_even_when_the_ledger_write_fails() -> None:
    # Before, the run stopped before auditing, and the re-run removed the dead-letter copies
    # as "already moved": messages back at their origin with no redriven record at all.
    queue = MemoryDeadLetterQueue([letter(i) for i in range(5)])
    ledger = _LedgerWriteFails()
    audit = MemoryAuditSink()
    run = Redriver(ledger=ledger, audit=audit, clock=Clock(), sleep=Clock().sleep, now=lambda: NOW)
    report = run.run(queue)

    assert (report.moved, report.stopped) == (5, "ledger unavailable")
    assert sorted(r.message_id for r in audit.records if r.event is AuditEvent.REDRIVEN) == sorted(
        msg_id(f"m-{i}") for i in range(5)
    )
    assert len(queue.letters) == 5  # the dead-letter copies stay until a run can record them

    ledger.failing = False
    again = run.run(queue)
    assert again.stopped == "empty"
    assert queue.letters == []
    redriven = [r.message_id for r in audit.records if r.event is AuditEvent.REDRIVEN]
    assert set(redriven) == {
        msg_id(f"m-{i}") for i in range(5)
    }  # each has a record (a re-move: two)


def test_two_dead_letter_copies_of_one_message_in_a_batch_go_back_once() -> None:
    # Two copies of one dead-lettering (same id, redrive count and time): one ledger key. Both
    # were moved (two copies at the origin, two "redriven" records); across batches the second
    # was already only removed.
    first, second = letter(1), dataclasses.replace(letter(1), handle="2")
    queue = MemoryDeadLetterQueue([first, second, letter(3)])
    audit = MemoryAuditSink()
    run = Redriver(
        ledger=MemoryRedriveLedger(),
        audit=audit,
        clock=Clock(),
        sleep=Clock().sleep,
        now=lambda: NOW,
    )

    report = run.run(queue)

    assert [item.message_id for item in queue.origin] == [msg_id("m-1"), msg_id("m-3")]
    assert (report.moved, report.already_moved, report.stopped) == (2, 1, "empty")
    assert queue.letters == []
    assert [r.message_id for r in audit.records] == [msg_id("m-1"), msg_id("m-3")]


def test_a_copy_is_kept_when_its_twin_could_not_be_put_back() -> None:
    first, second = letter(1), dataclasses.replace(letter(1), handle="2")
    queue = MemoryDeadLetterQueue([first, second], origin_fails={msg_id("m-1")})
    report = redriver().run(queue)
    assert (report.moved, report.already_moved, report.stopped) == (0, 0, "origin unavailable")
    assert [item.handle for item in queue.letters] == ["1", "2"]


class ReparkingDeadLetterQueue(MemoryDeadLetterQueue):
    """A consumer that parks what comes back at once (still poison): every letter put back is
    dead-lettered again, at the tail of the DLQ, with its redrive count raised."""

    def move(
        self, letters: Sequence[DeadLetter], *, budget_s: float | None = None
    ) -> list[DeadLetter]:
        moved = super().move(letters, budget_s=budget_s)
        for item in moved:
            self.letters.append(
                dataclasses.replace(
                    item, handle=f"{item.handle}+", redrives=item.redrives + 1, reason="poison"
                )
            )
        return moved


def test_a_letter_dead_lettered_again_during_the_run_is_not_moved_again_by_it() -> None:
    # Before, the run met the new copy at the DLQ's tail and moved it again, and again: one
    # poison message sent round up to max_messages times, a "redriven" record each time. Then
    # it left the copies unmoved but uncounted, and reported "empty": the operator's only sign
    # that the cause is not fixed was hidden.
    queue = ReparkingDeadLetterQueue([letter(1), letter(2)])
    report = redriver().run(queue, RedrivePlan(max_messages=50))

    assert [item.message_id for item in queue.origin] == [msg_id("m-1"), msg_id("m-2")]
    assert (report.moved, report.parked_again, report.stopped) == (2, 2, "parked again")
    assert sorted(item.message_id for item in queue.letters) == sorted(
        [msg_id("m-1"), msg_id("m-2")]
    ), "they stay in the DLQ"


def test_letters_whose_redriven_records_cannot_be_stored_stay_in_the_dlq_and_the_run_stops() -> (
    None
):
    # Before, the run went on: ledger written, letters removed, "empty" reported, and the
    # messages were back at their origin with no record at all.
    queue = MemoryDeadLetterQueue([letter(i) for i in range(5)])
    ledger, audit = MemoryRedriveLedger(), MemoryAuditSink(available=False)
    run = Redriver(ledger=ledger, audit=audit, clock=Clock(), sleep=Clock().sleep, now=lambda: NOW)

    report = run.run(queue)

    assert report.stopped == "audit unavailable"
    assert len(queue.letters) == 5  # a re-run moves them again, with their records
    assert not ledger.moved([ledger_key(queue.name, item) for item in queue.letters])

    audit.available = True
    again = run.run(queue)
    assert again.stopped == "empty"
    assert queue.letters == []
    records = [r for r in audit.records if r.event is AuditEvent.REDRIVEN]
    assert sorted(r.message_id for r in records) == sorted(msg_id(f"m-{i}") for i in range(5))
    # Each says where the letter went, beside the DLQ it came from.
    assert {(r.transport, r.queues) for r in records} == {
        ("fabric.government.dlq", ("fabric.government",))
    }
