"""A fault-injecting TCP proxy on loopback, for drills that must not touch the shared broker.

The client connects to the proxy, the proxy to the real broker. The test then makes the path
behave like a failure: ``blackhole()`` stops forwarding but keeps every socket open (a load
balancer that silently drops an idle flow), ``reset()`` closes every connection (an operator
closing connections, a node dying), ``refuse()`` also stops accepting new ones.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class FaultProxy:
    """Forwards 127.0.0.1:<port> to ``target`` until told to misbehave."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.attempts = 0  # connections clients tried to open, refused ones included
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._accepting = True
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> None:
        """Stop moving bytes either way; sockets stay open and silent."""
        self._forwarding.clear()

    def reset(self) -> None:
        """Close every open connection (new ones are still accepted)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def refuse(self) -> None:
        """Close every connection and refuse new ones (the broker is gone)."""
        self._accepting = False
        self.reset()

    def restore(self) -> None:
        """Forward and accept again."""
        self._accepting = True
        self._forwarding.set()

    def close(self) -> None:
        """Stop the proxy and drop everything."""
        self._stop.set()
        self.reset()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.attempts += 1
            if not self._accepting:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        while not self._stop.is_set():
            if not self._forwarding.is_set():
                self._forwarding.wait(0.05)
                continue
            try:
                readable, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        raise OSError("closed")
                    peers[sock].sendall(data)
            except (OSError, ValueError):
                for sock in peers:
                    sock.close()
                return
