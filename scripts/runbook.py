"""The operators' runbook CLI: one command per task, built on the fabric library.

    python scripts/runbook.py drain --env prod [--max-messages N] [--dry-run]

``drain`` shows every fallback queue's depth and oldest message, then invokes the deployed
drain function (``fabric-<env>-drain``) once and prints what it moved and why it stopped. The
broker is private, so the drain runs inside the VPC and never from the operator's machine.
``--dry-run`` only shows the queues. AWS credentials and the region come from the usual boto3
chain (``AWS_PROFILE``, ``AWS_REGION``); the region defaults to the environment's in cdk.json.
Exit status: 0 done, 1 the drain stopped early or failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Parse the command line and run one command."""
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="runbook", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    drain_parser = commands.add_parser("drain", help="move fallback messages back into RabbitMQ")
    drain_parser.add_argument("--env", required=True, help="dev, staging or prod (cdk.json)")
    drain_parser.add_argument("--max-messages", type=_positive, default=None)
    drain_parser.add_argument("--dry-run", action="store_true", help="only show the queues")
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
    try:
        return drain(
            args.env,
            client=lambda service: _client(service, region),
            max_messages=args.max_messages,
            dry_run=args.dry_run,
            out=out,
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

    # The drain function may run for up to 5 minutes: wait for it.
    return boto3.client(service, region_name=region, config=Config(read_timeout=330))


if __name__ == "__main__":
    sys.exit(main())
