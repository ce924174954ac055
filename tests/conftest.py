"""Shared test setup: the repository root on sys.path (for `app` and `stacks`), quiet jsii."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from fabric.bootstrap import collector_kept

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")


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
