"""A redrive run's time limit holds within a batch too: the run gives its queue the time it has
left, and letters the queue did not send for want of time stay, the run stopping ``time limit``
(which the runbook goes on from). On an in-memory DLQ whose origin is slow, on the run's clock."""

from __future__ import annotations

from collections.abc import Sequence

from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.audit import AuditEvent
from fabric.ports import DeadLetter
from fabric.redrive import RedrivePlan, Redriver
from tests.unit.test_redrive_runs import NOW, Clock, MemoryDeadLetterQueue, letter


class SlowOriginDeadLetterQueue(MemoryDeadLetterQueue):
    """Puts each letter back in a request of its own that takes a second (an SQS answering
    slowly, a large letter to a request), and starts none once ``budget_s`` is spent."""

    def __init__(self, letters: list[DeadLetter], clock: Clock) -> None:
        super().__init__(letters)
        self.clock = clock

    def move(
        self, letters: Sequence[DeadLetter], *, budget_s: float | None = None
    ) -> list[DeadLetter]:
        deadline = None if budget_s is None else self.clock.now + budget_s
        moved: list[DeadLetter] = []
        for item in letters:
            if deadline is not None and self.clock.now >= deadline:
                break
            self.clock.now += 1.0
            moved += super().move([item])
        return moved


def test_a_batch_stops_sending_at_the_runs_time_limit() -> None:
    # Before, the queue was not told the run's time: a batch begun at the limit's edge sent all
    # its letters (100 requests: on SQS up to 100 x 5 s, past the function's timeout, each
    # letter sent until then at its source without a record), and the run stopped after it.
    clock = Clock()
    queue = SlowOriginDeadLetterQueue([letter(i) for i in range(150)], clock)
    audit = MemoryAuditSink()
    redriver = Redriver(
        ledger=MemoryRedriveLedger(), audit=audit, clock=clock, sleep=clock.sleep, now=lambda: NOW
    )

    report = redriver.run(queue, RedrivePlan(max_seconds=30))

    assert clock.now <= 31, "past the run's time limit by one request at most"
    assert (report.moved, report.stopped) == (30, "time limit")
    assert len(queue.origin) == 30
    assert sum(r.event is AuditEvent.REDRIVEN for r in audit.records) == 30
    assert len(queue.letters) == 120, "the letters not sent stay in the DLQ"
