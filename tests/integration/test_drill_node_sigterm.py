"""A SIGTERM to a test run (a CI timeout, a cancelled job) leaves no private RabbitMQ node behind.

The drills' nodes run in a session of their own, so the signal never reaches them; the run
must unwind and stop them (tests/conftest.py handles SIGTERM like Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A test that starts a node, says which, and then waits to be killed.
HOLDS_A_NODE = """
import os
import time
from pathlib import Path

from tests.integration.private_node import private_node


def test_holds_a_node() -> None:
    with private_node() as node:
        Path(os.environ["NODE_INFO"]).write_text(f"{node.pid} {node.base}")
        time.sleep(300)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_sigterms_to_the_test_run_stop_its_private_node(tmp_path: Path) -> None:
    info = tmp_path / "node-info"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_holds_a_node.py").write_text(HOLDS_A_NODE)
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "NODE_INFO": str(info)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pid, base = 0, Path()
    try:
        deadline = time.monotonic() + 90
        while not info.exists():
            if run.poll() is not None or time.monotonic() > deadline:
                run.kill()
                pytest.fail(f"the node never came up:\n{run.communicate()[0]}")
            time.sleep(0.1)
        pid_text, base_text = info.read_text().split()
        pid, base = int(pid_text), Path(base_text)
        assert _alive(pid)

        # Twice, as a signal to the whole process group arrives (directly, and forwarded by
        # make): the second comes while the node is being stopped and must not cut that short.
        run.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=60)[0]

        assert not _alive(pid), output
        assert not base.exists()
        assert run.returncode == pytest.ExitCode.INTERRUPTED, output
        assert "SIGTERM" in output
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if pid and _alive(pid):  # the bug: clean up after it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if base != Path():
            shutil.rmtree(base, ignore_errors=True)
