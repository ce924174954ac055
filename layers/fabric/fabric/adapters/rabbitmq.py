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
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from fabric.errors import TransportUnavailable
from fabric.ports import Failure, OutboundMessage, Outcome

_LOG = logging.getLogger(__name__)
TRANSPORT_NAME = "rabbitmq"


@dataclass(frozen=True)
class RabbitSettings:
    """How to reach the broker, and the timeouts that bound how long a failure takes to notice.

    Defaults: ``connect_timeout`` 2 s (TCP + TLS + AMQP handshake), ``confirm_timeout`` 1 s without
    any confirm while messages are outstanding, ``heartbeat`` 10 s, ``blocked_timeout`` 2 s
    under a memory or disk alarm. A connection idle for longer than the heartbeat (a frozen
    Lambda) is replaced before use rather than trusted.
    """

    host: str
    port: int
    credentials: Callable[[], tuple[str, str]]  # (username, password), read when connecting
    vhost: str = "/"
    use_tls: bool = False
    connect_timeout: float = 2.0
    confirm_timeout: float = 1.0
    heartbeat: int = 10
    blocked_timeout: float = 2.0
    confirm_window: int = 2000
    connection_name: str = "fabric-router"

    def __repr__(self) -> str:  # never print credentials
        scheme = "amqps" if self.use_tls else "amqp"
        return f"RabbitSettings({scheme}://{self.host}:{self.port}/{self.vhost})"


class _ConnectFailed(Exception):
    pass


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
        self._connection: SelectConnection | None = None
        self._channel: Channel | None = None
        self._last_used = 0.0
        self._blocked = False
        self._batch: _Batch | None = None

    # -- public API ---------------------------------------------------------------------------

    def publish(self, messages: Sequence[OutboundMessage]) -> list[Outcome]:
        """Publish ``messages``; one Outcome per message, in order. Never raises for I/O trouble.

        A message whose connection dies before its confirm is published once more on a new
        connection (the stale-connection case); if that fails too, it is reported
        ``UNAVAILABLE``. Messages without a confirm within the confirm timeout are ``TIMEOUT``
        and the connection is dropped, because it can no longer be trusted.
        """
        outcomes: list[Outcome | None] = [None] * len(messages)
        pending = list(range(len(messages)))
        for attempt in range(2):
            if not pending:
                break
            if self._blocked:
                break
            try:
                self._ensure_open()
            except _ConnectFailed:
                self._reset()
                if attempt == 0:
                    continue
                break
            pending = self._publish_batch(messages, pending, outcomes)
            if pending:
                self._reset()
        failure = Failure.UNAVAILABLE
        return [
            outcome if outcome is not None else Outcome(messages[i].message_id, failure=failure)
            for i, outcome in enumerate(outcomes)
        ]

    def close(self) -> None:
        """Close the connection; the next publish opens a new one."""
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()
            self._run_until(lambda: connection.is_closed, self._settings.connect_timeout)
        self._reset()

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

    def _parameters(self) -> pika.ConnectionParameters:
        settings = self._settings
        username, password = settings.credentials()
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
            parameters = self._parameters()
        except TransportUnavailable as exc:
            _LOG.warning("rabbitmq credentials unavailable: %s", exc)
            raise _ConnectFailed from exc

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

        connection = SelectConnection(
            parameters=parameters,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=self._on_connection_closed,
        )
        self._connection = connection
        self._blocked = False
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._run_until(
            lambda: "ready" in state or "error" in state or connection.is_closed,
            self._settings.connect_timeout,
        )
        if "ready" not in state:
            _LOG.warning("rabbitmq connect failed: %s", type(state.get("error")).__name__)
            self._discard()
            raise _ConnectFailed
        self._channel = state["ready"]
        self._published = 0
        self._last_used = self._clock()

    def _discard(self) -> None:
        connection = self._connection
        self._reset()
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()
            # Let the loop deliver the close so the socket is released.
            self._run_until(lambda: connection.is_closed, 0.2, connection=connection)

    def _reset(self) -> None:
        self._connection = None
        self._channel = None
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
        self,
        messages: Sequence[OutboundMessage],
        indices: list[int],
        outcomes: list[Outcome | None],
    ) -> list[int]:
        """Publish ``indices`` with a confirm window; return those lost with the connection."""
        if self._connection is None or self._channel is None:
            return indices
        loop = self._connection.ioloop
        batch = _Batch(
            messages,
            indices,
            outcomes,
            channel=self._channel,
            first_tag=self._published + 1,
            window=self._settings.confirm_window,
            exchange_for=self._exchange_for,
            on_settled=loop.stop,
        )
        self._batch = batch
        timeout = self._settings.confirm_timeout
        seen = -1

        def watchdog() -> None:
            # Re-armed while confirms keep arriving; fires once a full timeout passes without one.
            nonlocal seen
            if batch.settled:
                return
            if batch.confirmed == seen:
                batch.timed_out = True
                loop.stop()
                return
            seen = batch.confirmed
            loop.call_later(timeout, watchdog)

        try:
            batch.pump()
            if not batch.settled:
                loop.call_later(0, watchdog)
                loop.start()
        finally:
            self._batch = None
            self._published = batch.next_tag - 1
            self._last_used = self._clock()
        if batch.timed_out or self._blocked:
            failure = Failure.TIMEOUT if batch.timed_out else Failure.UNAVAILABLE
            for i in batch.unresolved():
                outcomes[i] = Outcome(messages[i].message_id, failure=failure)
            self._discard()
            return []
        return batch.unresolved() if batch.lost else []

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
        if self._batch is not None and properties.message_id:
            self._batch.returned(properties.message_id)

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        _LOG.warning("rabbitmq channel closed: %s", reason)
        if self._batch is not None:
            self._batch.lose()
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _on_connection_closed(
        self, _connection: pika.BaseConnection, reason: BaseException
    ) -> None:
        _LOG.warning("rabbitmq connection closed: %s", type(reason).__name__)
        if self._batch is not None:
            self._batch.lose()
        self._channel = None

    def _on_blocked(self, _connection: pika.BaseConnection, _frame: Any) -> None:
        _LOG.warning("rabbitmq connection blocked by a resource alarm")
        self._blocked = True
        if self._batch is not None:
            self._batch.lose()

    def _on_unblocked(self, _connection: pika.BaseConnection, _frame: Any) -> None:
        self._blocked = False


class _Batch:
    """Book-keeping of one publish call: delivery tags in flight, returns, outcomes."""

    def __init__(
        self,
        messages: Sequence[OutboundMessage],
        indices: list[int],
        outcomes: list[Outcome | None],
        *,
        channel: Channel,
        first_tag: int,
        window: int,
        exchange_for: Callable[[OutboundMessage], str],
        on_settled: Callable[[], None],
    ) -> None:
        self.on_settled = on_settled
        self.messages = messages
        self.outcomes = outcomes
        self.channel = channel
        self.window = window
        self.exchange_for = exchange_for
        self.queue = list(reversed(indices))
        self.in_flight: dict[int, int] = {}  # delivery tag -> message index
        self.by_message_id: dict[str, int] = {}
        self.returned_ids: set[str] = set()
        self.next_tag = first_tag
        self.confirmed = 0
        self.lost = False
        self.timed_out = False

    @property
    def settled(self) -> bool:
        """Every message has an outcome, or the rest cannot get one on this connection."""
        return (not self.queue and not self.in_flight) or self.lost or self.timed_out

    def lose(self) -> None:
        """The channel or connection is gone: what is unconfirmed stays without an outcome."""
        self.lost = True
        self.on_settled()

    def pump(self) -> None:
        """Publish until the window is full or nothing is left."""
        while self.queue and len(self.in_flight) < self.window and not self.lost:
            index = self.queue.pop()
            message = self.messages[index]
            properties = _properties(message)
            try:
                self.channel.basic_publish(
                    exchange=self.exchange_for(message),
                    routing_key=message.topic,
                    body=message.body,
                    properties=properties,
                    mandatory=True,
                )
            except (pika.exceptions.AMQPError, OSError):
                self.queue.append(index)
                self.lose()
                return
            self.in_flight[self.next_tag] = index
            self.by_message_id[message.message_id] = index
            self.next_tag += 1

    def confirm(self, tag: int, *, multiple: bool, ack: bool) -> None:
        tags = [t for t in self.in_flight if t <= tag] if multiple else [tag]
        for t in tags:
            index = self.in_flight.pop(t, None)
            if index is None:
                continue
            message = self.messages[index]
            self.confirmed += 1
            if not ack:
                self.outcomes[index] = Outcome(message.message_id, failure=Failure.NACKED)
            elif message.message_id in self.returned_ids:
                self.outcomes[index] = Outcome(message.message_id, failure=Failure.RETURNED)
            else:
                self.outcomes[index] = Outcome(message.message_id, transport=TRANSPORT_NAME)
        self.pump()
        if self.settled:
            self.on_settled()

    def returned(self, message_id: str) -> None:
        self.returned_ids.add(message_id)

    def unresolved(self) -> list[int]:
        return sorted({*self.in_flight.values(), *self.queue})


def _properties(message: OutboundMessage) -> BasicProperties:
    headers = dict(message.headers)
    return BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        timestamp=int(time.time()),
        type=message.topic,
        headers=headers or None,
    )
