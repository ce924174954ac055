"""The operators' runbook CLI: one command per task, built on the fabric library.

    python scripts/runbook.py drain --env prod [--max-messages N] [--dry-run]
    python scripts/runbook.py redrive --env prod --source rabbitmq|sqs --queue NAME
        [--topic PATTERN]... [--reason R]... [--message-id ID]... [--older-than AGE]
        [--newer-than AGE] [--max-messages N] [--rate N] [--dry-run]
    python scripts/runbook.py verify --env prod [--writer NAME] [--bucket B] [--signing-key ARN]

``drain`` shows every fallback queue's depth and oldest message, then invokes the deployed
drain function (``fabric-<env>-drain``) once and prints what it moved and why it stopped. The
broker is private, so the drain runs inside the VPC and never from the operator's machine.
``--dry-run`` only shows the queues.

``redrive`` invokes the deployed redrive function (``fabric-<env>-redrive``) to move the dead
letters of one queue that match every given filter back to where they came from: a RabbitMQ DLQ
(``fabric.<group>[.emergency].dlq``) to its work queue, an SQS DLQ (give the source queue's or
the DLQ's name) to its source queue. ``--dry-run`` lists what would move and moves nothing. Long
runs go in chunks (``--chunk``, default 500 messages an invocation) with a progress line after
each; a re-run after an interruption never moves a letter twice (the function keeps a ledger).
AGE is a number with ``s``, ``m``, ``h`` or ``d``.

``verify`` reads one writer's audit trail (objects and checkpoints) from the audit bucket and
checks signatures, chains, Merkle roots and sequence gaps; on failure it names the first bad
record, object or checkpoint. The bucket and signing key come from the ``<env>-Stateful`` stack's
outputs unless given.

AWS credentials and the region come from the usual boto3 chain (``AWS_PROFILE``,
``AWS_REGION``); the region defaults to the environment's in cdk.json. Exit status: 0 done,
1 the run stopped early or failed, 2 bad usage, configuration or request.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
# Reasons a drain run stops that mean "all done" (anything else: look at the broker or SQS).
FINISHED = frozenset({"empty", "message limit"})


def queue_depths(env_name: str, sqs: Any) -> list[dict[str, Any]]:
    """Depth (visible, in flight) and age of the oldest message of every fallback queue."""
    from fabric.naming import fallback_queue_names

    rows = []
    for flow, group, name in fallback_queue_names(env_name):
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        attributes = sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        rows.append(
            {
                "queue": name,
                "flow": flow,
                "group": group.value,
                "visible": int(attributes["ApproximateNumberOfMessages"]),
                "in_flight": int(attributes["ApproximateNumberOfMessagesNotVisible"]),
            }
        )
    return rows


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
    print(f"summary: moved {body['total']}, stopped: {body['stopped']}", file=out)
    return 0 if body["stopped"] in FINISHED else 1


def redrive(
    env_name: str,
    *,
    client: Callable[[str], Any],
    request: dict[str, Any],
    chunk: int,
    out: TextIO,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """The ``redrive`` command; returns the exit status."""
    from fabric.naming import redrive_function_name

    name = redrive_function_name(env_name)
    wanted = int(request.get("max_messages", 1000))
    started = clock()
    moved = already = 0
    while True:
        event = dict(request)
        if not request.get("dry_run"):
            event["max_messages"] = min(chunk, wanted - moved - already)
        answer = client("lambda").invoke(
            FunctionName=name, InvocationType="RequestResponse", Payload=json.dumps(event).encode()
        )
        body = json.loads(answer["Payload"].read() or b"null")
        if answer.get("FunctionError") or not isinstance(body, dict) or "error" in body:
            print(f"the redrive function refused or failed: {json.dumps(body)[:500]}", file=out)
            return 2 if isinstance(body, dict) and "error" in body else 1
        if body["dry_run"]:
            print(
                f"dry run on {body['queue']}: {body['matched']} of {body['scanned']} match",
                file=out,
            )
            for item in body["listed"]:
                age = "?" if item["age_s"] is None else f"{item['age_s']:.0f}s"
                print(
                    f"  {item['message_id']}  {item['topic']}  {item['reason']}  age {age}"
                    f"  redrives {item['redrives']}  -> {item['origin']}",
                    file=out,
                )
            if body["matched"] > len(body["listed"]):
                print(f"  ... and {body['matched'] - len(body['listed'])} more", file=out)
            print("nothing moved", file=out)
            return 0
        moved += body["moved"]
        already += body["already_moved"]
        rate = moved / max(clock() - started, 1e-9)
        print(
            f"progress: moved {moved}/{wanted} from {body['queue']}"
            f" ({already} left over from an earlier run removed), {rate:.0f} msg/s,"
            f" this run stopped: {body['stopped']}",
            file=out,
        )
        if body["stopped"] != "message limit" or moved + already >= wanted:
            break
    print(f"summary: moved {moved}, stopped: {body['stopped']}", file=out)
    return 0 if body["stopped"] in FINISHED else 1


def verify(
    *, bucket: str, signing_key: str, writer: str, client: Callable[[str], Any], out: TextIO
) -> int:
    """The ``verify`` command; returns the exit status (0 verified, 1 not)."""
    from fabric.adapters.audit_storage import S3ObjectStore
    from fabric.adapters.kms_signer import KmsSigner
    from fabric.audit_chain import verify_trail

    s3, kms = client("s3"), client("kms")
    store = S3ObjectStore(bucket, lambda: s3)
    keys = store.keys(f"audit/{writer}/")
    print(f"reading {len(keys)} objects of {writer} from s3://{bucket} ...", file=out)
    result = verify_trail(
        objects={key: store.get(key) for key in keys},
        checkpoints=[(k, json.loads(store.get(k))) for k in store.keys(f"checkpoints/{writer}/")],
        signer=KmsSigner(signing_key, lambda: kms),
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
    return next(o["OutputValue"] for o in described["Outputs"] if o["OutputKey"] == name)


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
    }
    request.update({key: value for key, value in optional.items() if value})
    return request


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
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
    redrive_parser.add_argument("--queue", required=True, help="the dead-letter queue")
    redrive_parser.add_argument("--topic", action="append", help="topic pattern (* and #)")
    redrive_parser.add_argument("--reason", action="append", help="dead-letter reason")
    redrive_parser.add_argument("--message-id", action="append", help="exact message id")
    redrive_parser.add_argument("--older-than", type=_age, help="dead-lettered at least AGE ago")
    redrive_parser.add_argument("--newer-than", type=_age, help="dead-lettered at most AGE ago")
    redrive_parser.add_argument("--max-messages", type=_positive, default=1000)
    redrive_parser.add_argument("--rate", type=_positive, help="at most N messages a second")
    redrive_parser.add_argument("--chunk", type=_positive, default=500)
    redrive_parser.add_argument("--dry-run", action="store_true", help="list, move nothing")
    verify_parser = commands.add_parser("verify", help="verify an audit trail")
    verify_parser.add_argument("--env", required=True, help="dev, staging or prod (cdk.json)")
    verify_parser.add_argument("--writer", help="the chain (default fabric-<env>-audit-writer)")
    verify_parser.add_argument("--bucket", help="the audit bucket (default: stack output)")
    verify_parser.add_argument("--signing-key", help="the signing key (default: stack output)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from botocore.exceptions import BotoCoreError, ClientError

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
                signing_key=args.signing_key or _stack_output(client, stack, "SigningKeyArn"),
                writer=args.writer or f"fabric-{args.env}-audit-writer",
                client=client,
                out=out,
            )
        if args.command == "redrive":
            return redrive(
                args.env, client=client, request=_redrive_request(args), chunk=args.chunk, out=out
            )
        return drain(
            args.env, client=client, max_messages=args.max_messages, dry_run=args.dry_run, out=out
        )
    except (BotoCoreError, ClientError) as exc:
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

    # The drain function may run for up to 5 minutes, the redrive for 15: wait for them.
    return boto3.client(service, region_name=region, config=Config(read_timeout=930))


if __name__ == "__main__":
    sys.exit(main())
