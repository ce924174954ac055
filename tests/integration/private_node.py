"""A private RabbitMQ node on free loopback ports, for drills that kill or starve a broker."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fabric.adapters.management import ManagementClient

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
GUEST = ("guest", "guest")
# Keep the Erlang distribution (and the CLI's) on loopback, like the shared broker's env file.
_LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port: int = probe.getsockname()[1]
    return port


class PrivateNode:
    """One RabbitMQ node of its own: own name, ports, data, logs, cookie and config.

    The shared broker's files are never read: the node's environment names a config file, an
    env file, a plugins file and an Erlang cookie in ``base``, and its own loopback ports for
    AMQP, the management API and Erlang distribution. Run the CLI against it with ``ctl``.
    """

    def __init__(self, base: Path, *, config: str = "") -> None:
        self.base = base
        self.name = f"fabricdrill{secrets.token_hex(4)}@localhost"
        self.amqp_port = free_port()
        self.management_port = free_port()
        self.dist_port = free_port()
        self._servers: list[subprocess.Popen[bytes]] = []
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"management.tcp.ip = 127.0.0.1\n"
            f"management.tcp.port = {self.management_port}\n"
            # Connections show up in the management API within half a second, not five.
            "collect_statistics_interval = 500\n" + config
        )
        (base / "rabbitmq-env.conf").write_text("")
        (base / "enabled_plugins").write_text("[rabbitmq_management].\n")
        cookie = base / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)

    @property
    def management_url(self) -> str:
        """The node's management API base URL (no ``/api``)."""
        return f"http://127.0.0.1:{self.management_port}"

    def environment(self) -> dict[str, str]:
        """The environment for the node's server and CLI (HOME holds the node's cookie)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        base = str(self.base)
        env.update(
            HOME=base,
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_FLAGS=_LOOPBACK_DIST,
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=f"{base}/rabbitmq.conf",
            RABBITMQ_ADVANCED_CONFIG_FILE=f"{base}/advanced.config",
            RABBITMQ_CONF_ENV_FILE=f"{base}/rabbitmq-env.conf",
            RABBITMQ_ENABLED_PLUGINS_FILE=f"{base}/enabled_plugins",
            RABBITMQ_PLUGINS_EXPAND_DIR=f"{base}/plugins",
            RABBITMQ_MNESIA_BASE=f"{base}/mnesia",
            RABBITMQ_LOG_BASE=f"{base}/log",
            RABBITMQ_PID_FILE=f"{base}/node.pid",
        )
        return env

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the node (same name and data as before, after a kill) and wait until it serves.

        Raises:
            RuntimeError: the node did not boot within ``timeout`` (the log tail says why).
        """
        with contextlib.suppress(FileNotFoundError):
            (self.base / "node.pid").unlink()
        log = (self.base / "server.out").open("ab")
        server = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self.environment(),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C / SIGTERM (tests/conftest.py) reach it only via stop()
        )
        log.close()
        self._servers.append(server)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited {server.returncode}: {self.log_tail()}")
            # The CLI boots a VM of its own, slow on a loaded host: a call that outlasts the
            # time left is "not ready yet", never an escape past the node's cleanup.
            left = max(1.0, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                awaited = self.ctl("await_startup", "--timeout", "5", check=False, timeout=left)
                if awaited.returncode == 0:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"node {self.name} did not boot in {timeout} s: {self.log_tail()}")
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.management("GET", "overview")
                return
            time.sleep(0.2)
        raise RuntimeError(f"node {self.name}: management API not up: {self.log_tail()}")

    @property
    def pid(self) -> int | None:
        """The OS pid of the node's Erlang VM, from the pid file it writes when it boots."""
        try:
            return int((self.base / "node.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    @property
    def running(self) -> bool:
        """Whether the node's VM process exists."""
        pid = self.pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        """``kill -9`` the node's VM (no shutdown at all) and wait until it is gone."""
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"node {self.name} has no pid file")
        os.kill(pid, signal.SIGKILL)
        self._reap(timeout=10)
        if self.running:
            raise RuntimeError(f"node {self.name} (pid {pid}) survived SIGKILL")

    def stop(self) -> None:
        """Stop the node cleanly, or kill it if it will not stop; never raises."""
        if self.running:
            # A CLI that does not answer in time must not skip the kill below (an orphaned VM).
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.ctl("stop", check=False, timeout=30)
        self._reap(timeout=15)
        pid = self.pid
        if pid is not None and self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for server in self._servers:
            if server.poll() is None:
                server.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=5)

    def _reap(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for server in self._servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=max(0.1, deadline - time.monotonic()))

    # -- control ------------------------------------------------------------------------------

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n <node> <args>`` against this node only."""
        return subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def management(self, method: str, path: str, body: Any = None) -> Any:
        """Call the node's management API as guest; returns decoded JSON (or None)."""
        request = urllib.request.Request(  # noqa: S310 (loopback only)
            f"{self.management_url}/api/{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "content-type": "application/json",
                "authorization": "Basic " + base64.b64encode(":".join(GUEST).encode()).decode(),
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            data = response.read()
        return json.loads(data) if data else None

    def management_client(self) -> ManagementClient:
        """The fabric's own management client, pointed at this node."""
        return ManagementClient(self.management_url, *GUEST)

    def add_vhost(self, name: str) -> None:
        """Create ``name`` with full permissions for guest."""
        quoted = urllib.parse.quote(name, safe="")
        self.management("PUT", f"vhosts/{quoted}")
        self.management(
            "PUT", f"permissions/{quoted}/guest", {"configure": ".*", "write": ".*", "read": ".*"}
        )

    def delete_vhost(self, name: str) -> None:
        """Delete ``name`` if the node is up; never raises."""
        with contextlib.suppress(OSError, urllib.error.URLError):
            self.management("DELETE", f"vhosts/{urllib.parse.quote(name, safe='')}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the node's console output, for failure messages."""
        try:
            text = (self.base / "server.out").read_text(errors="replace")
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def private_node(config: str = "") -> Iterator[PrivateNode]:
    """A started private node; stopped and its directory removed afterwards, even on failure.

    ``config``: more ``rabbitmq.conf`` lines (e.g. a TLS listener).
    """
    base = Path(tempfile.mkdtemp(prefix="fabric-drill-node-"))
    node = PrivateNode(base, config=config)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)
