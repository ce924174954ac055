"""The runbook's redrive command going on as an earlier command's redrive (``--redrive-id``),
against the real ``Redriver`` in-process and a DLQ whose consumer parks every letter put back
at once (still poison): what the operator sees when a command stops at ``--max-messages``, when
a chunk fails or is interrupted, and that the next command moves no message twice."""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

import pytest

from fabric.adapters.memory import MemoryAuditSink, MemoryRedriveLedger
from fabric.audit import AuditEvent
from fabric.redrive import Redriver, parse_request
from scripts import runbook
from tests.unit.test_redrive_runs import NOW, Clock, ReparkingDeadLetterQueue, letter


class RedriveFunction:
    """Lambda's invoke of the redrive function, run here: the handler's parse and run."""

    def __init__(self, letters: int) -> None:
        self.queue = ReparkingDeadLetterQueue([letter(i) for i in range(letters)])
        self.audit, self.ledger, clock = MemoryAuditSink(), MemoryRedriveLedger(), Clock()
        self.redriver = Redriver(
            ledger=self.ledger, audit=self.audit, clock=clock, sleep=clock.sleep, now=lambda: NOW
        )
        self.events: list[dict[str, Any]] = []
        self.interrupt_at: int | None = None  # raise on this invocation (1-based)

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
        self.events.append(json.loads(Payload))
        if len(self.events) == self.interrupt_at:
            raise KeyboardInterrupt
        try:
            request = parse_request(json.loads(Payload))
        except ValueError as exc:
            body: dict[str, Any] = {"error": str(exc)}
        else:
            body = self.redriver.run(self.queue, request.plan).to_dict()
        return {"Payload": io.BytesIO(json.dumps(body).encode())}

    def moves(self) -> Counter[str]:
        """How often each message was put back (its ``redriven`` records)."""
        return Counter(r.message_id for r in self.audit.records if r.event is AuditEvent.REDRIVEN)


def command(function: RedriveFunction, *, chunk: int, **request: Any) -> tuple[int, str]:
    out = io.StringIO()
    status = runbook.redrive(
        "prod",
        client={"lambda": function}.__getitem__,
        request={"source": "rabbitmq", "queue": function.queue.name, **request},
        chunk=chunk,
        out=out,
    )
    return status, out.getvalue()


def first_line_id(output: str) -> str:
    """The redrive id as the command's first line prints it: ``redrive <id> of ...``."""
    words = output.splitlines()[0].split()
    assert words[0] == "redrive"
    return words[1]


def test_a_command_that_stops_at_max_messages_says_what_it_did_not_look_at() -> None:
    # A DLQ deeper than --max-messages: the chunks stopped before the tail, where the consumer
    # parked the copies again. Before, the command said only "summary: moved 200, stopped:
    # message limit" and exited 0, which the runbook read as "no letter was parked again".
    function = RedriveFunction(300)
    status, output = command(function, chunk=100, max_messages=200)
    redrive_id = first_line_id(output)
    assert status == 0, "a bounded redrive that reached its bound"
    assert "summary: moved 200, stopped: message limit" in output
    assert (
        "stopped at --max-messages: letters behind were not looked at, so letters parked again"
        f" there are not counted; go on as the same redrive with the same command and:"
        f" --redrive-id {redrive_id}"
    ) in output
    assert sum(1 for item in function.queue.letters if item.headers) == 200, "parked again"


def test_going_on_as_the_same_redrive_moves_no_message_twice() -> None:
    # Before, the next command was a redrive of its own (a fresh id, and no option to give
    # one): it moved the 200 copies parked again a second time, a "redriven" record each.
    function = RedriveFunction(300)
    _, output = command(function, chunk=100, max_messages=200)
    redrive_id = first_line_id(output)

    status, output = command(function, chunk=100, max_messages=1000, redrive_id=redrive_id)

    moves = function.moves()
    assert len(moves) == 300
    assert Counter(moves.values()) == {1: 300}, "no message moved twice"
    assert output.startswith(f"redrive {redrive_id} of fabric.government.dlq via ")
    assert {event["redrive_id"] for event in function.events} == {redrive_id}
    assert status == 1
    assert "300 letter(s) were parked again while this redrive ran: the cause is not fixed" in (
        output
    )
    assert "summary: moved 100, stopped: parked again" in output
    # Once the cause is fixed they go back with a new redrive, which this one never is.
    assert "a new redrive (the same command without --redrive-id) moves them" in output


def test_the_command_line_goes_on_as_the_redrive_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    function = RedriveFunction(300)
    monkeypatch.setattr(runbook, "_client", lambda service, region: function)
    argv = ["redrive", "--env", "dev", "--source", "rabbitmq", "--queue", function.queue.name]
    out = io.StringIO()
    assert runbook.main([*argv, "--max-messages", "200", "--chunk", "100"], out=out) == 0
    redrive_id = first_line_id(out.getvalue())
    assert f"--redrive-id {redrive_id}" in out.getvalue()

    again = io.StringIO()
    assert runbook.main([*argv, "--chunk", "100", "--redrive-id", redrive_id], out=again) == 1
    assert first_line_id(again.getvalue()) == redrive_id
    assert set(function.moves().values()) == {1}


def test_a_mistyped_redrive_id_is_a_usage_error_before_anything_is_invoked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["redrive", "--env", "dev", "--source", "rabbitmq", "--queue", "fabric.x.dlq"]
    with pytest.raises(SystemExit) as exited:
        runbook.main([*argv, "--redrive-id", "not an id"], out=io.StringIO())
    assert exited.value.code == 2
    assert "argument --redrive-id" in capsys.readouterr().err


def test_a_failed_chunk_says_how_to_go_on_as_the_same_redrive() -> None:
    function = RedriveFunction(300)
    function.ledger.available = False
    status, output = command(function, chunk=100, max_messages=1000)
    assert status == 1
    assert "summary: moved 0, stopped: ledger unavailable" in output
    assert f"--redrive-id {first_line_id(output)}" in output.splitlines()[-1]


def test_an_interrupted_command_says_how_to_go_on_as_the_same_redrive() -> None:
    # Ctrl-C (or an AWS error) during the second chunk: the first moved 100, each marked with
    # this redrive; a command with a fresh id would move their copies parked again once more.
    function = RedriveFunction(300)
    function.interrupt_at = 2
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        runbook.redrive(
            "prod",
            client={"lambda": function}.__getitem__,
            request={"source": "rabbitmq", "queue": function.queue.name, "max_messages": 1000},
            chunk=100,
            out=out,
        )
    output = out.getvalue()
    assert f"--redrive-id {first_line_id(output)}" in output.splitlines()[-1]


def test_a_dry_run_given_the_redrive_id_lists_and_counts_the_letters_parked_again() -> None:
    # The --max-messages line says to look with --dry-run or go on with --redrive-id; an
    # operator looks first, as that redrive. Before, the dry run left the 100 letters parked
    # again out of its listing and its counts ("20 of 120 match") and, having walked the whole
    # DLQ, said "the listing is incomplete, stopped: parked again" and exited 1.
    function = RedriveFunction(120)
    _, output = command(function, chunk=100, max_messages=100)
    redrive_id = first_line_id(output)

    status, output = command(function, chunk=100, dry_run=True, redrive_id=redrive_id)

    assert status == 0, output
    lines = output.splitlines()
    assert "dry run on fabric.government.dlq: 20 of 120 match" in lines
    listed = [line for line in lines if line.startswith("  ") and "redrives" in line]
    assert sum("-> fabric.government" in line for line in listed) == 20
    assert sum(line.endswith("stays: parked again by this redrive") for line in listed) == 80
    assert "  ... and 20 more" in lines, "the function's answer lists 100 letters"
    assert (
        f"100 letter(s) were parked again after redrive {redrive_id} moved them: the cause is"
        " not fixed."
    ) in output
    assert "incomplete" not in output
    assert lines[-1] == "nothing moved"
    assert len(function.moves()) == 100, "the dry run moved nothing"
