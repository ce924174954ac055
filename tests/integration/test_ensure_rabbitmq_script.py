"""scripts/ensure_rabbitmq.sh says what went wrong, and fails fast, when it cannot help.

Each run gets a PATH of stand-ins (apt-get, curl, the RabbitMQ commands) next to the few real
tools the script needs, so nothing is installed and the shared broker is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ensure_rabbitmq.sh"


def _bin(tmp_path: Path, **stand_ins: str) -> Path:
    """A directory with ``seq`` and ``sleep`` (real) and each stand-in as a shell script."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for tool in ("seq", "sleep"):
        real = shutil.which(tool)
        assert real is not None
        (directory / tool).symlink_to(real)
    for name, body in stand_ins.items():
        path = directory / name.replace("_", "-")
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return directory


def _run(directory: Path) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash is not None
    env = {**os.environ, "PATH": str(directory), "FABRIC_RABBITMQ_WAIT_SECONDS": "3"}
    return subprocess.run(
        [bash, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_a_failed_apt_get_update_stops_the_script_with_its_reason(tmp_path: Path) -> None:
    """No rabbitmq-server, no curl, and apt-get cannot update (no root, no index)."""
    directory = _bin(tmp_path, apt_get='echo "E: permission denied" >&2; exit 100')

    result = _run(directory)

    assert result.returncode == 1, result.stderr
    assert "apt-get update failed" in result.stderr
    assert "rabbitmq-server curl" in result.stderr
    assert "command not found" not in result.stderr


def test_a_management_api_refusing_guest_is_named_at_once(tmp_path: Path) -> None:
    """The shared broker's AMQP port is open; curl (a stand-in, as guest) gets HTTP 401.
    The plugin must not be "enabled" and waited for: 401 is an answer, not a missing API."""
    enabled = tmp_path / "plugins-enabled"
    directory = _bin(
        tmp_path,
        curl=(
            'case "$*" in *-f*) echo "curl: (22) The requested URL returned error: 401" >&2;'
            " exit 22;; esac; printf 401"
        ),
        rabbitmq_server="exit 0",
        rabbitmq_plugins=f": > {enabled}",
    )

    started = time.monotonic()
    result = _run(directory)

    assert result.returncode == 1, result.stderr
    assert "refuses guest/guest (HTTP 401)" in result.stderr
    assert not enabled.exists()
    assert time.monotonic() - started < 3
