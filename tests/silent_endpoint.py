"""A local TCP endpoint that takes every connection and never answers: what a hung dependency
(a broker, an AWS endpoint) looks like to a client, which then waits out its own timeouts."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def silent_endpoint() -> Iterator[tuple[int, list[socket.socket]]]:
    """Yields the port on 127.0.0.1 and the connections taken so far; closes them at the end,
    which also ends the requests a client gave up on."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    taken: list[socket.socket] = []
    done = threading.Event()

    def take() -> None:
        while not done.is_set():
            try:
                taken.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], taken
    finally:
        done.set()
        thread.join()
        server.close()
        for connection in taken:
            connection.close()
