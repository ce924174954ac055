"""A fault-injecting TCP proxy on loopback, for drills that must not touch the shared broker.

The client connects to the proxy, the proxy to the real broker. The test then makes the path
behave like a failure: ``blackhole()`` stops forwarding but keeps every socket open (a load
balancer that silently drops an idle flow), ``reset()`` closes every connection (an operator
closing connections, a node dying), ``refuse()`` also stops accepting new ones.

It also reads the AMQP frames it forwards, for faults at an exact point of the protocol:
``cut_before()`` closes every connection just before a chosen frame would pass (a broker's
``basic.ack``, the body of a publish), and ``hold_replies()`` keeps everything the broker
sends from the client until the client sends a chosen frame.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size; then payload and 0xCE
_METHOD_ID = struct.Struct(">HH")  # class id, method id: the start of a method frame's payload


@dataclass(frozen=True)
class Frame:
    """One AMQP frame as it passed the proxy."""

    kind: int  # 1 method, 2 content header, 3 body, 8 heartbeat
    channel: int
    payload: bytes

    @property
    def method(self) -> tuple[int, int] | None:
        """(class id, method id) of a method frame, e.g. (60, 80) for ``basic.ack``."""
        if self.kind != 1 or len(self.payload) < _METHOD_ID.size:
            return None
        return _METHOD_ID.unpack_from(self.payload)


BASIC_ACK = (60, 80)
BASIC_NACK = (60, 120)
BASIC_RETURN = (60, 50)
BASIC_PUBLISH = (60, 40)
CHANNEL_CLOSE = (20, 40)
CONNECTION_CLOSE = (10, 50)
CONNECTION_BLOCKED = (10, 60)


def is_method(method: tuple[int, int]) -> Callable[[Frame], bool]:
    """A frame matcher: a method frame of ``method``."""
    return lambda frame: frame.method == method


class _Framer:
    """Cuts one direction of a connection into units: the client's 8-byte protocol header
    first (``preamble``), then whole frames."""

    def __init__(self, preamble: int) -> None:
        self._preamble = preamble
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[bytes, Frame | None]]:
        self._buffer += data
        units: list[tuple[bytes, Frame | None]] = []
        if self._preamble:
            if len(self._buffer) < self._preamble:
                return units
            units.append((self._buffer[: self._preamble], None))
            self._buffer, self._preamble = self._buffer[self._preamble :], 0
        while len(self._buffer) >= _FRAME_HEADER.size:
            kind, channel, size = _FRAME_HEADER.unpack_from(self._buffer)
            end = _FRAME_HEADER.size + size + 1
            if len(self._buffer) < end:
                break
            raw, self._buffer = self._buffer[:end], self._buffer[end:]
            units.append((raw, Frame(kind, channel, raw[_FRAME_HEADER.size : end - 1])))
        return units


class FaultProxy:
    """Forwards 127.0.0.1:<port> to ``target`` until told to misbehave."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.attempts = 0  # connections clients tried to open, refused ones included
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.RLock()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._accepting = True
        self._stop = threading.Event()
        # Frame faults: (to_client, matcher, countdown) for cut_before; the matcher of the
        # client frame that ends hold_replies, with what the broker sent meanwhile per socket.
        self._cut: tuple[bool, Callable[[Frame], bool], list[int], bool] | None = None
        self._release: Callable[[Frame], bool] | None = None
        self._held: dict[socket.socket, list[bytes]] = {}
        self._held_frames: list[Frame] = []
        self.seen: list[tuple[bool, Frame]] = []  # (to_client, frame) of every frame forwarded
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
        """Forward and accept again (and forget frame faults that have not happened)."""
        with self._lock:
            self._cut = None
            self._release = None
        self._accepting = True
        self._forwarding.set()

    def cut_before(
        self,
        frame: Callable[[Frame], bool],
        *,
        to_client: bool,
        nth: int = 1,
        then_refuse: bool = False,
    ) -> None:
        """Close every connection at once when the ``nth`` frame matching ``frame`` going that
        way is about to be forwarded: it and everything after it are lost with the connection,
        everything before it has passed. Happens once; ``then_refuse``: new connections are
        refused from then on, as by ``refuse()``."""
        with self._lock:
            self._cut = (to_client, frame, [nth], then_refuse)

    def hold_replies(self, *, until: Callable[[Frame], bool]) -> None:
        """From now on keep what the broker sends from the client (the broker still reads what
        the client sends) until the client sends a frame matching ``until``; then hand over
        everything held, and forward as usual again."""
        with self._lock:
            self._release = until

    def release_replies(self) -> list[Frame]:
        """End ``hold_replies`` now: hand over everything held, in one send per connection;
        the frames that were held."""
        with self._lock:
            self._release = None
            held, self._held = self._held, {}
            frames, self._held_frames = self._held_frames, []
            for client, data in held.items():
                with contextlib.suppress(OSError):
                    client.sendall(b"".join(data))
        return frames

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
        framers = {client: _Framer(preamble=8), upstream: _Framer(preamble=0)}
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
                    units = framers[sock].feed(data)
                    if not self._forward(units, to_client=sock is upstream, client=client):
                        self.reset()
                        raise OSError("cut")
            except (OSError, ValueError):
                for sock in peers:
                    sock.close()
                return

    def _forward(
        self, units: list[tuple[bytes, Frame | None]], *, to_client: bool, client: socket.socket
    ) -> bool:
        """Forward ``units`` unless a frame fault says otherwise; False: cut here."""
        out: list[bytes] = []
        for raw, frame in units:
            with self._lock:
                cut, release = self._cut, self._release
                if frame is not None and cut is not None and cut[0] == to_client and cut[1](frame):
                    cut[2][0] -= 1
                    if cut[2][0] == 0:
                        self._cut = None
                        if cut[3]:
                            self._accepting = False
                        self._send(client, out, to_client)
                        return False
                if frame is not None:
                    self.seen.append((to_client, frame))
                if to_client and release is not None:
                    self._held.setdefault(client, []).append(raw)
                    if frame is not None:
                        self._held_frames.append(frame)
                    continue
                if not to_client and release is not None and frame is not None and release(frame):
                    self._release = None
                    self._held_frames = []
                    held = self._held.pop(client, [])
                    with contextlib.suppress(OSError):
                        client.sendall(b"".join(held))
            out.append(raw)
        self._send(client, out, to_client)
        return True

    def _send(self, client: socket.socket, out: list[bytes], to_client: bool) -> None:
        if not out:
            return
        with self._lock:
            pair = next((p for p in self._pairs if p[0] is client), None)
        if pair is not None:
            (pair[0] if to_client else pair[1]).sendall(b"".join(out))
