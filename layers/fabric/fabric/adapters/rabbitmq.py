"""RabbitMQ transport on pika: persistent, mandatory publishes with a window of publisher confirms.

One ``SelectConnection`` is kept across warm Lambda invocations and driven in the caller's thread:
``publish`` starts the I/O loop, keeps up to ``confirm_window`` messages unconfirmed at a time,
and stops the loop when every message has an outcome. That is the throughput of asynchronous
confirms (no round trip per message) with the simple call shape of a blocking client.

What counts as stored: a ``basic.ack`` for the message's delivery tag that was not preceded by a
``basic.return`` of the same message. Everything else is a ``Failure`` outcome for the caller to
send elsewhere; this adapter never raises for broker or network trouble.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from fabric.adapters.amqp_frames import PublishFrames
from fabric.errors import ConfigError, TransportUnavailable
from fabric.ports import Failure, MessageKind, OutboundMessage, Outcome

_LOG = logging.getLogger(__name__)
TRANSPORT_NAME = "rabbitmq"
# Messages published per turn of the I/O loop (see _Batch.pump).
_PUMP_CHUNK = 50
# Turns of the loop the caller's meanwhile waits for the last chunk's frames to be written.
_MEANWHILE_WAITS = 3
# Raised while encoding a message whose routing key or a property AMQP cannot carry (a short
# string over 255 bytes, text that is not UTF-8): a failure of that message alone.
_UNFRAMEABLE = (pika.exceptions.ShortStringTooLong, UnicodeEncodeError)
# AMQP's reply code when a channel publishes to an exchange the broker does not have.
_NOT_FOUND = 404


@dataclass(frozen=True)
class RabbitSettings:
    """How to reach the broker, and the timeouts that bound how long a failure takes to notice.

    Defaults: ``connect_timeout`` 2 s (TCP + TLS + AMQP handshake), ``confirm_timeout`` 0.5 s
    without any confirm while messages are outstanding, ``heartbeat`` 10 s, ``blocked_timeout`` 2 s
    under a memory or disk alarm. A connection idle for longer than the heartbeat (a frozen
    Lambda) is replaced before use rather than trusted.

    ``publish_budget`` bounds one publish call as a whole, in seconds from its first publish
    (None: no bound). The confirm timeout counts from the last confirm, so a broker that
    confirms slowly but steadily (flow control under load, a slow disk) never lets it pass, and
    would hold a large call for as long as it takes to confirm every message. Time spent in the
    caller's code (the source of the messages, ``meanwhile``) is not spent from it: that is the
    caller's own stage, bounded by the caller.

    ``republish_lost`` (default True): messages unconfirmed when their connection is lost are
    published once more on a new connection, for a warm connection that went stale between
    calls (the router's); the broker may have stored them already, and stores them twice.
    False: they are ``UNAVAILABLE`` (in doubt) and nothing more is published in that call, for
    a caller on a fresh connection that would rather stop and leave them where they are, to be
    sent again by a later run (the redrive: a letter it counts moved was stored once, under
    its record).
    """

    host: str
    port: int
    credentials: Callable[[], tuple[str, str]]  # (username, password), read when connecting
    vhost: str = "/"
    use_tls: bool = False
    connect_timeout: float = 2.0
    confirm_timeout: float = 0.5
    heartbeat: int = 10
    blocked_timeout: float = 2.0
    confirm_window: int = 2000
    connection_name: str = "fabric-router"
    publish_budget: float | None = None
    republish_lost: bool = True

    def __repr__(self) -> str:  # never print credentials
        scheme = "amqps" if self.use_tls else "amqp"
        return f"RabbitSettings({scheme}://{self.host}:{self.port}/{self.vhost})"


def connection_parameters(settings: RabbitSettings) -> pika.ConnectionParameters:
    """pika parameters for ``settings``; reads the credentials now.

    Raises:
        TransportUnavailable: the credentials cannot be read, or the secret holding them is
            malformed (a hand edit): the broker cannot be used, and a router fails over.
    """
    try:
        username, password = settings.credentials()
    except ConfigError as exc:
        raise TransportUnavailable(str(exc)) from None  # its text names no value
    ssl_options = None
    if settings.use_tls:
        context = ssl.create_default_context()
        ssl_options = pika.SSLOptions(context, server_hostname=settings.host)
    return pika.ConnectionParameters(
        host=settings.host,
        port=settings.port,
        virtual_host=settings.vhost,
        credentials=pika.PlainCredentials(username, password),
        heartbeat=settings.heartbeat,
        blocked_connection_timeout=settings.blocked_timeout,
        connection_attempts=1,
        socket_timeout=settings.connect_timeout,
        stack_timeout=settings.connect_timeout,
        ssl_options=ssl_options,
        client_properties={"connection_name": settings.connection_name},
    )


_REFUSED_CREDENTIALS = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.AuthenticationError,
)


def _forget_refused_credentials(settings: RabbitSettings, error: object) -> bool:
    """After the broker refused the credentials (``error``), drop the ones ``settings`` keep,
    so that the next connection reads the secret again: a password rotated in Secrets Manager
    reaches warm containers at their next connection, not when they are recycled. Returns
    whether they were dropped (a new connection may then succeed at once)."""
    forget = getattr(settings.credentials, "forget", None)
    if isinstance(error, _REFUSED_CREDENTIALS) and forget is not None:
        forget()
        return True
    return False


def open_blocking_connection(settings: RabbitSettings) -> pika.BlockingConnection:
    """A ``BlockingConnection`` for ``settings`` (see ``_forget_refused_credentials``).

    Raises:
        pika.exceptions.AMQPError: the broker cannot be reached or refused the connection.
        TransportUnavailable: the credentials cannot be read.
    """
    try:
        return pika.BlockingConnection(connection_parameters(settings))
    except _REFUSED_CREDENTIALS as exc:
        _forget_refused_credentials(settings, exc)
        raise


class _ConnectFailed(Exception):
    """No channel could be opened; ``retry`` when a second connection may get one (the
    credentials were refused and will be read again), not after a timeout or a refusal of the
    socket, which a second try would only wait out again."""

    def __init__(self, *, retry: bool = False) -> None:
        super().__init__()
        self.retry = retry


class _CoalescingConnection(SelectConnection):  # type: ignore[misc]  # pika ships no types
    """pika's ``SelectConnection``, able to write the frames of many publishes with one send.

    pika hands its transport every frame of a publish (method, content header, body) as a
    buffer of its own, and the transport sends each buffer with a ``send`` of its own: three
    system calls a message, and as many small TCP segments for the broker to read. Inside
    ``coalesced()`` the frames are held and handed over joined when the block ends, so a chunk
    of the confirm window costs one. Outside it (handshake, heartbeats, close) nothing changes.
    ``send_frames`` takes publishes encoded by ``PublishFrames`` instead of by pika.
    Relies on ``_adapter_emit_data``, pika's one way out for frames, and on the frame size and
    byte count pika keeps (pika is pinned, and the integration tests run every publish through
    this against the real broker).
    """

    _held: list[bytes] | None = None
    _held_bytes = 0
    _handed = 0  # bytes handed to pika's transport, which writes them from the I/O loop

    def _adapter_emit_data(self, data: bytes) -> None:
        if self._held is None:
            self._handed += len(data)
            super()._adapter_emit_data(data)
        else:
            self._held.append(data)
            self._held_bytes += len(data)

    @contextlib.contextmanager
    def coalesced(self) -> Iterator[None]:
        """Hold the frames written in the block; send them together at its end."""
        self._held = []
        self._held_bytes = 0
        try:
            yield
        finally:
            held, self._held = self._held, None
            if held and self.is_open:  # a connection lost meanwhile has no transport to write to
                joined = b"".join(held)
                self._handed += len(joined)
                super()._adapter_emit_data(joined)

    def handed(self) -> int:
        """Bytes of frames so far, those held in ``coalesced`` included: where the frames of the
        next publish will end is this plus their length."""
        return self._handed + (self._held_bytes if self._held is not None else 0)

    def written(self) -> int:
        """Bytes the I/O loop has written to the socket (the rest wait in pika's buffer: pika
        writes only from the loop, on its next turn, or when the socket takes more)."""
        transport = self._transport
        return self._handed - (transport.get_write_buffer_size() if transport is not None else 0)

    @property
    def body_max(self) -> int:
        """The largest body frame payload this connection negotiated."""
        return int(self._body_max_length)

    def send_frames(self, frames: bytes) -> None:
        """Send already-encoded frames, counted where pika's heartbeat looks for traffic."""
        self._output_marshaled_frames((frames,))


class RabbitMqTransport:
    """A ``Transport`` that publishes to RabbitMQ exchanges chosen by ``exchange_for``.

    ``exchange_for(message)`` returns the exchange of a message (e.g. the emergency exchange for
    emergency messages); the routing key is the message's topic.
    """

    name = TRANSPORT_NAME

    def __init__(
        self,
        settings: RabbitSettings,
        *,
        exchange_for: Callable[[OutboundMessage], str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._exchange_for = exchange_for
        self._clock = clock
        self._published = 0  # publishes on the current channel = its last delivery tag
        self._connection: _CoalescingConnection | None = None
        self._channel: Channel | None = None
        self._send_one: Callable[[OutboundMessage], None] | None = None  # on self._channel
        self._last_used = 0.0
        self._blocked = False
        self._batch: _Batch | None = None
        self._user = ""  # the connection's user, the user-id of audit batches
        self._closing = False  # close() in progress: the channel's close is ours
        self.out_of_budget = False  # the last publish call ended at its publish budget

    # -- public API ---------------------------------------------------------------------------

    def publish(
        self,
        messages: Iterable[OutboundMessage],
        *,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        """Publish ``messages``; one Outcome per message, in order. Never raises for I/O trouble.

        ``messages`` is consumed lazily, as the confirm window has room, so a caller that
        prepares messages in a generator overlaps its work with the broker's. ``meanwhile``
        runs once the last message is taken from ``messages``, while the broker is still
        storing and confirming the window (on a busy broker, most of it), once the loop has
        written the last chunk (it waits up to three turns of the loop for a socket that takes
        nothing more): keep it short all the same, as no confirm is read while it runs.

        A message whose connection dies before its confirm is published once more on a new
        connection (the stale-connection case; not with ``republish_lost`` false); if that
        fails too, it is reported ``UNAVAILABLE``. Messages without a confirm within the
        confirm timeout are ``TIMEOUT`` and the connection is dropped, because it can no
        longer be trusted; so are those still unconfirmed once the publish budget is spent,
        and the messages not published by then are not published (``UNAVAILABLE``, as after
        any timeout). A connection that cannot be opened is tried once more only when the
        broker refused the credentials (they are read again, as after a rotation): a broker
        that does not answer costs one connect timeout. A message AMQP cannot carry (a
        routing key or property over 255 bytes, text that is not UTF-8) is ``NACKED`` on its
        own; the others are published as usual.

        Raises:
            Exception: whatever iterating ``messages`` or ``meanwhile`` raises (the connection
                is dropped first).
        """
        source = iter(messages)
        batch_state = _Taken(meanwhile)
        pending: list[int] = []
        for _attempt in range(2 if self._settings.republish_lost else 1):
            if batch_state.spent(self._clock()) or not self.connect():
                break
            pending = self._publish_batch(source, batch_state, pending)
            if batch_state.gave_up or (not pending and batch_state.exhausted):
                break
            # Not _reset: a channel the broker closed (e.g. 404 on a deleted exchange) leaves
            # its connection closing, and only running the loop sends that close; dropped
            # unclosed, it stays open on the broker until its heartbeat times out.
            self._discard()
        for message in source:  # never published: the caller sends them elsewhere
            batch_state.take(message)
        # Whether this call's publish budget ended it (the breaker blames no queue for the
        # messages left unconfirmed after its last confirm).
        self.out_of_budget = batch_state.spent(self._clock())
        return [
            outcome
            if outcome is not None
            else Outcome(batch_state.messages[i].message_id, failure=Failure.UNAVAILABLE)
            for i, outcome in enumerate(batch_state.outcomes)
        ]

    def close(self) -> None:
        """Close the connection; the next publish opens a new one."""
        connection = self._connection
        if connection is not None and connection.is_open:
            self._closing = True
            connection.close()
            self._run_until(lambda: connection.is_closed, self._settings.connect_timeout)
            self._closing = False
        self._reset()

    @property
    def settings(self) -> RabbitSettings:
        """How this transport reaches the broker."""
        return self._settings

    def connect(self) -> bool:
        """Open the connection now, as ``publish`` would; whether a channel is open. For callers
        that must not take work they could not hand on (the drain, before it receives)."""
        for attempt in range(2):
            if self._blocked:
                return False
            try:
                self._ensure_open()
            except _ConnectFailed as failed:
                self._reset()
                if attempt == 0 and failed.retry:
                    continue
                return False
            return True
        return False

    @property
    def is_open(self) -> bool:
        """Whether a usable channel is open right now (no I/O is done to check)."""
        return (
            self._connection is not None
            and self._connection.is_open
            and self._channel is not None
            and self._channel.is_open
            and not self._blocked
        )

    # -- connection ---------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        idle = self._clock() - self._last_used
        if self.is_open and idle <= self._settings.heartbeat:
            return
        if self._connection is not None:
            # Idle past the heartbeat: the broker (or a load balancer) may have dropped it while
            # this process was frozen. A new connection is cheaper than a lost confirm window.
            self._discard()
        state: dict[str, Any] = {}
        try:
            parameters = connection_parameters(self._settings)
        except TransportUnavailable as exc:
            _LOG.warning("rabbitmq credentials unavailable: %s", exc)
            raise _ConnectFailed from exc
        self._user = str(getattr(parameters.credentials, "username", ""))

        def on_open(connection: pika.BaseConnection) -> None:
            connection.channel(on_open_callback=on_channel)

        def on_channel(channel: Channel) -> None:
            channel.add_on_close_callback(self._on_channel_closed)
            channel.add_on_return_callback(self._on_return)
            channel.confirm_delivery(
                self._on_confirm, callback=lambda _frame: state.update(ready=channel)
            )

        def on_open_error(_connection: pika.BaseConnection, error: BaseException | str) -> None:
            state["error"] = error

        connection = _CoalescingConnection(
            parameters=parameters,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=self._on_connection_closed,
        )
        self._connection = connection
        self._blocked = False
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        # pika's own stack timeout (connect_timeout) ends a stuck handshake and reports it
        # through on_open_error; wait a little longer than that so it always can.
        self._run_until(
            lambda: "ready" in state or "error" in state or connection.is_closed,
            self._settings.connect_timeout + 0.5,
        )
        if "ready" not in state:
            _LOG.warning("rabbitmq connect failed: %s", type(state.get("error")).__name__)
            # publish() tries a second connection, which then reads a rotated password.
            retry = _forget_refused_credentials(self._settings, state.get("error"))
            self._discard()
            raise _ConnectFailed(retry=retry)
        self._channel = state["ready"]
        self._send_one = self._publisher(connection, state["ready"])
        self._published = 0
        self._last_used = self._clock()

    def _discard(self) -> None:
        connection = self._connection
        self._reset()
        if connection is not None and not (connection.is_open or connection.is_closing):
            # Still handshaking: pika cannot close a connection mid-workflow (it asserts), so
            # it is dropped; its own stack timeout or the broker ends the socket.
            return
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()
            # Let the loop deliver the close so the socket is released. pika's loop refuses to
            # start (RuntimeError, "not reentrant") when it is marked running: an interrupt
            # (KeyboardInterrupt, a SIGTERM handler's SystemExit) that came as it started, after
            # it marked itself running, leaves it so. That error replaced the interrupt under
            # way, and a shutdown ended as a crash: the connection is dropped unclosed instead.
            with contextlib.suppress(RuntimeError):
                self._run_until(lambda: connection.is_closed, 0.2, connection=connection)

    def _reset(self) -> None:
        self._connection = None
        self._channel = None
        self._send_one = None
        self._blocked = False

    def _run_until(
        self,
        done: Callable[[], bool],
        timeout: float,
        *,
        connection: SelectConnection | None = None,
    ) -> None:
        """Run the I/O loop until ``done()`` (checked after each event) or ``timeout`` passes.

        Used for the rare connection set-up and tear-down; publishing stops the loop from its
        confirm callbacks instead.
        """
        connection = connection or self._connection
        if connection is None:
            return
        loop = connection.ioloop
        deadline = self._clock() + timeout

        def check() -> None:
            if done() or self._clock() >= deadline:
                loop.stop()
            else:
                loop.call_later(0.001, check)

        loop.add_callback_threadsafe(check)
        loop.start()

    # -- publishing ---------------------------------------------------------------------------

    def _publish_batch(
        self, source: Iterator[OutboundMessage], taken: _Taken, retry: list[int]
    ) -> list[int]:
        """Publish ``retry`` then what ``source`` yields, with a confirm window; return the
        indices lost with the connection (to publish again on a new one)."""
        if self._connection is None or self._send_one is None:
            return retry
        loop = self._connection.ioloop

        def stop_if_current() -> None:
            # A timer of an earlier call (a scheduled pump, a watchdog) may run in this call's
            # loop: only this call's batch may stop it.
            if self._batch is batch:
                loop.stop()

        batch = _Batch(
            source,
            taken,
            retry,
            publish=self._send_one,
            first_tag=self._published + 1,
            window=self._settings.confirm_window,
            coalesced=self._connection.coalesced,
            handed=self._connection.handed,
            written=self._connection.written,
            on_settled=stop_if_current,
            schedule=lambda callback: loop.call_later(0, callback),
            clock=self._clock,
        )
        self._batch = batch
        if taken.deadline == math.inf and self._settings.publish_budget is not None:
            taken.deadline = self._clock() + self._settings.publish_budget  # its first publish
        # The progress the watchdog found overdue, to look again at once the loop has read the
        # socket; None when nothing is overdue.
        overdue: float | None = None

        def watchdog() -> None:
            # Fires once a full timeout has passed since the last confirm (or since the publish
            # that left a message outstanding when none was), not since its own last look: that
            # let a stall go unnoticed for up to twice the timeout.
            nonlocal overdue
            if batch.settled:  # also by a scheduled pump that sent nothing (see _pump_and_settle)
                stop_if_current()
                return
            wait = batch.progress_at + self._settings.confirm_timeout - self._clock()
            if wait > 0 or not batch.in_flight:  # nothing outstanding: nothing to wait for yet
                overdue = None
                loop.call_later(wait if wait > 0 else self._settings.confirm_timeout, watchdog)
            elif overdue != batch.progress_at:
                # The loop may have been busy in the caller's code (a confirm callback pulls the
                # next messages from the source) with confirms unread on the socket: look again
                # after the loop has read it. Also when a confirm came since the last look: the
                # source then ran in its callback, and the socket was not read after it.
                overdue = batch.progress_at
                loop.call_later(0, watchdog)
            else:
                batch.timed_out = True
                loop.stop()

        try:
            batch.pump()
            if not batch.settled:
                loop.call_later(0, watchdog)
                if taken.deadline < math.inf:
                    self._watch_budget(batch, loop, stop_if_current)
                loop.start()
            if batch.error is not None:  # raised by the caller's code inside a pika callback
                raise batch.error
        except BaseException:
            self._discard()
            raise
        finally:
            if batch.meanwhile_timer is not None:  # settled before it ran: not into a later call
                loop.remove_timeout(batch.meanwhile_timer)
            self._batch = None
            self._published = batch.next_tag - 1
            self._last_used = self._clock()
        if batch.timed_out or self._blocked:
            failure = Failure.TIMEOUT if batch.timed_out else Failure.UNAVAILABLE
            for i in batch.unresolved():
                taken.outcomes[i] = Outcome(taken.messages[i].message_id, failure=failure)
            # The broker is slow or blocked: the rest goes elsewhere rather than wait again.
            taken.gave_up = True
            self._discard()
            return []
        return batch.unresolved() if batch.lost else []

    def _watch_budget(self, batch: _Batch, loop: Any, stop_if_current: Callable[[], None]) -> None:
        """Time ``batch`` out once its call's publish budget is spent (``_Taken.deadline``)."""
        taken = batch.taken
        # The deadline found passed, to look again once the loop has read the socket, as the
        # watchdog does: confirms already there came in time.
        passed: float | None = None

        def look() -> None:
            nonlocal passed
            if batch.settled:
                stop_if_current()
                return
            deadline = taken.deadline
            wait = deadline - self._clock()
            if wait > 0:  # moved on by time spent in the caller's code
                loop.call_later(wait, look)
            elif passed != deadline:
                passed = deadline
                loop.call_later(0, look)
            else:
                _LOG.warning(
                    "rabbitmq publish budget of %.1f s spent: %d message(s) unconfirmed",
                    self._settings.publish_budget,
                    len(batch.unresolved()),
                )
                batch.timed_out = True
                loop.stop()

        loop.call_later(0, look)

    def _publisher(
        self, connection: _CoalescingConnection, channel: Channel
    ) -> Callable[[OutboundMessage], None]:
        """Publishes one message on ``channel``: persistent, mandatory, frames encoded by
        ``PublishFrames`` (the bytes pika's ``basic_publish`` would send)."""
        frames = PublishFrames(channel.channel_number, connection.body_max)
        exchange_for, send = self._exchange_for, connection.send_frames
        # An audit batch names its publisher in user-id, which RabbitMQ checks against the
        # connection's user: the audit writer can tell the platform's records from a consumer's.
        audit_user = self._user or None

        def publish(message: OutboundMessage) -> None:
            if not channel.is_open:
                raise pika.exceptions.ChannelWrongStateError("channel is closed")
            send(
                frames.encode(
                    message,
                    exchange=exchange_for(message),
                    routing_key=message.redeliver_to or message.topic,
                    timestamp=int(time.time()),
                    user_id=audit_user if message.kind is MessageKind.AUDIT else None,
                )
            )

        return publish

    # -- callbacks ----------------------------------------------------------------------------

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        if self._batch is not None:
            method = frame.method
            self._batch.confirm(
                method.delivery_tag, multiple=method.multiple, ack=isinstance(method, Basic.Ack)
            )

    def _on_return(
        self, _channel: Channel, _method: Basic.Return, properties: BasicProperties, _body: bytes
    ) -> None:
        # Any message id, "" included (a redriven dead letter may carry none): a return that
        # went unmatched would let the ack that follows it count as stored.
        if self._batch is not None:
            self._batch.returned(properties.message_id)

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        normal = isinstance(reason, pika.exceptions.ChannelClosedByClient) or (
            self._closing and isinstance(reason, pika.exceptions.ChannelClosed)
        )
        _LOG.log(
            logging.DEBUG if normal else logging.WARNING, "rabbitmq channel closed: %s", reason
        )
        if self._batch is not None:
            if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and (
                reason.reply_code == _NOT_FOUND
            ):
                self._batch.doubt_routing()
            self._batch.lose()
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _on_connection_closed(
        self, _connection: pika.BaseConnection, reason: BaseException
    ) -> None:
        normal = isinstance(reason, pika.exceptions.ConnectionClosedByClient)
        level = logging.DEBUG if normal else logging.WARNING
        _LOG.log(level, "rabbitmq connection closed: %s", type(reason).__name__)
        if self._batch is not None:
            self._batch.lose()
        self._channel = None

    def _on_blocked(self, connection: pika.BaseConnection, _frame: Any) -> None:
        _LOG.warning("rabbitmq connection blocked by a resource alarm")
        if connection is not self._connection:
            # A connection being dropped (its loop runs while _discard closes it): marking the
            # transport blocked would keep connect() from ever opening the next one.
            return
        self._blocked = True
        if self._batch is not None:
            self._batch.lose()

    def _on_unblocked(self, connection: pika.BaseConnection, _frame: Any) -> None:
        if connection is self._connection:
            self._blocked = False


class _Taken:
    """The messages a publish call has pulled from its source so far, with their outcomes, and
    the caller's ``meanwhile`` until it has run."""

    def __init__(self, meanwhile: Callable[[], None] | None) -> None:
        self.messages: list[OutboundMessage] = []
        self.outcomes: list[Outcome | None] = []
        self.exhausted = False
        self.gave_up = False
        self.meanwhile = meanwhile
        # When the publish budget is spent: its length after the call's first publish, moved on
        # by the time spent in the caller's code since. Never without a budget.
        self.deadline = math.inf

    def take(self, message: OutboundMessage) -> int:
        self.messages.append(message)
        self.outcomes.append(None)
        return len(self.messages) - 1

    def spent(self, now: float) -> bool:
        """Whether the publish budget is spent: nothing more is published."""
        return now >= self.deadline

    def caller_ran(self, seconds: float) -> None:
        """The caller's code ran for ``seconds``: not the broker's time."""
        self.deadline += seconds


class _Batch:
    """Book-keeping of one pass over a connection: delivery tags in flight, returns, outcomes."""

    def __init__(
        self,
        source: Iterator[OutboundMessage],
        taken: _Taken,
        retry: list[int],
        *,
        publish: Callable[[OutboundMessage], None],
        first_tag: int,
        window: int,
        coalesced: Callable[[], contextlib.AbstractContextManager[None]],
        handed: Callable[[], int],
        written: Callable[[], int],
        on_settled: Callable[[], None],
        schedule: Callable[[Callable[[], None]], object],
        clock: Callable[[], float],
    ) -> None:
        self.coalesced = coalesced
        self.handed = handed
        self.written = written
        self.end_of: dict[int, int] = {}  # delivery tag -> ``handed()`` after its frames
        self.schedule = schedule
        self.pump_scheduled = False
        self.meanwhile_timer: object | None = None  # the scheduled meanwhile, until it runs
        self.meanwhile_waits = 0  # turns it waited for the loop to write the last chunk
        self.source = source
        self.taken = taken
        self.on_settled = on_settled
        self.publish = publish
        self.window = window
        self.queue = list(reversed(retry))
        self.in_flight: dict[int, int] = {}  # delivery tag -> message index
        self.accepted: list[int] = []  # indices confirmed stored in this pass
        self.returned_ids: set[str | None] = set()
        self.next_tag = first_tag
        self.clock = clock
        # When the last confirm came, or the publish that left a message outstanding when none
        # was: the confirm timeout counts from there.
        self.progress_at = clock()
        self.lost = False
        self.timed_out = False
        # What the caller's code (the source, via pump) raised inside a pika callback. pika
        # catches exceptions of its callbacks and only aborts the connection, so the call
        # would go on as if the source had ended: it is carried out of the loop instead.
        self.error: BaseException | None = None

    @property
    def settled(self) -> bool:
        """Every message has an outcome, or the rest cannot get one on this connection."""
        drained = not self.queue and not self.in_flight and self.taken.exhausted
        return drained or self.lost or self.timed_out or self.error is not None

    def _next(self) -> int | None:
        if self.queue:
            return self.queue.pop()
        if self.taken.exhausted:
            return None
        started = self.clock()
        message = next(self.source, None)
        self.taken.caller_ran(self.clock() - started)
        if message is None:
            self.taken.exhausted = True
            return None
        return self.taken.take(message)

    def doubt_routing(self) -> None:
        """The broker closed the channel for an exchange it no longer has (404): one was
        deleted under this pass. RabbitMQ routes a publish that races the deletion by the
        bindings it reads as they are removed, not atomically: a message it confirmed just
        before may have reached only some of its queues (measured on 3.10). The messages
        confirmed stored in this pass are unconfirmed again: published once more on a new
        connection, then sent elsewhere, which may duplicate copies but loses none. (It
        matters where confirms came back between publishes: a slow source, a set rate. A
        message an earlier call confirmed was answered already: docs/router.md.)"""
        for index in self.accepted:
            self.taken.outcomes[index] = None
            self.queue.append(index)
        self.accepted.clear()

    def lose(self) -> None:
        """The channel or connection is gone: what is unconfirmed stays without an outcome."""
        self.lost = True
        self.on_settled()

    def pump(self) -> None:
        """Publish until the window is full or nothing is left, a chunk at a time.

        Between chunks the I/O loop runs: pika only writes buffered frames to the socket from
        the loop, so chunking lets the broker store earlier messages while later ones are still
        being prepared (the source may be a generator that validates and encrypts).
        """
        # Nothing outstanding that the loop has written: earlier callbacks of this turn
        # (confirms read together, a scheduled pump) may have published what is, and the
        # confirms read with them settled everything written before.
        idle = self._nothing_written_outstanding()
        with self.coalesced():
            more = self._publish_chunk()
        if idle and self.in_flight:
            # The broker's time starts when this chunk's frames are written, after it, not at
            # its first publish. The caller's source may have spent longer than the timeout in
            # between (validating, encrypting, a KMS call for a new data key). Time spent here
            # with written messages outstanding is not credited: their confirms wait on the
            # socket for the watchdog's look.
            self.progress_at = self.clock()
        if more:
            if not self.pump_scheduled:
                self.pump_scheduled = True
                self.schedule(self._scheduled_pump)
        elif self.taken.exhausted and self.taken.meanwhile and self.meanwhile_timer is None:
            # A timer: from the first call's pump, after the loop has written the last chunk;
            # from a confirm's callback, in the same turn (pika writes on the next one: it
            # waits for that, see _run_meanwhile).
            self.meanwhile_timer = self.schedule(self._run_meanwhile)

    def _nothing_written_outstanding(self) -> bool:
        """Whether no outstanding message has reached the socket: the broker's time has not
        begun. Frames are written in order, so the oldest outstanding message tells. (A socket
        that takes nothing more, as from a broker that stopped reading, looks the same: such a
        stall is noticed once the window is full or the source ends, the router's within its
        publish budget.)"""
        if not self.in_flight:
            return True
        return self.end_of.get(next(iter(self.in_flight)), 0) > self.written()

    def _scheduled_pump(self) -> None:
        # Only this one clears the flag: a pump from a confirm's callback meanwhile leaves the
        # scheduled one pending, rather than adding one more each confirm (they piled up, and
        # each turn of the loop ran them all before the watchdog's look).
        self.pump_scheduled = False
        self._pump_and_settle()

    def _pump_and_settle(self) -> None:
        """``pump`` as the loop runs it: between chunks, or after a confirm. It may settle the
        batch with nothing left to confirm (the rest were messages AMQP cannot carry, failed
        without a publish): then no confirm comes to stop the loop, so it stops it itself."""
        try:
            self.pump()
        except BaseException as exc:  # see ``error``
            self.error = exc
        if self.settled:
            self.on_settled()

    def _publish_chunk(self) -> bool:
        """Publish up to a chunk; False once the window is full or nothing is left to send."""
        for _ in range(_PUMP_CHUNK):
            if len(self.in_flight) >= self.window or self.lost or self.taken.spent(self.clock()):
                return False
            index = self._next()
            if index is None:
                return False
            message = self.taken.messages[index]
            try:
                self.publish(message)
            except _UNFRAMEABLE as exc:
                # This message, not the connection: nothing of it was sent. The drain and the
                # redrive publish what anyone may have put in their queues.
                _LOG.warning(
                    "message %r cannot be sent over AMQP: %s",
                    message.message_id[:80],
                    type(exc).__name__,
                )
                self.taken.outcomes[index] = Outcome(message.message_id, failure=Failure.NACKED)
                continue
            except (pika.exceptions.AMQPError, OSError):
                self.queue.append(index)
                self.lose()
                return False
            self.in_flight[self.next_tag] = index
            self.end_of[self.next_tag] = self.handed()
            self.next_tag += 1
        return True

    def _run_meanwhile(self) -> None:
        self.meanwhile_timer = None
        if self.written() < self.handed() and self.meanwhile_waits < _MEANWHILE_WAITS:
            # Scheduled in the turn that published the last chunk (a confirm's callback): let
            # the loop write it first, or the broker could not store it while the caller's
            # work goes on. A socket that takes nothing more is not waited for long.
            self.meanwhile_waits += 1
            self.meanwhile_timer = self.schedule(self._run_meanwhile)
            return
        meanwhile, self.taken.meanwhile = self.taken.meanwhile, None
        if meanwhile is not None:
            started = self.clock()
            idle = self._nothing_written_outstanding()
            meanwhile()
            self.taken.caller_ran(self.clock() - started)
            if idle and self.in_flight:  # as in ``pump``: the last chunk is written after this
                self.progress_at = self.clock()

    def confirm(self, tag: int, *, multiple: bool, ack: bool) -> None:
        if multiple:
            # Tags are inserted in increasing order, so the acknowledged ones are at the front.
            tags = []
            for t in self.in_flight:
                if t > tag:
                    break
                tags.append(t)
        else:
            tags = [tag]
        for t in tags:
            index = self.in_flight.pop(t, None)
            self.end_of.pop(t, None)
            if index is None:
                continue
            message = self.taken.messages[index]
            if not ack:
                outcome = Outcome(message.message_id, failure=Failure.NACKED)
            elif message.message_id in self.returned_ids:
                outcome = Outcome(message.message_id, failure=Failure.RETURNED)
            else:
                outcome = Outcome(message.message_id, transport=TRANSPORT_NAME)
                self.accepted.append(index)
            self.taken.outcomes[index] = outcome
        self.progress_at = self.clock()
        if self.error is None:
            self._pump_and_settle()

    def returned(self, message_id: str | None) -> None:
        self.returned_ids.add(message_id)

    def unresolved(self) -> list[int]:
        return sorted({*self.in_flight.values(), *self.queue})
