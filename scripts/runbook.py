"""The operators' runbook CLI: one command per task, built on the fabric library.

    python scripts/runbook.py drain --env prod [--max-messages N] [--dry-run]
    python scripts/runbook.py redrive --env prod --source rabbitmq|sqs --queue NAME
        [--topic PATTERN]... [--reason R]... [--message-id ID]... [--older-than AGE]
        [--newer-than AGE] [--max-messages N] [--rate N] [--chunk N] [--dry-run]
        [--redrive-id ID]
    python scripts/runbook.py verify --env prod [--writer NAME] [--bucket B] [--signing-key ARN]...
    python scripts/runbook.py replay --env prod --start T --end T [--topic PATTERN]...
        [--message-id ID]... [--source GROUP] [--max-messages N] [--rate N] [--chunk N]
        [--dry-run] [--replay-id ID] [--after AT,ID] [--late-days N] [--include-unsealed]
    python scripts/runbook.py report --env prod [--date YYYY-MM-DD | --start T --end T]
    python scripts/runbook.py topology diff --env prod
    python scripts/runbook.py topology apply --env prod [--recreate-empty] [--dry-run]
    python scripts/runbook.py topology diff|apply --management-url URL [--vhost V] ...

``drain`` shows every fallback queue's depth (and its subscription DLQ's), then invokes the deployed
drain function (``fabric-<env>-drain``) once and prints what it moved and why it stopped. The
broker is private, so the drain runs inside the VPC and never from the operator's machine.
``--dry-run`` only shows the queues.

``redrive`` invokes the deployed redrive function (``fabric-<env>-redrive``) to move the dead
letters of one queue that match every given filter back to where they came from: a RabbitMQ DLQ
(``fabric.<group>[.emergency].dlq``) to its work queue, RabbitMQ's ``fabric.overflow`` to the
terminal queue each letter came from (its DLQ, ``fabric.unrouted`` or ``fabric.audit``), an SQS
DLQ (give the source queue's or the DLQ's name) to its source queue. ``--dry-run`` lists what
would move and moves nothing. Long runs go in chunks (``--chunk``, default 500 messages an
invocation) with a progress line after each; a re-run after an interruption loses nothing
and moves a letter twice only when a send's answer was lost (the function keeps a ledger;
docs/dead-letters.md). The chunks are one redrive: a message it moved that
is parked again while it runs (the cause is not fixed) is not moved again; it stays, counted,
and the command exits 1. ``--redrive-id`` goes on as an earlier command's redrive (its first
line prints the id), so that what it moved and was parked again is not moved again; a command
that stops at ``--max-messages``, fails or is interrupted prints the option to go on with.
AGE is a number with ``s``, ``m``, ``h`` or ``d``.

``verify`` reads one writer's audit trail (objects and checkpoints) from the audit bucket and
checks signatures, chains, Merkle roots and sequence gaps; on failure it names the first bad
record, object or checkpoint, or every key someone deleted (a delete marker among its versions,
which hides it from the listings the check goes by). It reads one checkpoint's objects at a
time, each checked against the checkpoint before it (``fabric.audit_chain.verify_intervals``),
so a trail of months fits in memory: the keys, the ids of the messages with an outcome (tens of
bytes each) and one interval's objects. The bucket and the signing keys come from the
``<env>-Stateful`` stack's outputs unless given (``--signing-key`` once per key, oldest
first: the keys a rotation retired, then the current one).

``replay`` invokes the deployed replay function (``fabric-<env>-replay``) to re-publish the archived
messages accepted in ``[--start, --end)`` (RFC 3339, end exclusive) that match every given filter,
as they were stored, with the same message id and the ``fabric-replay`` header. It goes in chunks
(``--chunk``, default 500 an invocation) behind the cursor each chunk returns, so no chunk replays
what one before it did, with a progress line after each; a stopped replay prints the ``--replay-id``
and ``--after`` that resume it. ``--dry-run`` lists and counts what would be replayed and publishes
nothing. Each chunk first verifies the period's trail; when it does not verify, nothing is listed or
published, the problem is printed, and the exit status is 1. Exit 1 also when a message cannot be
replayed (missing or corrupt body): each one is listed, and when the period's trail cannot be read
in one invocation (``period too long``): it prints the ``--replay-id`` and ``--after`` to replay it
with in shorter periods.

``report`` invokes the deployed compliance report function (``fabric-<env>-compliance-report``)
for one UTC day (``--date``; default yesterday) or ``[--start, --end)``, and prints its summary:
the verdict, the figures, and the S3 keys of the JSON, HTML and CSV report. Exit 1 when the
trail does not verify, 2 when the function refuses the request.

``topology diff`` compares the broker with the topology the routing table generates and lists
what is missing, changed, needs recreating (an exchange or queue cannot change in place), is
obsolete (routes and group permissions the table removed) or extra (left alone); exit 1 when
apply would change anything. ``topology apply`` brings the broker to it (``--recreate-empty``:
also delete and declare again what cannot change in place, queues only when empty; ``--dry-run``
is ``diff``); exit 1 when it could not apply everything. With ``--env`` both invoke the deployed
topology function (``fabric-<env>-topology``, the custom resource's, inside the VPC); with
``--management-url`` they run here against a broker this machine reaches, as the administrator
named by ``FABRIC_MANAGEMENT_USER`` and ``FABRIC_MANAGEMENT_PASSWORD``, with the broker users'
passwords from the JSON file ``FABRIC_USER_PASSWORDS_FILE`` (apply refuses without it; diff
then compares users by tags only).

AWS credentials come from the usual boto3 chain (``AWS_PROFILE``, the environment, SSO); the
region is always the environment's in cdk.json (data residency), ``AWS_REGION`` and the
profile's region are ignored. Exit status: 0 done, 1 the run stopped early or failed, 2 bad
usage, configuration or request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
# Reasons a drain run stops that mean "all done" (anything else: look at the broker or SQS).
FINISHED = frozenset({"empty", "message limit"})


def queue_depths(env_name: str, sqs: Any) -> list[dict[str, Any]]:
    """Depth (visible, in flight) of every fallback queue and of its subscription's DLQ (what
    SNS could not deliver to it): the drain moves both."""
    from fabric.naming import fallback_queue_names

    rows = []
    for flow, group, queue in fallback_queue_names(env_name):
        for name in (queue, f"{queue}-sub-dlq"):
            rows.append(_depth(sqs, name, flow, group.value))
    return rows


def _depth(sqs: Any, name: str, flow: str, group: str) -> dict[str, Any]:
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return {
        "queue": name,
        "flow": flow,
        "group": group,
        "visible": int(attributes["ApproximateNumberOfMessages"]),
        "in_flight": int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    }


def drain(
    env_name: str,
    *,
    client: Callable[[str], Any],
    max_messages: int | None,
    dry_run: bool,
    out: TextIO,
) -> int:
    """The ``drain`` command; returns the exit status."""
    from fabric.naming import drain_function_name

    rows = queue_depths(env_name, client("sqs"))
    print(f"fallback queues of {env_name}:", file=out)
    for row in rows:
        print(
            f"  {row['queue']:40s} {row['visible']:7d} waiting {row['in_flight']:5d} in flight",
            file=out,
        )
    waiting = sum(row["visible"] for row in rows)
    if dry_run:
        print(
            f"dry run: a drain would move up to {waiting} message copies; nothing moved", file=out
        )
        return 0
    name = drain_function_name(env_name)
    event = {} if max_messages is None else {"max_messages": max_messages}
    print(f"invoking {name} {json.dumps(event)} ...", file=out)
    answer = client("lambda").invoke(
        FunctionName=name, InvocationType="RequestResponse", Payload=json.dumps(event).encode()
    )
    body = json.loads(answer["Payload"].read() or b"null")
    if answer.get("FunctionError") or not isinstance(body, dict) or "total" not in body:
        print(f"the drain function failed: {json.dumps(body)[:500]}", file=out)
        return 1
    for queue, moved in sorted(body["moved"].items()):
        print(f"  moved {moved:7d} into {queue}", file=out)
    refused, left = body.get("refused") or [], int(body.get("left") or 0)
    for queue in refused:  # full or stalled: its messages stay in SQS, the others were drained
        print(
            f"  {queue} refused messages (full or stalled?): they stay in the fallback queue",
            file=out,
        )
    misdelivered = int(body.get("misdelivered") or 0)
    if misdelivered:  # in ``left`` too
        print(
            f"  {misdelivered} cop{'y' if misdelivered == 1 else 'ies'} in a group's queue not "
            "published for that group: not moved (see FallbackMisdelivered)",
            file=out,
        )
    # ``left`` counts the copies this run received and did not move (they stay in SQS), not
    # what SQS still holds: copies no receive reached (the limits, or a stop) are not in it.
    print(
        f"summary: moved {body['total']}, received and not moved {left}, "
        f"stopped: {body['stopped']}",
        file=out,
    )
    return 0 if body["stopped"] in FINISHED and not refused and not left else 1


# Why a redrive chunk stops that means "go on with the next chunk" (when it moved something).
_REDRIVE_GOES_ON = frozenset({"message limit", "time limit"})


def redrive(
    env_name: str,
    *,
    client: Callable[[str], Any],
    request: dict[str, Any],
    chunk: int,
    out: TextIO,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """The ``redrive`` command; returns the exit status. Its chunks are one redrive (one
    ``redrive_id``: ``request["redrive_id"]`` goes on as an earlier command's, else a new one):
    a message it moved that is dead-lettered again is not moved again by a later chunk, but
    counted as parked again."""
    from fabric.naming import redrive_function_name
    from fabric.redrive import new_redrive_id

    name = redrive_function_name(env_name)
    redrive_id = request.get("redrive_id") or new_redrive_id()
    # How to go on where this command stopped without sending round again what it moved.
    go_on = f"go on as the same redrive with the same command and: --redrive-id {redrive_id}"
    wanted = int(request.get("max_messages", 1000))
    rate = request.get("rate_per_s")
    dry_run = bool(request.get("dry_run"))
    started = clock()
    moved = already = parked_again = hidden = 0
    print(f"redrive {redrive_id} of {request['queue']} via {name}", file=out)
    while True:
        event = {**request, "redrive_id": redrive_id}
        if not dry_run:
            event["max_messages"] = min(chunk, wanted - moved - already)
        try:
            if rate is not None:
                # A chunk paces itself from its own start, at full speed at first: chunks back
                # to back went faster than --rate (a chunk smaller than a second's worth).
                ahead = moved / rate - (clock() - started)
                if ahead > 0:
                    sleep(ahead)
            answer = client("lambda").invoke(
                FunctionName=name,
                InvocationType="RequestResponse",
                Payload=json.dumps(event).encode(),
            )
            body = json.loads(answer["Payload"].read() or b"null")
        except BaseException:
            # An AWS error (``main`` prints it) or Ctrl-C: a chunk may have moved letters, or
            # still be moving them; a new redrive would move their copies parked again.
            if not dry_run:
                print(f"interrupted: {go_on}", file=out)
            raise
        if answer.get("FunctionError") or not isinstance(body, dict) or "error" in body:
            print(f"the redrive function refused or failed: {json.dumps(body)[:500]}", file=out)
            if isinstance(body, dict) and "error" in body:
                return 2
            if not dry_run:
                print(go_on, file=out)
            return 1
        if body["dry_run"]:
            return _redrive_listed(body, out)
        moved += body["moved"]
        already += body["already_moved"]
        # Each chunk counts the parked-again letters it met; they stay, so a later chunk that
        # walks the whole DLQ meets them again (not a sum: the most any chunk met).
        parked_again = max(parked_again, body["parked_again"])
        # Letters a chunk held and could not show again: later chunks do not see them, so
        # their "empty" is not the end of the DLQ. (An older function does not say.)
        hidden += body.get("hidden", 0)
        stopped = body["stopped"]
        rate_now = moved / max(clock() - started, 1e-9)
        print(
            f"progress: moved {moved}/{wanted} from {body['queue']}"
            f" ({already} left over from an earlier run removed), {rate_now:.0f} msg/s,"
            f" {body['parked_again']} parked again, this run stopped: {stopped}",
            file=out,
        )
        if stopped not in _REDRIVE_GOES_ON or moved + already >= wanted:
            break
        if not body["moved"] and not body["already_moved"]:
            # Matching letters neither moved nor removed (a DLQ that refuses deletes): another
            # chunk would do the same, for ever.
            print("  this run moved and removed nothing: stopping", file=out)
            stopped = "no progress"
            break
    return _redrive_moved(
        body,
        moved=moved,
        parked_again=parked_again,
        hidden=hidden,
        stopped=stopped,
        go_on=go_on,
        out=out,
    )


def _redrive_moved(
    body: dict[str, Any],
    *,
    moved: int,
    parked_again: int,
    hidden: int,
    stopped: str,
    go_on: str,
    out: TextIO,
) -> int:
    """Print how a redrive that moved letters ended, with how to go on where it stopped;
    the exit status. ``body``: its last chunk's answer."""
    _print_letters([item for item in body["listed"] if item["stays"]], out)
    _print_left(body, out)
    if parked_again:
        print(
            f"{parked_again} letter(s) were parked again while this redrive ran: the cause is"
            f" not fixed. They stay in {body['queue']}, each moved once (docs/dead-letters.md);"
            " once it is fixed, a new redrive (the same command without --redrive-id) moves"
            " them: this one never moves them again",
            file=out,
        )
    if hidden:
        print(
            f"{hidden} letter(s) stay hidden in {body['queue']} until their hold ends (16"
            " minutes): the DLQ did not show them again after a chunk, so the chunks after it"
            " did not see them. Once they are back, go on as this redrive (below)",
            file=out,
        )
    print(f"summary: moved {moved}, stopped: {stopped}", file=out)
    if stopped == "message limit":
        # --max-messages reached: no chunk walked the DLQ to its end. Not a failure (exit 0
        # when nothing else is wrong), but no sign either that nothing was parked again.
        print(
            "stopped at --max-messages: letters behind were not looked at, so letters parked"
            f" again there are not counted; {go_on}",
            file=out,
        )
    elif (stopped not in FINISHED and stopped != "parked again") or hidden:
        print(go_on, file=out)  # a chunk stopped early, made no progress, or left letters hidden
    finished = stopped in FINISHED and not hidden
    return 0 if finished and not body["left"] and not parked_again else 1


def _redrive_listed(body: dict[str, Any], out: TextIO) -> int:
    """Print a dry run's answer; the exit status (1 when it could not look at every letter).
    Given a ``--redrive-id``, it lists the letters that redrive moved and that were parked again
    (``stays: parked again by this redrive``) and counts them: it never moves them again."""
    print(f"dry run on {body['queue']}: {body['matched']} of {body['scanned']} match", file=out)
    _print_letters(body["listed"], out)
    unlisted = body["matched"] + body["left"] + body["parked_again"] - len(body["listed"])
    if unlisted > 0:
        print(f"  ... and {unlisted} more", file=out)
    _print_left(body, out)
    if body.get("hidden"):
        print(
            f"{body['hidden']} letter(s) this dry run looked at stay hidden in {body['queue']}"
            " until their hold ends (16 minutes): the DLQ did not show them again, so a redrive"
            " started before then does not see them",
            file=out,
        )
    if body["parked_again"]:
        print(
            f"{body['parked_again']} letter(s) were parked again after redrive"
            f" {body['redrive_id']} moved them: the cause is not fixed. They stay in"
            f" {body['queue']}: that redrive never moves them again; once it is fixed, a new"
            " redrive (the same command without --redrive-id) moves them",
            file=out,
        )
    # "parked again": it looked at every letter, and only those parked again are left.
    if body["stopped"] not in FINISHED and body["stopped"] != "parked again":
        # Not every letter was looked at: "0 of 0 match" must not read as an empty queue.
        print(f"nothing moved; the listing is incomplete, stopped: {body['stopped']}", file=out)
        return 1
    print("nothing moved", file=out)
    return 0


def _print_letters(listed: list[dict[str, Any]], out: TextIO) -> None:
    for item in listed:
        age = "?" if item["age_s"] is None else f"{item['age_s']:.0f}s"
        where = f"stays: {item['stays']}" if item["stays"] else f"-> {item['origin']}"
        print(
            f"  {item['message_id']}  {item['topic']}  {item['reason']}  age {age}"
            f"  redrives {item['redrives']}  {where}",
            file=out,
        )


def _print_left(body: dict[str, Any], out: TextIO) -> None:
    if body["left"]:
        print(
            f"{body['left']} matching letter(s) cannot go back by themselves and stay in"
            f" {body['queue']} (docs/dead-letters.md)",
            file=out,
        )


# -- replay ------------------------------------------------------------------------------------

# Why a replay chunk stops that means "go on with the next chunk".
_REPLAY_GOES_ON = frozenset({"message limit", "time limit"})
_REPLAY_PROBLEMS = ("unsealed", "missing_body", "corrupt", "unreadable", "refused", "failed")
_REPLAY_LISTED = 100


def replay(
    env_name: str,
    *,
    client: Callable[[str], Any],
    request: dict[str, Any],
    chunk: int,
    out: TextIO,
    max_messages: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """The ``replay`` command; returns the exit status. ``max_messages`` bounds the whole
    replay (None: everything the period holds), ``chunk`` one invocation."""
    import uuid

    from fabric.naming import replay_function_name

    name = replay_function_name(env_name)
    replay_id = request.get("replay_id") or str(uuid.uuid4())
    dry_run = bool(request.get("dry_run"))
    cursor = request.get("after")
    totals = dict.fromkeys(("replayed", "would_replay", *_REPLAY_PROBLEMS), 0)
    finished = listed = 0
    held: list[str] = []  # acceptances not sealed yet: the cursor passes them
    started = clock()
    body: dict[str, Any] = {}
    print(f"replay {replay_id} of {request['start']} .. {request['end']} via {name}", file=out)
    while max_messages is None or finished < max_messages:
        event = {**request, "replay_id": replay_id}
        if cursor is not None:
            event["after"] = cursor
        event["max_messages"] = (
            chunk if max_messages is None else min(chunk, max_messages - finished)
        )
        answer = client("lambda").invoke(
            FunctionName=name, InvocationType="RequestResponse", Payload=json.dumps(event).encode()
        )
        body = json.loads(answer["Payload"].read() or b"null")
        if answer.get("FunctionError") or not isinstance(body, dict) or "error" in body:
            print(f"the replay function refused or failed: {json.dumps(body)[:500]}", file=out)
            if isinstance(body, dict) and "error" in body:
                return 2
            _resume_hint(replay_id, cursor, out)
            return 1
        for key in totals:
            totals[key] += body.get(key, 0)  # "unsealed": absent from an older function
        progress = (
            body["replayed"]
            + body["would_replay"]
            + sum(body.get(key, 0) for key in _REPLAY_PROBLEMS if key != "failed")
        )
        finished += progress
        _print_problems(body, out)
        held += [p["message_id"] for p in body["problems"] if p["outcome"] == "unsealed"]
        if dry_run:
            listed = _list_would_replay(body, listed, out)
        moved = body["cursor"] is not None and (
            cursor is None or _position(body["cursor"]) != _position(cursor)
        )
        cursor = body["cursor"] or cursor
        rate = totals["replayed"] / max(clock() - started, 1e-9)
        done = totals["would_replay"] if dry_run else totals["replayed"]
        print(
            f"progress: {'would replay' if dry_run else 'replayed'} {done}"
            f" of {body['selected']} selected, {body['remaining']} to go,"
            f" {sum(totals[key] for key in _REPLAY_PROBLEMS)} not replayable or failed,"
            f" {rate:.0f} msg/s, this run stopped: {body['stopped']}",
            file=out,
        )
        if body["stopped"] not in _REPLAY_GOES_ON:
            break
        # Reading and verifying the period took the whole run: no end to it. (A run that kept
        # only messages done before its cursor moves the cursor past them: that is progress.)
        if not progress and not moved:
            print(f"  a run finished no message within its time:{_TOO_LONG[1:]}", file=out)
            body["stopped"] = "no progress"
            break
    stopped = body.get("stopped", "message limit")
    _replay_summary(replay_id, totals, stopped, dry_run=dry_run, listed=listed, out=out)
    # Reaching --max-messages mid-chunk ends the last chunk on its time or message limit, which
    # is no failure; any other stop (broker, archive, audit) is one, bounded or not.
    bounded = max_messages is not None and finished >= max_messages
    failed = stopped not in ("done", "message limit") and not (
        bounded and stopped in _REPLAY_GOES_ON
    )
    # A resume also where --max-messages left the rest.
    _next_step(replay_id, cursor, stopped, failed or bool(body.get("remaining")), out)
    _held_hint(replay_id, [] if dry_run else held, out)
    problems = sum(totals[key] for key in _REPLAY_PROBLEMS)
    return 1 if failed or (problems and not dry_run) else 0


def _replay_summary(
    replay_id: str,
    totals: dict[str, int],
    stopped: str,
    *,
    dry_run: bool,
    listed: int,
    out: TextIO,
) -> None:
    if dry_run and listed > _REPLAY_LISTED:
        print(f"  ... and {listed - _REPLAY_LISTED} more", file=out)
    print(
        f"summary: replay {replay_id}: "
        + ("would replay" if dry_run else "replayed")
        + f" {totals['would_replay'] if dry_run else totals['replayed']},"
        + "".join(f" {key.replace('_', ' ')} {totals[key]}," for key in _REPLAY_PROBLEMS)
        + f" stopped: {stopped}"
        + (" (nothing published)" if dry_run else ""),
        file=out,
    )


def _held_hint(replay_id: str, held: list[str], out: TextIO) -> None:
    """How to replay the acceptances held back as not sealed yet (the cursor passed them)."""
    if held:
        print(
            f"{len(held)} acceptance(s) were not sealed yet; after the next checkpoint (hourly),"
            f" replay them with the same --start and --end and: --replay-id {replay_id} "
            + " ".join(f"--message-id {message_id}" for message_id in held),
            file=out,
        )


def _list_would_replay(body: dict[str, Any], listed: int, out: TextIO) -> int:
    """Print a dry-run chunk's messages, up to ``_REPLAY_LISTED`` in all; how many were
    listed so far."""
    for item in body["messages"][: max(0, _REPLAY_LISTED - listed)]:
        print(
            f"  would replay {item['message_id']}  {item['at']}  {item['topic']}"
            f"  -> {', '.join(item.get('groups', [])) or 'unrouted'}",
            file=out,
        )
    return listed + len(body["messages"])


def _print_problems(body: dict[str, Any], out: TextIO) -> None:
    """What a replay chunk could not do: the trail's problems (it is verified first), then
    each message that cannot be replayed."""
    for problem in body.get("trail_problems", ()):  # absent from a function older than this
        print(f"  trail does not verify: {problem}", file=out)
    for gap in body.get("trail_incomplete", ()):
        print(f"  trail incomplete (replayed anyway): {gap}", file=out)
    for item in body["problems"]:
        print(
            f"  {item['outcome']:12s} {item['message_id']}  {item['at']}  {item['topic']}"
            f"  {item.get('detail', '')}",
            file=out,
        )


_TOO_LONG = (
    "  the period is too large to read and verify in one invocation; nothing more was"
    " replayed: replay it in shorter periods"
)


def _next_step(
    replay_id: str, cursor: dict[str, str] | None, stopped: str, unfinished: bool, out: TextIO
) -> None:
    """What to run next: shorter periods when a run could not read its period (the same
    command stops again), each under the same replay id and behind the cursor, else where to
    resume an ``unfinished`` replay, except when its trail does not verify (find why before
    replaying anything of it)."""
    if stopped == "period too long":  # the function ran out of time reading the period
        print(_TOO_LONG, file=out)
    if stopped in ("period too long", "no progress"):
        after = "" if cursor is None else f" --after {cursor['at']},{cursor['message_id']}"
        print(
            f"replay shorter periods of it (--start, --end), each with: --replay-id {replay_id}"
            f"{after}",
            file=out,
        )
    elif unfinished and stopped != "trail not verified":
        _resume_hint(replay_id, cursor, out)


def _resume_hint(replay_id: str, cursor: dict[str, str] | None, out: TextIO) -> None:
    after = "" if cursor is None else f" --after {cursor['at']},{cursor['message_id']}"
    print(f"resume with the same command and: --replay-id {replay_id}{after}", file=out)


def _position(cursor: Mapping[str, str]) -> tuple[datetime, str]:
    """Where a cursor stands, whatever its spelling: the instant and the message id as the
    replay function reads them. A hand-typed ``--after`` may spell the function's
    ``2026-12-01T02:13:07.120Z`` as ``...07.12+00:00``, ``...07.120z`` or in another offset,
    and a ULID in lowercase; compared as text, a first chunk that did not move the cursor
    would read as progress, and "no progress" would cost a chunk more."""
    from fabric.envelope import normalize_message_id, parse_timestamp

    message_id = cursor["message_id"]
    return parse_timestamp(cursor["at"]), normalize_message_id(message_id) or message_id


def _cursor(text: str) -> dict[str, str]:
    """``--after AT,MESSAGE_ID``, checked as the function checks it: a typo is a usage error
    that names ``--after``, before anything is invoked."""
    from fabric.envelope import normalize_message_id, parse_timestamp

    at, _, message_id = text.rpartition(",")
    if not at or not message_id:
        raise argparse.ArgumentTypeError("a cursor is AT,MESSAGE_ID as a stopped replay prints it")
    try:
        parse_timestamp(at)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"a cursor's AT must be RFC 3339 with a time zone: {exc}"
        ) from None
    if normalize_message_id(message_id) is None:
        raise argparse.ArgumentTypeError(
            f"a cursor's MESSAGE_ID must be a UUID or a ULID, not {message_id!r}"
        )
    return {"at": at, "message_id": message_id}


def _replay_request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"start": args.start, "end": args.end, "dry_run": args.dry_run}
    if args.include_unsealed:
        request["include_unsealed"] = True
    optional = {
        "topics": args.topic,
        "message_ids": args.message_id,
        "source": args.source,
        "rate_per_s": args.rate,
        "replay_id": args.replay_id,
        "after": args.after,
        "late_days": args.late_days,
    }
    request.update({key: value for key, value in optional.items() if value is not None})
    return request


def verify(
    *,
    bucket: str,
    signing_keys: Sequence[str],
    writer: str,
    client: Callable[[str], Any],
    out: TextIO,
) -> int:
    """The ``verify`` command; returns the exit status (0 verified, 1 not)."""
    from fabric.adapters.audit_storage import S3ObjectStore
    from fabric.adapters.kms_signer import kms_keyring
    from fabric.audit_chain import verify_intervals

    s3, kms = client("s3"), client("kms")
    store = S3ObjectStore(bucket, lambda: s3)
    # The checkpoints first: an object the writer writes and seals between the two listings is
    # then listed after the last checkpoint listed (listed the other way round, it would be
    # named by a checkpoint and not listed).
    sealed = store.keys(f"checkpoints/{writer}/")
    keys = store.keys(f"audit/{writer}/")
    # Object Lock does not refuse a plain DeleteObject: it adds a delete marker, and listings
    # and reads no longer show the key (its locked versions stay). The trail left could verify
    # without a hidden tail object or last checkpoint, so the markers are looked for here.
    deleted = store.deleted(f"audit/{writer}/") + store.deleted(f"checkpoints/{writer}/")
    print(f"reading {len(keys)} objects of {writer} from s3://{bucket} ...", file=out)
    if deleted:  # also when they hide the whole trail: not just "no trail"
        print(
            f"NOT VERIFIED: {len(deleted)} key(s) of {writer} deleted after they were written"
            " (a delete marker among their versions):",
            file=out,
        )
        for key in deleted:
            print(f"  {key}", file=out)
        return 1
    if not keys and not sealed:  # a mistyped writer or bucket must not read as "verified"
        print(f"NOT VERIFIED: no trail under audit/{writer}/ in s3://{bucket}", file=out)
        return 1
    # One checkpoint's objects at a time: a trail of years does not fit in memory at once.
    result = verify_intervals(
        object_keys=keys,
        checkpoint_keys=sealed,
        read=store.read,
        keys=kms_keyring(signing_keys, lambda: kms),
        writer=writer,
    )
    print(
        f"{result.records} records, {result.objects} objects, {result.checkpoints} checkpoints",
        file=out,
    )
    if result.problem is not None:
        print(f"NOT VERIFIED: {result.problem.where}: {result.problem.why}", file=out)
        return 1
    print("verified: signatures, chains, Merkle roots and sequence all hold", file=out)
    return 0


def _stack_output(client: Callable[[str], Any], stack: str, name: str) -> str:
    (described,) = client("cloudformation").describe_stacks(StackName=stack)["Stacks"]
    for output in described.get("Outputs", []):
        if output["OutputKey"] == name:
            return str(output["OutputValue"])
    raise LookupError(f"stack {stack} has no output {name}: pass it explicitly")


def _age(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.replace(".", "", 1).isdigit() or float(number) <= 0:
        raise argparse.ArgumentTypeError("an age is a positive number with s, m, h or d")
    return float(number) * units[unit]


def _redrive_request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {
        "source": args.source,
        "queue": args.queue,
        "dry_run": args.dry_run,
        "max_messages": args.max_messages,
    }
    optional = {
        "topics": args.topic,
        "reasons": args.reason,
        "message_ids": args.message_id,
        "older_than_s": args.older_than,
        "newer_than_s": args.newer_than,
        "rate_per_s": args.rate,
        "redrive_id": args.redrive_id,
    }
    request.update({key: value for key, value in optional.items() if value})
    return request


def _redrive_id(text: str) -> str:
    """``--redrive-id``, checked as the function checks it: a typo is a usage error that names
    ``--redrive-id``, before anything is invoked."""
    from fabric.redrive import REDRIVE_ID_RE

    if not REDRIVE_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            "a redrive id is what a redrive's first line prints (1 to 64 of A-Z a-z 0-9 . _ : -)"
        )
    return text


def _add_replay_command(commands: Any) -> None:
    replay_parser = commands.add_parser(
        "replay", help="re-publish archived messages of a period, marked as replays"
    )
    replay_parser.add_argument("--env", required=True, help="dev, staging or prod (cdk.json)")
    replay_parser.add_argument("--start", required=True, help="RFC 3339, inclusive")
    replay_parser.add_argument("--end", required=True, help="RFC 3339, exclusive")
    replay_parser.add_argument("--topic", action="append", help="topic pattern (* and #)")
    replay_parser.add_argument("--message-id", action="append", help="exact message id")
    replay_parser.add_argument("--source", help="the stakeholder group that published it")
    replay_parser.add_argument(
        "--max-messages", type=_positive, help="bound the whole replay (default: all)"
    )
    replay_parser.add_argument("--rate", type=_positive, help="at most N messages a second")
    replay_parser.add_argument("--chunk", type=_positive, default=500)
    replay_parser.add_argument("--dry-run", action="store_true", help="list, publish nothing")
    replay_parser.add_argument("--replay-id", help="resume this replay (default: a new id)")
    replay_parser.add_argument("--after", type=_cursor, help="resume behind AT,MESSAGE_ID")
    replay_parser.add_argument(
        "--late-days", type=int, help="search objects written up to N days after --end (1)"
    )
    replay_parser.add_argument(
        "--include-unsealed",
        action="store_true",
        help="also replay what was written after the last checkpoint (hash chain only)",
    )


# -- topology --------------------------------------------------------------------------------

# A diff's groups, in apply's order, as the command prints them.
_TOPOLOGY_GROUPS = (
    ("missing", "missing"),
    ("changed", "changed"),
    ("needs_recreate", "needs recreating"),
    ("obsolete", "obsolete"),
    ("extra", "extra (left alone)"),
)


def topology(
    env_name: str, *, client: Callable[[str], Any], request: dict[str, Any], out: TextIO
) -> int:
    """The ``topology`` command through the deployed topology function; returns the exit status
    (0 in sync or all applied, 1 differences, not all applied or failed, 2 refused)."""
    from fabric.naming import topology_function_name

    body = _invoke(
        client, topology_function_name(env_name), request, out, answers="action", kind="topology"
    )
    return body if isinstance(body, int) else _print_topology(body, out)


def _invoke(
    client: Callable[[str], Any],
    name: str,
    request: dict[str, Any],
    out: TextIO,
    *,
    answers: str,
    kind: str,
) -> dict[str, Any] | int:
    """Invoke the function ``name`` with ``request``: its answer (a JSON object holding
    ``answers``), or the exit status once it refused the request (2) or failed (1)."""
    print(f"invoking {name} {json.dumps(request)} ...", file=out)
    answer = client("lambda").invoke(
        FunctionName=name, InvocationType="RequestResponse", Payload=json.dumps(request).encode()
    )
    body = json.loads(answer["Payload"].read() or b"null")
    if not answer.get("FunctionError") and isinstance(body, dict) and "error" in body:
        print(f"refused: {body['error']}", file=out)
        return 2
    if answer.get("FunctionError") or not isinstance(body, dict) or answers not in body:
        print(f"the {kind} function failed: {json.dumps(body)[:500]}", file=out)
        return 1
    return body


def topology_local(
    url: str,
    *,
    vhost: str,
    request: dict[str, Any],
    environ: Mapping[str, str],
    out: TextIO,
) -> int:
    """The ``topology`` command in-process against the management API at ``url``: the
    administrator from ``FABRIC_MANAGEMENT_USER`` / ``FABRIC_MANAGEMENT_PASSWORD``, the broker
    users' passwords from the JSON file ``FABRIC_USER_PASSWORDS_FILE`` (apply needs it: users
    are broker-wide, and a password this command made up would lock their owners out).
    Returns the exit status as ``topology`` does.

    Raises:
        ManagementApiError: the management API failed.
    """
    from fabric.adapters.management import ManagementClient
    from fabric.errors import ConfigError
    from fabric.topology_resource import parse_request, run_request

    parsed = parse_request(request)
    user, password = (environ.get(f"FABRIC_MANAGEMENT_{key}") for key in ("USER", "PASSWORD"))
    if not user or not password:
        print(
            "refused: set FABRIC_MANAGEMENT_USER and FABRIC_MANAGEMENT_PASSWORD to the broker"
            " administrator's (never on the command line)",
            file=out,
        )
        return 2
    try:
        passwords = _user_passwords(environ.get("FABRIC_USER_PASSWORDS_FILE"))
        if parsed.action == "apply" and passwords is None:
            raise ConfigError(
                "apply creates and updates the broker's users (broker-wide): give their"
                " passwords in the JSON file named by FABRIC_USER_PASSWORDS_FILE"
            )
        client = ManagementClient(url, user, password)
        print(f"{parsed.action} on {url}, vhost {vhost!r}, as {user} ...", file=out)
        if passwords is None:
            print("  no FABRIC_USER_PASSWORDS_FILE: users compared by tags only", file=out)
        body = run_request(parsed, client, vhost, passwords=passwords)
    except ConfigError as exc:
        print(f"refused: {exc}", file=out)
        return 2
    return _print_topology(body, out)


def _user_passwords(path: str | None) -> dict[str, str] | None:
    """``{"user": "password", ...}`` from the file; None without one.

    Raises:
        ConfigError: the file cannot be read or is not such an object (no value is named).
    """
    from fabric.errors import ConfigError

    if not path:
        return None
    try:
        passwords = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"FABRIC_USER_PASSWORDS_FILE {path}: {type(exc).__name__}") from None
    if not isinstance(passwords, dict) or not all(
        isinstance(value, str) and value for value in passwords.values()
    ):
        raise ConfigError(
            f"FABRIC_USER_PASSWORDS_FILE {path}: must be a JSON object of user -> password"
        )
    return {str(name): value for name, value in passwords.items()}


def _print_topology(body: dict[str, Any], out: TextIO) -> int:
    vhost = body["vhost"]
    if body["action"] == "diff":
        for key, label in _TOPOLOGY_GROUPS:
            for item in body[key]:
                print(f"  {label:18s} {_topology_item(item)}", file=out)
        counts = ", ".join(f"{len(body[key])} {label}" for key, label in _TOPOLOGY_GROUPS)
        print(f"summary: vhost {vhost!r}: {counts}", file=out)
        if body["needs_recreate"]:
            print(_RECREATE_HINT, file=out)
        if body["in_sync"]:
            print("in sync: apply would change nothing", file=out)
            return 0
        return 1
    for item in body["applied"]:
        print(f"  {item['kind']:18s} {_topology_item(item)}", file=out)
    for item in body["extra"]:
        print(f"  {'extra (left alone)':18s} {_topology_item(item)}", file=out)
    if body["conflict"]:
        for item in body["needs_recreate"]:
            print(f"  {'needs recreating':18s} {_topology_item(item)}", file=out)
        print(f"NOT APPLIED: {body['conflict']}", file=out)
        print(_RECREATE_HINT, file=out)
        print(
            f"summary: vhost {vhost!r}: nothing applied (apply checks before it changes)", file=out
        )
        return 1
    print(
        f"summary: vhost {vhost!r}: applied {len(body['applied'])} change(s),"
        f" {len(body['extra'])} extra left alone",
        file=out,
    )
    return 0


_RECREATE_HINT = (
    "an exchange or queue that needs recreating cannot change in place: empty the queue first,"
    " then `topology apply --recreate-empty` (it recreates only queues the broker shows empty;"
    " docs/runbook.md)"
)


def _topology_item(item: dict[str, Any]) -> str:
    text = f"{item['resource']} {item['name']!r}"
    differences = item.get("differences") or {}
    if differences:
        text += ": " + ", ".join(
            f"{key} {current!r} -> {wanted!r}" for key, (current, wanted) in differences.items()
        )
    return text


def _add_topology_command(commands: Any) -> None:
    topology_parser = commands.add_parser(
        "topology", help="compare or apply the broker topology the routing table generates"
    )
    actions = topology_parser.add_subparsers(dest="action", required=True)
    for action, what in (
        ("diff", "what apply would change; changes nothing"),
        ("apply", "bring the broker to the routing table's topology"),
    ):
        parser = actions.add_parser(action, help=what)
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument("--env", help="invoke fabric-<env>-topology (dev, staging or prod)")
        where.add_argument(
            "--management-url",
            help="run here against this management API (http://127.0.0.1:15672)",
        )
        parser.add_argument("--vhost", help="with --management-url: the vhost (default /)")
        if action == "apply":
            parser.add_argument(
                "--recreate-empty",
                action="store_true",
                help="delete and declare again what cannot change in place (queues only if empty)",
            )
            parser.add_argument("--dry-run", action="store_true", help="the same as diff")


def _topology_here(args: argparse.Namespace, out: TextIO) -> int:
    from fabric.errors import ManagementApiError

    try:
        return topology_local(
            args.management_url,
            vhost=args.vhost or "/",
            request=_topology_request(args),
            environ=os.environ,
            out=out,
        )
    except ManagementApiError as exc:
        print(f"management API error: {exc}", file=out)
        return 1


def _topology_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.env is not None and args.vhost is not None:
        sys.stderr.write(
            f"runbook topology {args.action}: --vhost goes with --management-url"
            " (the function applies its environment's vhost)\n"
        )
        raise SystemExit(2)
    if args.action == "apply" and args.dry_run:
        return {"action": "diff"}
    request: dict[str, Any] = {"action": args.action}
    if args.action == "apply" and args.recreate_empty:
        request["recreate_empty"] = True
    return request


# -- report ----------------------------------------------------------------------------------


def report(
    env_name: str, *, client: Callable[[str], Any], request: dict[str, Any], out: TextIO
) -> int:
    """The ``report`` command; returns the exit status (0 verified, 1 not or failed, 2 refused)."""
    from fabric.compliance_run import report_function_name

    body = _invoke(
        client, report_function_name(env_name), request, out, answers="verified", kind="report"
    )
    if isinstance(body, int):
        return body
    period = body["period"]
    print(f"compliance report of {env_name}, {period['start']} to {period['end']}", file=out)
    for label, value in (
        ("records", body["records"]),
        ("accepted", body["accepted"]),
        ("rejected", body["rejected"]),
        ("delivered", body["delivered"]),
        ("acceptance rate", _share(body["acceptance_rate"])),
        ("delivery success rate", _share(body["delivery_success_rate"])),
        ("copies not delivered", body["copies_undelivered"]),
        ("emergencies accepted", body["emergencies_accepted"]),
        ("emergency copies not del.", body["emergency_copies_undelivered"]),
        ("emergency latency p99", _milliseconds(body["emergency_latency_p99_ms"])),
        ("encryption coverage", _share(body["encryption_coverage"])),
        ("fallback not drained", body["fallback_not_drained"]),
        ("dead-lettered", body["dead_lettered"]),
        (
            "objects read / unlocked",
            f"{body['objects']} / {body['unlocked_objects']}"
            f" (retention expired: {body['expired_objects']})",
        ),
        ("earliest retain-until", body["earliest_retain_until"]),
    ):
        print(f"  {label:26s} {value}", file=out)
    files = body["report"]
    for kind in ("html", "json", "csv"):
        print(f"  {kind:26s} s3://{files['bucket']}/{files[kind]}", file=out)
    if not body["verified"]:
        print(f"NOT VERIFIED: {body['problem']}", file=out)
        return 1
    print("summary: verified; report written and published to the compliance topic", file=out)
    return 0


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f} %"


def _milliseconds(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.1f} ms"


def _report_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.start or args.end:
        if not (args.start and args.end) or args.date:
            sys.stderr.write("runbook report: give --date, or both --start and --end\n")
            raise SystemExit(2)
        return {"start": args.start, "end": args.end}
    if args.date:
        return {"date": args.date}
    from datetime import UTC, datetime, timedelta

    return {"date": f"{datetime.now(UTC).date() - timedelta(days=1)}"}


def _add_report_command(commands: Any) -> None:
    report_parser = commands.add_parser("report", help="the compliance report of a period")
    report_parser.add_argument("--env", required=True, help="dev, staging or prod (cdk.json)")
    report_parser.add_argument("--date", help="a UTC day, YYYY-MM-DD (default: yesterday)")
    report_parser.add_argument("--start", help="RFC 3339 with a time zone, inclusive")
    report_parser.add_argument("--end", help="RFC 3339 with a time zone, exclusive")


def _add_verify_command(commands: Any) -> None:
    verify_parser = commands.add_parser("verify", help="verify an audit trail")
    verify_parser.add_argument("--env", required=True, help="dev, staging or prod (cdk.json)")
    verify_parser.add_argument("--writer", help="the chain (default fabric-<env>-audit-writer)")
    verify_parser.add_argument("--bucket", help="the audit bucket (default: stack output)")
    verify_parser.add_argument(
        "--signing-key",
        action="append",
        help="a trusted checkpoint-signing key; once per key, oldest first (default: stack output)",
    )


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:  # noqa: PLR0911 (a dispatcher: one return per command)
    """Parse the command line and run one command."""
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="runbook", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    drain_parser = commands.add_parser("drain", help="move fallback messages back into RabbitMQ")
    drain_parser.add_argument("--env", required=True, help="dev, staging or prod (cdk.json)")
    drain_parser.add_argument("--max-messages", type=_positive, default=None)
    drain_parser.add_argument("--dry-run", action="store_true", help="only show the queues")
    redrive_parser = commands.add_parser(
        "redrive", help="move dead letters back where they came from"
    )
    redrive_parser.add_argument("--env", required=True, help="dev, staging or prod (cdk.json)")
    redrive_parser.add_argument("--source", required=True, choices=["rabbitmq", "sqs"])
    redrive_parser.add_argument(
        "--queue", required=True, help="the dead-letter queue, or fabric.overflow"
    )
    redrive_parser.add_argument("--topic", action="append", help="topic pattern (* and #)")
    redrive_parser.add_argument("--reason", action="append", help="dead-letter reason")
    redrive_parser.add_argument("--message-id", action="append", help="exact message id")
    redrive_parser.add_argument("--older-than", type=_age, help="dead-lettered at least AGE ago")
    redrive_parser.add_argument("--newer-than", type=_age, help="dead-lettered at most AGE ago")
    redrive_parser.add_argument("--max-messages", type=_positive, default=1000)
    redrive_parser.add_argument("--rate", type=_positive, help="at most N messages a second")
    redrive_parser.add_argument("--chunk", type=_positive, default=500)
    redrive_parser.add_argument("--dry-run", action="store_true", help="list, move nothing")
    redrive_parser.add_argument(
        "--redrive-id", type=_redrive_id, help="go on as this redrive (default: a new id)"
    )
    _add_replay_command(commands)
    _add_report_command(commands)
    _add_topology_command(commands)
    _add_verify_command(commands)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from botocore.exceptions import BotoCoreError, ClientError

    from fabric.errors import TransportUnavailable

    if args.command == "topology" and args.env is None:
        return _topology_here(args, out)
    from stacks.config import ConfigError, load_app_config, read_cdk_context

    try:
        context = {**read_cdk_context(ROOT), "env": args.env}
        (environment,) = load_app_config(context).environments
        region = environment.region
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=out)
        return 2

    def client(service: str) -> Any:
        return _client(service, region)

    try:
        if args.command == "verify":
            stack = f"{args.env}-Stateful"
            return verify(
                bucket=args.bucket or _stack_output(client, stack, "AuditBucketName"),
                signing_keys=args.signing_key
                or _stack_output(client, stack, "TrustedSigningKeyArns").split(","),
                writer=args.writer or f"fabric-{args.env}-audit-writer",
                client=client,
                out=out,
            )
        if args.command == "report":
            return report(args.env, client=client, request=_report_request(args), out=out)
        if args.command == "topology":
            return topology(args.env, client=client, request=_topology_request(args), out=out)
        if args.command == "replay":
            return replay(
                args.env,
                client=client,
                request=_replay_request(args),
                chunk=args.chunk,
                max_messages=args.max_messages,
                out=out,
            )
        if args.command == "redrive":
            return redrive(
                args.env, client=client, request=_redrive_request(args), chunk=args.chunk, out=out
            )
        return drain(
            args.env, client=client, max_messages=args.max_messages, dry_run=args.dry_run, out=out
        )
    except (BotoCoreError, ClientError, TransportUnavailable, LookupError) as exc:
        print(f"AWS error: {exc}", file=out)
        return 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive whole number")
    return value


def _client(service: str, region: str) -> Any:
    import boto3
    from botocore.config import Config

    # The drain function may run for up to 5 minutes, the redrive and the replay for 15: wait
    # for them, with TCP keepalives so a quiet connection is not dropped on the way. An invoke
    # is never retried by the SDK: a retried replay chunk would run twice from the same cursor
    # (or be throttled while the first one runs on, unseen); the command says what to re-run.
    once = {"retries": {"total_max_attempts": 1}} if service == "lambda" else {}
    config = Config(read_timeout=930, tcp_keepalive=True, **once)
    return boto3.client(service, region_name=region, config=config)


if __name__ == "__main__":
    sys.exit(main())
