"""Shared test setup: the repository root on sys.path (for `app` and `stacks`), quiet jsii, and
SIGTERM handled like Ctrl-C."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType, ModuleType

import pytest

from fabric.bootstrap import collector_kept

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
_SESSION_PID = os.getpid()


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception. A KeyboardInterrupt, so that pytest stops the run as on Ctrl-C
    (a SystemExit in a test only fails that test) and no ``except Exception`` swallows it."""


# How long the run may take to tear down after a SIGTERM before it is killed (SIGALRM's default
# action): .ci/run's SIGKILL, two minutes after its SIGTERM, reaches make only.
_TEARDOWN_S = 90


def _terminate(signum: int, _frame: FrameType | None) -> None:
    if os.getpid() != _SESSION_PID:  # a forked child inherited the handler: die as before
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    # Further SIGTERMs are ignored while the run tears down: a signal to a whole process group
    # reaches pytest twice (directly, and forwarded by make), and the second one killed it
    # before its drill nodes were stopped. The teardown is bounded instead.
    signal.signal(signum, signal.SIG_IGN)
    signal.alarm(_TEARDOWN_S)
    raise Terminated("SIGTERM: the test run stops and tears down what it started")


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (a CI timeout, a cancelled job) unwinds the run instead of ending it on the
    spot: ``finally`` blocks and fixture teardowns run. Without this the private RabbitMQ nodes
    of the drills (``tests/integration/private_node.py``, in a session of their own, which the
    signal does not reach) would be left running."""
    signal.signal(signal.SIGTERM, _terminate)


def load_handler(function: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``lambdas/<function>/handler.py`` imported fresh, as Lambda imports it (its module-level
    bootstrap reads the environment the test set), registered as ``<function>_handler`` for
    the test's duration."""
    name = f"{function}_handler"

    def register(module: ModuleType) -> None:
        monkeypatch.setitem(sys.modules, name, module)

    return import_handler(function, name, register=register)


def import_handler(
    function: str, name: str, *, register: Callable[[ModuleType], None] = lambda _m: None
) -> ModuleType:
    """``lambdas/<function>/handler.py`` executed as module ``name`` (``register`` sees it
    before it runs). The garbage collector is left as it was: a handler tunes it for a Lambda
    process (``fabric.bootstrap.settle_after_init``), not for the test session."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "lambdas" / function / "handler.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    register(module)
    with collector_kept():
        spec.loader.exec_module(module)
    return module
