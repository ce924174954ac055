"""Build the Lambda layers without Docker, for the functions' runtime and architecture.

- ``build/layers/deps/python``: layers/requirements.txt, installed by pip with ``--platform`` and
  ``--only-binary=:all:`` (manylinux wheels for arm64, CPython 3.14);
- ``build/layers/fabric/python/fabric``: the fabric library's source (pure Python).

Neither layer holds bytecode. Lambda's Python 3.14 reads only ``__pycache__/*.cpython-314.pyc``,
and this machine's Python (3.11) can write only ``cpython-311`` files, which that runtime would
ignore: shipping them would make the layers bigger and no start faster. So every cold start
compiles the layers' modules it imports (``/opt`` is read-only), and the router's cold-init
benchmark measures exactly that. A layer that bytecode got into (an import from it by a Python
that writes bytecode) is rebuilt, so the assets stay the same for the same inputs.

Rebuilds only what changed (a content hash of the inputs is kept beside each output).
``build_host_dependencies`` installs the same pins for this machine's own Python, for the
cold-init benchmark only: it is never packaged.
Usage: python scripts/build_assets.py
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "layers"
REQUIREMENTS = ROOT / "layers" / "requirements.txt"
PLATFORM = "manylinux2014_aarch64"
PYTHON_VERSION = "3.14"


def _digest(paths: list[Path], target: str = f"{PLATFORM} {PYTHON_VERSION}") -> str:
    digest = hashlib.sha256(target.encode())
    for path in sorted(paths):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _fresh(target: Path, digest: str) -> bool:
    stamp = target / ".inputs.sha256"
    return (
        stamp.exists()
        and stamp.read_text() == digest
        and next(target.rglob("__pycache__"), None) is None
    )


def _stamp(target: Path, digest: str) -> None:
    (target / ".inputs.sha256").write_text(digest)


def _pip_install(target: Path, digest: str, options: list[str]) -> Path:
    """The pinned requirements into ``target/python``, without bytecode, unless fresh."""
    if _fresh(target, digest):
        return target
    shutil.rmtree(target, ignore_errors=True)
    (target / "python").mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            *options,
            "--target",
            str(target / "python"),
            "-r",
            str(REQUIREMENTS),
        ],
        check=True,
    )
    _stamp(target, digest)
    return target


def build_dependencies() -> Path:
    """Install the pinned runtime dependencies for Lambda's platform into the deps layer."""
    return _pip_install(
        BUILD / "deps",
        _digest([REQUIREMENTS]),
        [
            "--platform",
            PLATFORM,
            "--implementation",
            "cp",
            "--python-version",
            PYTHON_VERSION,
            "--only-binary=:all:",
        ],
    )


def build_host_dependencies() -> Path:
    """The deps layer's pins for this machine's Python (``build/host-deps``, never packaged):
    the same files as the layer's, but extension modules that this interpreter can load, for
    the cold-init benchmark."""
    host = f"{sys.implementation.cache_tag} {platform.machine()}"
    return _pip_install(ROOT / "build" / "host-deps", _digest([REQUIREMENTS], host), [])


def build_fabric() -> Path:
    """Copy the fabric library's package (code and data, no tests or caches) into its layer."""
    source = ROOT / "layers" / "fabric" / "fabric"
    files = [p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    target = BUILD / "fabric"
    digest = _digest(files)
    if _fresh(target, digest):
        return target
    shutil.rmtree(target, ignore_errors=True)
    for path in files:
        destination = target / "python" / "fabric" / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
    _stamp(target, digest)
    return target


def main() -> int:
    """Build both layers and print where they are."""
    for path in (build_dependencies(), build_fabric()):
        print(f"layer {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
