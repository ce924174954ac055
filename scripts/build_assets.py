"""Build the Lambda layers without Docker, for the functions' runtime and architecture.

- ``build/layers/deps/python``: layers/requirements.txt, installed by pip with ``--platform`` and
  ``--only-binary=:all:`` (manylinux wheels for arm64, CPython 3.14);
- ``build/layers/fabric/python/fabric``: the fabric library's source (pure Python).

Rebuilds only what changed (a content hash of the inputs is kept beside each output).
Usage: python scripts/build_assets.py
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "layers"
PLATFORM = "manylinux2014_aarch64"
PYTHON_VERSION = "3.14"


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256(f"{PLATFORM} {PYTHON_VERSION}".encode())
    for path in sorted(paths):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _fresh(target: Path, digest: str) -> bool:
    stamp = target / ".inputs.sha256"
    return stamp.exists() and stamp.read_text() == digest


def _stamp(target: Path, digest: str) -> None:
    (target / ".inputs.sha256").write_text(digest)


def build_dependencies() -> Path:
    """Install the pinned runtime dependencies for Lambda's platform into the deps layer."""
    requirements = ROOT / "layers" / "requirements.txt"
    target = BUILD / "deps"
    digest = _digest([requirements])
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
            "--platform",
            PLATFORM,
            "--implementation",
            "cp",
            "--python-version",
            PYTHON_VERSION,
            "--only-binary=:all:",
            "--target",
            str(target / "python"),
            "-r",
            str(requirements),
        ],
        check=True,
    )
    _stamp(target, digest)
    return target


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
