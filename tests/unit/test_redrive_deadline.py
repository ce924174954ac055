"""A redrive run's time limit holds within a batch too: the run gives its queue the time it has
left, and letters the queue did not send for want of time stay, the run stopping ``time limit``
(which the runbook goes on from). Only then: a send in doubt that outlasts the run's time stops
it ``origin unavailable``. On an in-memory DLQ whose origin is slow, on the run's clock."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.audit import AuditEvent
from fabric.ports import DeadLetter
from fabric.redrive import RedrivePlan, Redriver, parse_request
from scripts import runbook
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
        self.out_of_time = False
        moved: list[DeadLetter] = []
        for item in letters:
            if deadline is not None and self.clock.now >= deadline:
                self.out_of_time = True
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


class SilentOriginDeadLetterQueue(MemoryDeadLetterQueue):
    """An origin that takes the first batch, then stops answering: the next request, begun
    within the run's time, is in doubt after 6 s (an SQS send's connect and read timeouts), and
    ends the move."""

    def __init__(self, letters: list[DeadLetter], clock: Clock) -> None:
        super().__init__(letters)
        self.clock = clock

    def move(
        self, letters: Sequence[DeadLetter], *, budget_s: float | None = None
    ) -> list[DeadLetter]:
        if not self.origin:
            return super().move(letters, budget_s=budget_s)
        self.clock.now += 6.0
        return []


class Function:
    """Lambda's invoke of the redrive function, run here on ``queue``."""

    def __init__(self, queue: MemoryDeadLetterQueue, redriver: Redriver) -> None:
        self.queue, self.redriver, self.invocations = queue, redriver, 0

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
        self.invocations += 1
        report = self.redriver.run(self.queue, parse_request(json.loads(Payload)).plan)
        return {"Payload": io.BytesIO(json.dumps(report.to_dict()).encode())}


def test_a_send_in_doubt_that_outlasts_the_run_stops_it_origin_unavailable() -> None:
    # Before, the run looked at its clock after the move, whatever ended it: past the limit, it
    # stopped "time limit", and the runbook invoked the next chunk against the silent origin.
    clock = Clock()
    queue = SilentOriginDeadLetterQueue([letter(i) for i in range(150)], clock)
    redriver = Redriver(
        ledger=MemoryRedriveLedger(),
        audit=MemoryAuditSink(),
        clock=clock,
        sleep=clock.sleep,
        now=lambda: NOW,
    )
    function = Function(queue, redriver)
    out = io.StringIO()

    status = runbook.redrive(
        "prod",
        client={"lambda": function}.__getitem__,
        request={"source": "rabbitmq", "queue": queue.name, "max_seconds": 3},
        chunk=500,
        out=out,
    )

    assert clock.now >= 3, "the send outlasted the run's time"
    assert function.invocations == 1, "no chunk after it"
    assert status == 1
    assert "summary: moved 100, stopped: origin unavailable" in out.getvalue()
    assert len(queue.letters) == 50
