"""The router's CPU instructions per message, in process: a figure the host's speed cannot move.

Usage: python scripts/router_instructions.py   (needs valgrind: apt-get install valgrind)

Runs the router twice under ``valgrind --tool=cachegrind`` (instruction counting only), routing
500 and then 4,500 messages of the ``router_vs_raw_publish`` benchmark (1 KiB, ``internal``, two
groups) in calls of 500, after one warm-up call, with the production audit sink over a
transport that stores nothing. The difference of the two counts over 4,000 messages leaves out
start-up, imports and building the messages. Prints ``BENCH router_instructions_per_msg``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = 5_000  # built in both runs, so building them cancels out


class _StoresNothing:
    name = "rabbitmq"

    def publish(
        self, messages: Iterable[object], *, meanwhile: Callable[[], None] | None = None
    ) -> list[object]:
        from fabric.ports import Outcome

        outcomes: list[object] = [Outcome(m.message_id, transport=self.name) for m in messages]  # type: ignore[attr-defined]
        if meanwhile is not None:
            meanwhile()
        return outcomes


def _route(count: int) -> None:
    import bench_router  # scripts/ is on sys.path when this file runs as a script

    from fabric.adapters.memory_cipher import LocalCipher
    from fabric.audit_sink import TransportAuditSink
    from fabric.bootstrap import settle_after_init
    from fabric.router import Router
    from fabric.routing import default_routing_table

    transport = _StoresNothing()
    router = Router(
        table=default_routing_table(),
        transports=[transport],  # type: ignore[list-item]
        cipher=LocalCipher(),
        audit=TransportAuditSink([transport], emitted_by="bench"),  # type: ignore[list-item]
        environment="bench",
    )
    settle_after_init()  # as the router function does at the end of its init
    items = [
        bench_router.message(bench_router.FANOUT_TOPIC, classification="internal")
        for _ in range(MESSAGES)
    ]
    router.route(items[:500], source="academic")
    for start in range(500, 500 + count, 500):
        router.route(items[start : start + 500], source="academic")


def _instructions(count: int) -> int:
    result = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--route",
            str(count),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    match = re.search(r"I\s+refs:\s+([\d,]+)", result.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{result.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def main(argv: list[str]) -> int:
    if argv[1:2] == ["--route"]:
        _route(int(argv[2]))
        return 0
    if shutil.which("valgrind") is None:
        sys.stderr.write("valgrind is needed: apt-get install valgrind\n")
        return 2
    per_message = (_instructions(4_500) - _instructions(500)) / 4_000
    print(f"BENCH router_instructions_per_msg {per_message:.0f} instructions", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
