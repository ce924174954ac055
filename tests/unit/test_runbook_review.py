"""The runbook's redrive command against a stand-in for the function: what the operator sees,
the exit status, and how fast the chunks go together."""

from __future__ import annotations

import io
import json
from typing import Any

from scripts import runbook


def answer(**fields: Any) -> dict[str, Any]:
    """A redrive function's report (``RedriveReport.to_dict``)."""
    report: dict[str, Any] = {
        "queue": "fabric.community.dlq",
        "dry_run": False,
        "redrive_id": "r-1",
        "scanned": 0,
        "matched": 0,
        "moved": 0,
        "already_moved": 0,
        "left": 0,
        "parked_again": 0,
        "stopped": "empty",
        "listed": [],
    }
    return {**report, **fields}


class RedriveFunction:
    """Stands in for Lambda's invoke: answers one report per invocation, in order."""

    def __init__(self, *answers: dict[str, Any], clock: Clock | None = None) -> None:
        self.answers, self.clock = list(answers), clock
        self.events: list[dict[str, Any]] = []
        self.invoked_at: list[float] = []

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
        assert (FunctionName, InvocationType) == ("fabric-prod-redrive", "RequestResponse")
        self.events.append(json.loads(Payload))
        if self.clock is not None:
            self.invoked_at.append(self.clock.now)
        return {"Payload": io.BytesIO(json.dumps(self.answers.pop(0)).encode())}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run(function: RedriveFunction, chunk: int = 500, **request: Any) -> tuple[int, str]:
    out, clock = io.StringIO(), function.clock or Clock()
    status = runbook.redrive(
        "prod",
        client={"lambda": function}.__getitem__,
        request={"source": "rabbitmq", "queue": "fabric.community.dlq", **request},
        chunk=chunk,
        out=out,
        clock=clock,
        sleep=clock.sleep,
    )
    return status, out.getvalue()


def test_a_dry_run_that_could_not_read_the_queue_exits_1_and_says_so() -> None:
    # Before: "dry run on ...: 0 of 0 match", "nothing moved", exit 0: the operator read a
    # broker outage (or a DLQ that is not there) as an empty DLQ.
    function = RedriveFunction(
        answer(dry_run=True, stopped="dead-letter queue unavailable"),
    )
    status, output = run(function, dry_run=True)
    assert status == 1
    assert "the listing is incomplete, stopped: dead-letter queue unavailable" in output


def test_a_dry_run_that_read_everything_exits_0() -> None:
    listed = {
        "message_id": "m-1",
        "topic": "community.update",
        "reason": "poison",
        "origin": "fabric.community",
        "age_s": 60.0,
        "redrives": 0,
        "stays": None,
    }
    function = RedriveFunction(answer(dry_run=True, scanned=1, matched=1, listed=[listed]))
    status, output = run(function, dry_run=True)
    assert status == 0
    assert "dry run on fabric.community.dlq: 1 of 1 match" in output
    assert output.rstrip().endswith("nothing moved")


def test_chunks_together_keep_to_the_rate() -> None:
    # --rate 50 in chunks of 10: each invocation moved its 10 at once (less than a second's
    # worth: nothing to pace inside it), and the next one followed at once, so 100 went in
    # well under a second. The command now waits between chunks as the rate requires.
    clock = Clock()
    function = RedriveFunction(
        *[answer(moved=10, matched=10, stopped="message limit") for _ in range(10)],
        clock=clock,
    )
    status, _ = run(function, chunk=10, max_messages=100, rate_per_s=50)
    assert status == 0
    assert len(function.events) == 10
    # The eleventh chunk would start no sooner than 100 / 50 s; the tenth at 90 / 50 s.
    assert function.invoked_at[-1] >= 90 / 50 - 1e-9
    gaps = [b - a for a, b in zip(function.invoked_at, function.invoked_at[1:], strict=False)]
    assert min(gaps) >= 10 / 50 - 1e-9


def test_a_chunk_that_moves_and_removes_nothing_ends_the_command() -> None:
    # Letters matched but neither moved nor removed (the DLQ refuses deletes): each chunk
    # stopped at its message limit, and the command invoked the function again, for ever.
    stuck = answer(matched=10, stopped="message limit")
    function = RedriveFunction(*[stuck for _ in range(5)])
    status, output = run(function, chunk=10, max_messages=1000)
    assert status == 1
    assert len(function.events) == 1
    assert "summary: moved 0, stopped: no progress" in output


def test_a_chunk_that_ran_out_of_time_is_followed_by_the_next() -> None:
    # --rate 1 with chunks of 1000 take longer than the function's 840 s a run: each chunk
    # stops at its time limit having moved 840. Before, the command stopped after the first.
    function = RedriveFunction(
        answer(moved=840, matched=840, stopped="time limit"),
        answer(moved=160, matched=160, stopped="empty"),
    )
    status, output = run(function, chunk=1000, max_messages=5000, rate_per_s=1)
    assert status == 0
    assert [event["max_messages"] for event in function.events] == [1000, 1000]
    assert "summary: moved 1000, stopped: empty" in output


def test_the_chunks_are_one_redrive() -> None:
    # Each chunk was a redrive of its own: the next one moved the messages the last one had
    # moved and the consumer had parked again (docs/dead-letters.md, "Redrive").
    function = RedriveFunction(
        answer(moved=5, matched=5, stopped="message limit"),
        answer(moved=5, matched=5, stopped="message limit"),
        answer(moved=1, matched=1, stopped="empty"),
    )
    status, output = run(function, chunk=5, max_messages=40)
    assert status == 0
    (redrive_id,) = {event["redrive_id"] for event in function.events}
    assert output.startswith(
        f"redrive {redrive_id} of fabric.community.dlq via fabric-prod-redrive"
    )
    another = RedriveFunction(answer(moved=1, matched=1))
    run(another)
    assert another.events[0]["redrive_id"] != redrive_id, "each command is a redrive of its own"


def test_letters_parked_again_while_the_redrive_ran_exit_1_and_say_the_cause_is_not_fixed() -> None:
    # Before, the command counted every move and exited 0; the chunks' copies parked again
    # (the cause not fixed) were not reported at all.
    function = RedriveFunction(
        answer(moved=5, matched=5, stopped="message limit"),
        answer(moved=3, matched=3, parked_again=5, stopped="parked again"),
    )
    status, output = run(function, chunk=5, max_messages=40)
    assert status == 1
    assert "5 parked again, this run stopped: parked again" in output
    assert "5 letter(s) were parked again while this redrive ran: the cause is not fixed" in output
    assert "summary: moved 8, stopped: parked again" in output


def test_letters_parked_again_fail_a_redrive_that_reached_its_message_limit() -> None:
    # A chunk that stopped at its limit met only part of the DLQ: the command reports the most
    # any chunk met (they stay in the DLQ), not the last chunk's, nor a sum of counts.
    function = RedriveFunction(
        answer(moved=5, matched=5, parked_again=4, stopped="message limit"),
        answer(moved=5, matched=5, parked_again=2, stopped="message limit"),
    )
    status, output = run(function, chunk=5, max_messages=10)
    assert status == 1
    assert "4 letter(s) were parked again" in output
    assert "summary: moved 10, stopped: message limit" in output
