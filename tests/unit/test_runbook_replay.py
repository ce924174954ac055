"""The runbook's replay command: its exit status says whether the replay is complete."""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

import pytest

from scripts import runbook


class _Lambda:
    """A replay function that answers every invocation with ``body`` (its counts filled in)."""

    def __init__(self, **body: Any) -> None:
        self.body = {
            "selected": 100,
            "remaining": 0,
            "replayed": 0,
            "would_replay": 0,
            "missing_body": 0,
            "corrupt": 0,
            "unreadable": 0,
            "refused": 0,
            "unsealed": 0,
            "failed": 0,
            "cursor": {"at": "2026-12-01T03:00:00Z", "message_id": "m-100"},
            "messages": [],
            "problems": [],
            **body,
        }

    def invoke(self, **_: Any) -> dict[str, Any]:
        return {"Payload": io.BytesIO(json.dumps(self.body).encode())}


def replay(function: _Lambda, max_messages: int) -> tuple[int, str]:
    out = io.StringIO()
    status = runbook.replay(
        "test",
        client=lambda _service: function,
        request={"start": "2026-12-01T00:00:00Z", "end": "2026-12-02T00:00:00Z"},
        chunk=500,
        out=out,
        max_messages=max_messages,
    )
    return status, out.getvalue()


@pytest.mark.parametrize("stopped", ["audit unavailable", "broker unavailable"])
def test_a_bounded_replay_that_stopped_on_a_failure_exits_1_with_where_to_resume(
    stopped: str,
) -> None:
    # All 100 asked for were published, but their replayed records were not stored (or the
    # broker failed on the last one): the replay is not complete, whatever the count says.
    status, output = replay(_Lambda(replayed=100, stopped=stopped), max_messages=100)
    assert status == 1, output
    assert f"stopped: {stopped}" in output
    assert "resume with the same command and: --replay-id" in output


def test_a_bounded_replay_that_reached_its_bound_exits_0() -> None:
    status, output = replay(_Lambda(replayed=100, stopped="message limit"), max_messages=100)
    assert status == 0, output


def test_refused_messages_are_counted_as_not_replayable_and_exit_1() -> None:
    status, output = replay(_Lambda(replayed=98, refused=2, stopped="done"), max_messages=1000)
    assert status == 1, output
    assert "refused 2," in output


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_trail_that_does_not_verify_is_printed_and_exits_1(dry_run: bool) -> None:
    problem = "fabric-prod-audit-writer: audit/x.jsonl: an object no checkpoint names"
    function = _Lambda(
        selected=0, cursor=None, stopped="trail not verified", trail_problems=[problem]
    )
    out = io.StringIO()
    status = runbook.replay(
        "test",
        client=lambda _service: function,
        request={
            "start": "2026-12-01T00:00:00Z",
            "end": "2026-12-02T00:00:00Z",
            "dry_run": dry_run,
        },
        chunk=500,
        out=out,
    )
    assert status == 1, out.getvalue()
    assert f"  trail does not verify: {problem}" in out.getvalue()
    assert "stopped: trail not verified" in out.getvalue()
    assert "resume with" not in out.getvalue()  # find the cause first


def test_an_incomplete_but_authentic_trail_is_named_as_such_and_the_replay_goes_on() -> None:
    gap = "fabric-prod-audit-writer: audit/x.jsonl record 3: an accepted message has no outcome"
    status, output = replay(
        _Lambda(replayed=100, stopped="done", trail_incomplete=[gap]), max_messages=1000
    )
    assert status == 0, output
    assert f"  trail incomplete (replayed anyway): {gap}" in output
    assert "does not verify" not in output


def test_acceptances_held_back_as_unsealed_exit_1_and_the_flag_asks_for_them() -> None:
    status, output = replay(_Lambda(replayed=98, unsealed=2, stopped="done"), max_messages=1000)
    assert status == 1, output
    assert "unsealed 2," in output
    fields = dict.fromkeys(
        ("topic", "message_id", "source", "rate", "replay_id", "after", "late_days")
    )
    common = {"start": "a", "end": "b", "dry_run": False, **fields}
    asked = argparse.Namespace(**common, include_unsealed=True)
    assert runbook._replay_request(asked)["include_unsealed"] is True
    assert "include_unsealed" not in runbook._replay_request(
        argparse.Namespace(**common, include_unsealed=False)
    )


def test_a_replay_whose_runs_finish_nothing_stops_instead_of_invoking_forever() -> None:
    # Reading and verifying the period took each run's whole time: no cursor, nothing done.
    function = _Lambda(selected=3, remaining=3, cursor=None, stopped="time limit")
    calls = []
    original = function.invoke

    def invoke(**arguments: Any) -> dict[str, Any]:
        calls.append(arguments)
        return original(**arguments)

    function.invoke = invoke  # type: ignore[method-assign]
    status, output = replay(function, max_messages=1000)
    assert status == 1, output
    assert len(calls) == 1
    assert "the period is too large to read and verify in one invocation" in output


def test_a_replay_that_reached_max_messages_prints_where_to_go_on() -> None:
    status, output = replay(
        _Lambda(replayed=100, remaining=900, stopped="message limit"), max_messages=100
    )
    assert status == 0, output
    assert "resume with the same command and: --replay-id" in output
    assert "--after 2026-12-01T03:00:00Z,m-100" in output


def test_the_cli_never_lets_the_sdk_invoke_a_function_twice() -> None:
    lambda_client = runbook._client("lambda", "ap-southeast-3")
    assert lambda_client.meta.config.retries["total_max_attempts"] == 1
    assert lambda_client.meta.config.tcp_keepalive is True
    assert lambda_client.meta.config.read_timeout == 930
    # Reads (S3, KMS, CloudFormation) keep the SDK's retries.
    assert "total_max_attempts" not in (
        runbook._client("s3", "ap-southeast-3").meta.config.retries or {}
    )


def test_acceptances_held_back_as_unsealed_get_a_command_that_replays_just_them() -> None:
    # The cursor passes them, so resuming from it never reaches them: they are named instead.
    held = [
        {"message_id": f"m-{n}", "at": "t", "topic": "x", "outcome": "unsealed"} for n in (7, 9)
    ]
    status, output = replay(
        _Lambda(replayed=98, unsealed=2, stopped="done", problems=held), max_messages=1000
    )
    assert status == 1, output
    assert "2 acceptance(s) were not sealed yet" in output
    assert "--message-id m-7 --message-id m-9" in output


def test_a_run_that_finished_nothing_but_moved_its_cursor_is_progress() -> None:
    # A run that kept only messages done before its cursor (replayed by an earlier chunk) moves
    # the cursor past them and stops on its time limit: the next run goes on from there.
    answers = [
        _Lambda(
            selected=3,
            remaining=3,
            stopped="time limit",
            cursor={"at": "2026-12-01T01:00:00Z", "message_id": "m-010"},
        ).body,
        _Lambda(selected=3, remaining=0, replayed=3, stopped="done").body,
    ]
    events: list[dict[str, Any]] = []

    class _Sequence:
        def invoke(self, **arguments: Any) -> dict[str, Any]:
            events.append(json.loads(arguments["Payload"]))
            return {"Payload": io.BytesIO(json.dumps(answers[len(events) - 1]).encode())}

    status, output = replay(_Sequence(), max_messages=1000)  # type: ignore[arg-type]

    assert status == 0, output
    assert len(events) == 2
    assert events[1]["after"] == {"at": "2026-12-01T01:00:00Z", "message_id": "m-010"}
    assert "too large to read" not in output


_ULID = "01JEHZ8Q6K9V3T2B5N7M4C1XAD"


@pytest.mark.parametrize(
    ("at", "message_id"),
    [
        ("2026-12-01T03:00:00+00:00", _ULID),
        ("2026-12-01t03:00:00z", _ULID.lower()),
        ("2026-12-01T03:00:00.000Z", _ULID),
        ("2026-12-01T10:00:00+07:00", _ULID),
    ],
)
def test_a_hand_typed_cursor_spelled_otherwise_than_the_functions_is_the_same_place(
    at: str, message_id: str
) -> None:
    # The function answers with its own spelling of the cursor it was given: nothing moved.
    function = _Lambda(
        selected=3,
        remaining=3,
        stopped="time limit",
        cursor={"at": "2026-12-01T03:00:00Z", "message_id": _ULID},
    )
    calls = []
    original = function.invoke

    def invoke(**arguments: Any) -> dict[str, Any]:
        calls.append(arguments)
        return original(**arguments)

    function.invoke = invoke  # type: ignore[method-assign]
    out = io.StringIO()
    status = runbook.replay(
        "test",
        client=lambda _service: function,
        request={
            "start": "2026-12-01T00:00:00Z",
            "end": "2026-12-02T00:00:00Z",
            "after": runbook._cursor(f"{at},{message_id}"),
        },
        chunk=500,
        out=out,
    )
    assert status == 1, out.getvalue()
    assert len(calls) == 1, out.getvalue()
    assert "stopped: no progress" in out.getvalue()


def test_a_cursor_moved_by_a_fraction_of_a_second_is_progress() -> None:
    answers = [
        _Lambda(
            selected=3,
            remaining=3,
            stopped="time limit",
            cursor={"at": "2026-12-01T03:00:00.5Z", "message_id": _ULID},
        ).body,
        _Lambda(selected=3, remaining=0, replayed=3, stopped="done").body,
    ]
    events: list[dict[str, Any]] = []

    class _Sequence:
        def invoke(self, **arguments: Any) -> dict[str, Any]:
            events.append(json.loads(arguments["Payload"]))
            return {"Payload": io.BytesIO(json.dumps(answers[len(events) - 1]).encode())}

    out = io.StringIO()
    status = runbook.replay(
        "test",
        client=lambda _service: _Sequence(),
        request={
            "start": "2026-12-01T00:00:00Z",
            "end": "2026-12-02T00:00:00Z",
            "after": {"at": "2026-12-01T03:00:00+00:00", "message_id": _ULID},
        },
        chunk=500,
        out=out,
    )
    assert status == 0, out.getvalue()
    assert len(events) == 2


@pytest.mark.parametrize(
    ("after", "why"),
    [
        (f"2026-12-01T03:00:00{_ULID}", "a cursor is AT,MESSAGE_ID"),
        (f"2026-12-01T03:00:00,{_ULID}", "AT must be RFC 3339"),  # no time zone
        (f"2026-12-01 03:00:00Z,{_ULID}", "AT must be RFC 3339"),
        (f"2026-12-01T25:00:00Z,{_ULID}", "AT must be RFC 3339"),
        ("2026-12-01T03:00:00Z,m-100", "MESSAGE_ID must be a UUID or a ULID"),
    ],
)
def test_a_mistyped_after_is_a_usage_error_before_anything_is_invoked(
    after: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    period = ["--start", "2026-12-01T00:00:00Z", "--end", "2026-12-02T00:00:00Z"]
    with pytest.raises(SystemExit) as exited:
        runbook.main(["replay", "--env", "dev", *period, "--after", after], out=io.StringIO())
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "argument --after" in error
    assert why in error


def test_a_valid_after_goes_to_the_function_as_typed() -> None:
    typed = f"2026-12-01T10:00:00.120+07:00,{_ULID.lower()}"
    assert runbook._cursor(typed) == {
        "at": "2026-12-01T10:00:00.120+07:00",
        "message_id": _ULID.lower(),
    }


def test_a_period_too_long_to_read_in_one_run_says_to_split_it_not_to_resume() -> None:
    # The function stopped before it had read and verified the period (`period too long`):
    # the same command, resumed, stops again. Before, the runbook told the operator to resume
    # with it.
    function = _Lambda(selected=0, cursor=None, stopped="period too long")
    status, output = replay(function, max_messages=1000)
    assert status == 1, output
    assert "replay it in shorter periods" in output
    assert "resume with" not in output
    assert "replay shorter periods of it (--start, --end), each with: --replay-id " in output


def test_the_shorter_periods_keep_the_replays_id_and_go_on_behind_its_cursor() -> None:
    # A first chunk replayed up to its cursor; the next could not read the period. The
    # shorter periods are the same replay: its id (in every message's fabric-replay header and
    # replayed record, which the consumer teams were told), and behind its cursor. Before,
    # the line left out --replay-id: each shorter period ran under a new id.
    cursor = {"at": "2026-12-01T03:00:00Z", "message_id": "m-100"}
    chunks = iter(
        [
            {"replayed": 500, "remaining": 9500, "stopped": "message limit", "cursor": cursor},
            {"selected": 0, "stopped": "period too long", "cursor": None},
        ]
    )

    class Chunked(_Lambda):
        def invoke(self, **_: Any) -> dict[str, Any]:
            self.body.update(next(chunks))
            return super().invoke()

    out = io.StringIO()
    status = runbook.replay(
        "test",
        client=lambda _service: Chunked(),
        request={
            "start": "2026-12-01T00:00:00Z",
            "end": "2026-12-02T00:00:00Z",
            "replay_id": "incident-4711",
        },
        chunk=500,
        out=out,
    )

    assert status == 1, out.getvalue()
    assert (
        out.getvalue()
        .rstrip()
        .endswith(
            "replay shorter periods of it (--start, --end), each with: --replay-id incident-4711"
            " --after 2026-12-01T03:00:00Z,m-100"
        )
    )
