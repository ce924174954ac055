"""Benchmarks: each prints `BENCH <name> <value> <unit>`; numbers and machine go in BENCHMARKS.md.

Usage: python scripts/bench.py [name ...]   (no names: run them all)
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import bench_audit  # scripts/ is on sys.path when this file runs as a script
import bench_redrive
import bench_router

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
        with _collector_as_it_was():
            for figure, value, unit in BENCHMARKS[name]():
                print(f"BENCH {figure} {value:.3f} {unit}", flush=True)
    return 0


@contextmanager
def _collector_as_it_was() -> Iterator[None]:
    """The garbage collector's settings as they were before: a benchmark that builds a router
    sets them as the router function does (``fabric.bootstrap.settle_after_init``)."""
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
