"""Build the Lambda layers without Docker, for the functions' runtime and architecture.

- ``build/layers/deps/python``: layers/requirements.txt, installed by pip with ``--platform`` and
  ``--only-binary=:all:`` (manylinux wheels for arm64, CPython 3.14);
- ``build/layers/fabric/python/fabric``: the fabric library's source (pure Python).

Both layers ship their modules' bytecode, compiled by CPython 3.14, the Lambda runtime's
version (``__pycache__/*.cpython-314.pyc``, unchecked-hash: the layer is immutable, so the
runtime loads it without reading the source's timestamp). Lambda's ``/opt`` is read-only, so
without it every cold start compiles every layer module it imports: about half of the router's
cold start. Bytecode does not depend on the CPU, so an x86_64 interpreter compiles it for arm64.

This machine's Python is 3.11, whose bytecode Lambda's 3.14 would ignore. ``runtime_python``
provides a 3.14 without Docker and without touching the system: Debian's own build of it
(suite ``sid``, the one that carries 3.14), downloaded with apt-get into ``build/python3.14``,
unpacked there, and run through the unpacked C library's loader. Its standard library is
compiled once, as the runtime image ships it. If it cannot be had (no network, the suite moved
on), the layers are built without bytecode, with a warning, and still work.

Rebuilds only what changed (a content hash of the inputs is kept beside each output). A layer
that foreign bytecode got into (an import from it by a Python that writes bytecode) is
rebuilt, so the assets stay the same for the same inputs. ``build_host_dependencies``
installs the same pins for this machine's CPU and CPython 3.14, for the cold-init benchmark
only: it is never packaged.
Usage: python scripts/build_assets.py
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "layers"
REQUIREMENTS = ROOT / "layers" / "requirements.txt"
PLATFORM = "manylinux2014_aarch64"
PYTHON_VERSION = "3.14"
CACHE_TAG = "cpython-314"  # the bytecode Lambda's Python 3.14 reads
RUNTIME = ROOT / "build" / "python3.14"
# Debian's CPython 3.14 and what it needs to run and to import the functions' code (ssl, ctypes,
# compression), from the suite that carries it; unpacked, never installed.
RUNTIME_SUITE = "sid"
RUNTIME_PACKAGES = (
    "python3.14-minimal",
    "libpython3.14-minimal",
    "libpython3.14-stdlib",
    "libc6",
    "libexpat1",
    "zlib1g",
    "libssl3t64",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libzstd1",
    "libuuid1",
    "libmpdec4",
)


def _digest(paths: list[Path], target: str = f"{PLATFORM} {PYTHON_VERSION}") -> str:
    """The inputs' hash, with the target and whether the layer gets bytecode."""
    compiled = "bytecode of /opt/python" if runtime_python() is not None else "source only"
    digest = hashlib.sha256(f"{target} {compiled}".encode())
    for path in sorted(paths):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _fresh(target: Path, digest: str) -> bool:
    stamp = target / ".inputs.sha256"
    foreign = (p for p in target.rglob("*.pyc") if f".{CACHE_TAG}." not in p.name)
    return stamp.exists() and stamp.read_text() == digest and next(foreign, None) is None


def _stamp(target: Path, digest: str) -> None:
    (target / ".inputs.sha256").write_text(digest)


@cache
def runtime_python() -> tuple[str, ...] | None:
    """The command that runs CPython 3.14 here (see the module's text), or None, with a
    warning, if it cannot be had."""
    libs = RUNTIME / "usr" / "lib" / f"{platform.machine()}-linux-gnu"
    loader = {"x86_64": "ld-linux-x86-64.so.2", "aarch64": "ld-linux-aarch64.so.1"}
    command = (
        str(libs / loader.get(platform.machine(), "ld-linux.so.2")),
        "--library-path",
        str(libs),
        str(RUNTIME / "usr" / "bin" / "python3.14"),
    )
    stamp = RUNTIME / ".ready"
    if not stamp.exists():
        try:
            _unpack_runtime()
            # The standard library's bytecode, as Lambda's runtime image has it.
            _compile(command, RUNTIME / "usr" / "lib" / "python3.14", invalidation="timestamp")
        except (OSError, subprocess.SubprocessError) as exc:  # also a download that timed out
            print(
                f"build_assets: no CPython 3.14 ({exc}); the layers are built without "
                "bytecode, and every cold start will compile them",
                file=sys.stderr,
            )
            return None
        stamp.write_text("ready\n")
    return command


def _unpack_runtime() -> None:
    """Download RUNTIME_PACKAGES from Debian's RUNTIME_SUITE with apt-get (its own sources,
    lists, cache and an empty configuration under ``build/``: the system's apt settings and
    hooks are not read, nothing of the system's is changed) and unpack them into RUNTIME."""
    shutil.rmtree(RUNTIME, ignore_errors=True)
    apt = RUNTIME / "apt"
    (apt / "lists" / "partial").mkdir(parents=True)
    (apt / "cache" / "archives" / "partial").mkdir(parents=True)
    sources = apt / "sources.list"
    sources.write_text(
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        f"http://deb.debian.org/debian {RUNTIME_SUITE} main\n"
    )
    # APT_CONFIG is read before anything else: with Dir::Etc::Main and ::Parts emptied, the
    # host's apt.conf and apt.conf.d (settings, update hooks run as root) are never read.
    settings = {
        "Dir::Etc::Main": "/dev/null",
        "Dir::Etc::Parts": "/dev/null",
        "Dir::Etc::SourceList": str(sources),
        "Dir::Etc::SourceParts": "/dev/null",
        "Dir::Etc::Preferences": "/dev/null",
        "Dir::Etc::PreferencesParts": "/dev/null",
        "Dir::State::Lists": str(apt / "lists"),
        "Dir::State::Status": str(apt / "status"),
        "Dir::Cache": str(apt / "cache"),
        "APT::Sandbox::User": "root",
        # The Debian mirror this machine reaches serves a frozen snapshot whose Release files
        # are past their Valid-Until date; their signatures are still checked.
        "Acquire::Check-Valid-Until": "false",
    }
    config = apt / "apt.conf"
    config.write_text("".join(f'{name} "{value}";\n' for name, value in settings.items()))
    environment = {**os.environ, "APT_CONFIG": str(config)}
    (apt / "status").write_text("")
    subprocess.run(["apt-get", "-qq", "update"], check=True, timeout=600, env=environment)
    debs = apt / "debs"
    debs.mkdir()
    subprocess.run(
        ["apt-get", "-qq", "download", *RUNTIME_PACKAGES],
        cwd=debs,
        check=True,
        timeout=600,
        env=environment,
    )
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(RUNTIME)], check=True)
    shutil.rmtree(apt)


def _compile(
    runtime: tuple[str, ...], tree: Path, *, invalidation: str, shown_as: str | None = None
) -> None:
    """Compile every module under ``tree`` with ``runtime``, in one process (compileall's
    workers would start the bare binary, without the unpacked C library). ``shown_as``: the
    directory the bytecode names as its source's (so it does not depend on this checkout's
    path, and tracebacks name the path on Lambda).

    Raises:
        subprocess.CalledProcessError: a module does not compile (compileall's output shown).
    """
    names = ["-d", shown_as] if shown_as else []
    command = [*runtime, "-I", "-m", "compileall", "-q", *names]
    result = subprocess.run(
        [*command, "--invalidation-mode", invalidation, str(tree)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        result.check_returncode()


def _with_bytecode(target: Path) -> None:
    """Ship ``target``'s modules compiled for Lambda's Python, if there is one to compile with.
    The layer's ``python/`` is ``/opt/python`` on Lambda."""
    runtime = runtime_python()
    if runtime is not None:
        _compile(runtime, target / "python", invalidation="unchecked-hash", shown_as="/opt/python")


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
    _with_bytecode(target)
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
    """The deps layer's pins for this machine's CPU (``build/host-deps``, never packaged): the
    same files and bytecode as the layer's, but extension modules that ``runtime_python`` can
    load here, for the cold-init benchmark."""
    host = f"manylinux2014_{platform.machine()}"
    return _pip_install(
        ROOT / "build" / "host-deps",
        _digest([REQUIREMENTS], f"{host} {PYTHON_VERSION}"),
        [
            "--platform",
            host,
            "--implementation",
            "cp",
            "--python-version",
            PYTHON_VERSION,
            "--only-binary=:all:",
        ],
    )


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
    _with_bytecode(target)
    _stamp(target, digest)
    return target


def main() -> int:
    """Build both layers and print where they are."""
    for path in (build_dependencies(), build_fabric()):
        print(f"layer {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
