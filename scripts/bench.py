"""Benchmarks: each prints `BENCH <name> <value> <unit>`; numbers and machine go in BENCHMARKS.md.

Usage: python scripts/bench.py [name ...]   (no names: run them all)
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import bench_audit  # scripts/ is on sys.path when this file runs as a script
import bench_consumer
import bench_redrive
import bench_router

from fabric.bootstrap import collector_kept

ROOT = Path(__file__).resolve().parent.parent
Figure = tuple[str, float, str]


def bench_synth_all_envs(runs: int = 3) -> Iterator[Figure]:
    """Wall time of `cdk synth` of dev, staging and prod through the pinned CLI, gates on.

    The median of ``runs`` cold runs, each into an empty output directory.
    """
    cdk = ROOT / "node_modules" / ".bin" / "cdk"
    timings = []
    for _ in range(runs):
        outdir = Path(tempfile.mkdtemp(prefix="bench-cdk-out-"))
        try:
            started = time.perf_counter()
            result = subprocess.run(
                [str(cdk), "synth", "--quiet", "--no-notices", "--output", str(outdir)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            timings.append(time.perf_counter() - started)
            if result.returncode != 0:
                raise RuntimeError(f"cdk synth failed:\n{result.stderr}")
        finally:
            shutil.rmtree(outdir, ignore_errors=True)
    yield "synth_all_envs", statistics.median(timings), "s"


BENCHMARKS: dict[str, Callable[[], Iterator[Figure]]] = {
    "synth_all_envs": bench_synth_all_envs,
    **bench_router.BENCHMARKS,
    **bench_redrive.BENCHMARKS,
    **bench_consumer.BENCHMARKS,
    **bench_audit.BENCHMARKS,
}


def main(argv: list[str]) -> int:
    """Run the named benchmarks (all by default) and print one BENCH line per figure."""
    names = argv[1:] or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        sys.stderr.write(
            f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}\n"
        )
        return 2
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"# machine: {machine}", flush=True)
    for name in names:
        with collector_kept():  # a benchmark that builds a router settles the collector
            for figure, value, unit in BENCHMARKS[name]():
                print(f"BENCH {figure} {value:.3f} {unit}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
