"""RabbitMQ management HTTP API client (stdlib only): Amazon MQ's one way to configure a broker."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from fabric.errors import (
    ConfigError,
    ManagementApiError,
    ManagementRequestRejected,
    ManagementUnavailable,
)

_LOG = logging.getLogger(__name__)

JsonObject = dict[str, Any]

# Throttled or timed out at the server: the same request may succeed later.
_RETRYABLE_4XX = frozenset({408, 429})
_NOT_FOUND = 404
_QUEUE_COLUMNS = "name,durable,auto_delete,arguments,messages"
# RabbitMQ's collect_statistics_interval by default (Amazon MQ keeps it); the management API
# does not tell it.
STATISTICS_INTERVAL_S = 5.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would replay the Authorization header to wherever they point."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


class ManagementClient:
    """A thin client for the management API endpoints the topology applier needs.

    Names and vhosts are percent-encoded in every path (vhost ``/`` is ``%2F``). Every failure
    is translated into ``ManagementApiError`` subclasses: ``ManagementUnavailable`` for refused
    connections, timeouts, TLS failures, 5xx, 408 and 429 (the transient ones once retries are
    spent, see ``__init__``); ``ManagementRequestRejected`` (with the HTTP status and the API's
    ``reason``) for other 4xx. Credentials never appear in exceptions, logs or ``repr``.
    ``get_*`` return ``None`` and ``delete_*`` return ``False`` when the object does not exist;
    a DELETE tried again after a 5xx or a dropped connection (the broker may have carried it out
    and lost the answer; not after a 408, a 429 or a refused connection) that then finds the
    object gone returns ``True``.
    """

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        *,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        retries: int = 2,
        backoff: float = 0.5,
        deadline: float | None = None,
        statistics_interval: float | None = None,
    ) -> None:
        """Check the URL and build the opener; no request is made.

        ``base_url`` is where the API lives without ``/api`` (``http://127.0.0.1:15672``, or the
        broker's ``https://…mq.<region>.amazonaws.com`` console URL). HTTPS verifies the server
        with the system's CA bundle unless ``ssl_context`` says otherwise. A call the API
        answers with 5xx, 408 or 429, or whose connection is refused or dropped, is tried again
        up to ``retries`` times, ``backoff`` seconds later, then twice that, and so on.
        ``deadline`` (a ``time.monotonic()`` value) bounds every call, waits and retries
        included: a call that would end after it raises ``ManagementUnavailable`` instead (a
        Lambda that must answer before its own timeout). ``statistics_interval`` is the broker's
        ``collect_statistics_interval`` in seconds (``STATISTICS_INTERVAL_S`` when not given:
        the API does not report it), which ``wait_for_statistics`` waits on.

        Raises:
            ConfigError: ``base_url`` is not an http(s) URL with a host, or carries credentials.
        """
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("management base_url must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ConfigError("management base_url must not carry credentials")
        self._base_url = base_url.rstrip("/")
        self._username = username
        self._password = password
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._authorization = f"Basic {token}"
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._deadline = deadline
        self._statistics_interval = (
            STATISTICS_INTERVAL_S if statistics_interval is None else statistics_interval
        )
        context = ssl_context
        if context is None and parts.scheme == "https":
            context = ssl.create_default_context()
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context), _NoRedirect()
        )

    def __repr__(self) -> str:
        return f"ManagementClient({self._base_url!r}, username={self._username!r})"

    @property
    def username(self) -> str:
        """The user this client authenticates as."""
        return self._username

    # --- broker ---------------------------------------------------------------------------

    def overview(self) -> JsonObject:
        """The broker's overview (``rabbitmq_version``, ``management_version``, cluster name…).

        Raises:
            ManagementApiError: see the class docstring.
        """
        result: JsonObject = self._call("GET", ("overview",))
        return result

    def server_version(self) -> str:
        """The RabbitMQ version the broker reports, e.g. ``3.10.8`` or ``3.13.7``.

        Raises:
            ManagementApiError: see the class docstring.
        """
        return str(self.overview().get("rabbitmq_version", ""))

    # --- vhosts ---------------------------------------------------------------------------

    def get_vhost(self, name: str) -> JsonObject | None:
        """The vhost, or ``None`` if it does not exist.

        Raises:
            ManagementApiError: see the class docstring.
        """
        return self._get_or_none(("vhosts", name))

    def put_vhost(self, name: str) -> None:
        """Create the vhost (no-op if it exists).

        RabbitMQ grants the user creating a vhost through this API full permissions on it.

        Raises:
            ManagementApiError: see the class docstring.
        """
        self._call("PUT", ("vhosts", name), body={})

    def delete_vhost(self, name: str) -> bool:
        """Delete the vhost **with everything in it**; ``False`` if it did not exist.

        Raises:
            ManagementApiError: see the class docstring.
        """
        return self._delete(("vhosts", name))

    # --- exchanges ------------------------------------------------------------------------

    def list_exchanges(self, vhost: str) -> list[JsonObject]:
        """Every exchange of the vhost, built-in ones (``""``, ``amq.*``) included.

        Raises:
            ManagementRequestRejected: status 404 when the vhost does not exist.
            ManagementApiError: see the class docstring.
        """
        result: list[JsonObject] = self._call("GET", ("exchanges", vhost))
        return result

    def put_exchange(
        self,
        vhost: str,
        name: str,
        *,
        exchange_type: str,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: Mapping[str, Any],
    ) -> None:
        """Declare the exchange (``exchange_type`` ``topic``, ``fanout``, ``headers``…).

        Raises:
            ManagementRequestRejected: status 400 when it exists with other properties.
            ManagementApiError: see the class docstring.
        """
        body = {
            "type": exchange_type,
            "durable": durable,
            "auto_delete": auto_delete,
            "internal": internal,
            "arguments": dict(arguments),
        }
        self._call("PUT", ("exchanges", vhost, name), body=body)

    def delete_exchange(self, vhost: str, name: str) -> bool:
        """Delete the exchange and every binding to or from it; ``False`` if it did not exist.

        Raises:
            ManagementApiError: see the class docstring.
        """
        return self._delete(("exchanges", vhost, name))

    # --- queues ---------------------------------------------------------------------------

    def list_queues(self, vhost: str) -> list[JsonObject]:
        """The vhost's queues: ``name``, ``durable``, ``auto_delete``, ``arguments``, ``messages``.

        ``messages`` (ready + unacknowledged) comes from the management statistics, sampled
        every few seconds; it is absent until the first sample of a new queue.

        Raises:
            ManagementRequestRejected: status 404 when the vhost does not exist.
            ManagementApiError: see the class docstring.
        """
        result: list[JsonObject] = self._call(
            "GET", ("queues", vhost), query={"columns": _QUEUE_COLUMNS}
        )
        return result

    def wait_for_statistics(self) -> None:
        """Return once the statistics show what each queue held when this was called.

        A queue reports its length every interval (a quorum queue on its tick, 5 s by default
        too) and the management plugin collects the reports every interval: a count can be two
        intervals old. This waits three.

        Raises:
            ManagementUnavailable: the wait would end after the deadline (nothing is waited).
        """
        pause = 3 * self._statistics_interval
        if self._left() <= pause:
            raise ManagementUnavailable(
                "no time left before the deadline to wait for fresh statistics",
                method="WAIT",
                path="statistics",
            )
        time.sleep(pause)

    def get_queue(self, vhost: str, name: str) -> JsonObject | None:
        """The queue (same fields as ``list_queues``), or ``None`` if it does not exist.

        Raises:
            ManagementApiError: see the class docstring.
        """
        return self._get_or_none(("queues", vhost, name), query={"columns": _QUEUE_COLUMNS})

    def put_queue(
        self,
        vhost: str,
        name: str,
        *,
        durable: bool,
        auto_delete: bool,
        arguments: Mapping[str, Any],
    ) -> None:
        """Declare the queue (``x-queue-type`` in ``arguments`` picks quorum, classic…).

        Raises:
            ManagementRequestRejected: status 400 when it exists with other properties.
            ManagementApiError: see the class docstring.
        """
        body = {"durable": durable, "auto_delete": auto_delete, "arguments": dict(arguments)}
        self._call("PUT", ("queues", vhost, name), body=body)

    def delete_queue(self, vhost: str, name: str) -> bool:
        """Delete the queue **and its messages**; ``False`` if it did not exist.

        There is no ``if-empty`` option: quorum queues refuse it.

        Raises:
            ManagementApiError: see the class docstring.
        """
        return self._delete(("queues", vhost, name))

    # --- bindings -------------------------------------------------------------------------

    def list_bindings(self, vhost: str) -> list[JsonObject]:
        """Every binding of the vhost, the default exchange's implicit ones (source ``""``) too.

        Raises:
            ManagementRequestRejected: status 404 when the vhost does not exist.
            ManagementApiError: see the class docstring.
        """
        result: list[JsonObject] = self._call("GET", ("bindings", vhost))
        return result

    def create_binding(
        self,
        vhost: str,
        *,
        source: str,
        destination: str,
        destination_type: str,
        routing_key: str,
        arguments: Mapping[str, Any],
    ) -> None:
        """Bind ``destination`` (``destination_type`` ``queue`` or ``exchange``) to ``source``.

        Creating a binding that exists already changes nothing.

        Raises:
            ManagementRequestRejected: status 404 when source or destination does not exist.
            ManagementApiError: see the class docstring.
            ValueError: ``destination_type`` is neither ``queue`` nor ``exchange``.
        """
        kind = _destination_kind(destination_type)
        body = {"routing_key": routing_key, "arguments": dict(arguments)}
        self._call("POST", ("bindings", vhost, "e", source, kind, destination), body=body)

    def delete_binding(
        self,
        vhost: str,
        *,
        source: str,
        destination: str,
        destination_type: str,
        properties_key: str,
    ) -> bool:
        """Delete one binding, named by the ``properties_key`` that ``list_bindings`` gave it;
        ``False`` if it did not exist.

        Raises:
            ManagementApiError: see the class docstring.
            ValueError: ``destination_type`` is neither ``queue`` nor ``exchange``.
        """
        kind = _destination_kind(destination_type)
        # The key is listed URL-encoded already, and is quoted once more as a path segment:
        # that is the form the API matches (a routing key "a/b #" lists as "a%2Fb+%23").
        return self._delete(("bindings", vhost, "e", source, kind, destination, properties_key))

    # --- users and permissions ------------------------------------------------------------

    def get_user(self, name: str) -> JsonObject | None:
        """The user (``tags``, ``password_hash``, ``hashing_algorithm``), or ``None``.

        Raises:
            ManagementApiError: see the class docstring.
        """
        return self._get_or_none(("users", name))

    def put_user(self, name: str, *, password: str, tags: list[str]) -> None:
        """Create or update the user with this password and exactly these tags.

        Amazon MQ requires the password (or its hash) on every PUT; without one RabbitMQ would
        leave the user unable to log in with a password.

        Raises:
            ManagementApiError: see the class docstring.
        """
        # A comma-separated string is the one tag format every version from 3.10 to 4.x accepts.
        body = {"password": password, "tags": ",".join(tags)}
        self._call("PUT", ("users", name), body=body, redact=(password,))

    def delete_user(self, name: str) -> bool:
        """Delete the user and all its permissions; ``False`` if it did not exist.

        Raises:
            ManagementApiError: see the class docstring.
        """
        return self._delete(("users", name))

    def list_permissions(self, vhost: str) -> list[JsonObject]:
        """Every user's permissions on the vhost (``user``, ``configure``, ``write``, ``read``).

        Raises:
            ManagementRequestRejected: status 404 when the vhost does not exist.
            ManagementApiError: see the class docstring.
        """
        result: list[JsonObject] = self._call("GET", ("vhosts", vhost, "permissions"))
        return result

    def put_permissions(
        self, vhost: str, user: str, *, configure: str, write: str, read: str
    ) -> None:
        """Set the user's permission regexes on the vhost.

        Raises:
            ManagementRequestRejected: status 400 when the user or vhost does not exist.
            ManagementApiError: see the class docstring.
        """
        body = {"configure": configure, "write": write, "read": read}
        self._call("PUT", ("permissions", vhost, user), body=body)

    def delete_permissions(self, vhost: str, user: str) -> bool:
        """Remove the user's permissions on the vhost; ``False`` if it had none.

        Raises:
            ManagementApiError: see the class docstring.
        """
        return self._delete(("permissions", vhost, user))

    # --- global parameters ----------------------------------------------------------------

    def get_global_parameter(self, name: str) -> Any:
        """The value of the broker-wide parameter ``name``, or ``None`` if it is not set.

        Raises:
            ManagementApiError: see the class docstring.
        """
        found = self._get_or_none(("global-parameters", name))
        return None if found is None else found.get("value")

    def put_global_parameter(self, name: str, value: Any) -> None:
        """Set the broker-wide parameter ``name`` to ``value`` (any JSON value).

        Raises:
            ManagementApiError: see the class docstring.
        """
        self._call("PUT", ("global-parameters", name), body={"name": name, "value": value})

    def delete_global_parameter(self, name: str) -> bool:
        """Remove the broker-wide parameter ``name``; ``False`` if it was not set.

        Raises:
            ManagementApiError: see the class docstring.
        """
        return self._delete(("global-parameters", name))

    # --- connections ----------------------------------------------------------------------

    def list_connections(self, vhost: str) -> list[JsonObject]:
        """The client connections to the vhost: ``name`` and ``user`` of each.

        Raises:
            ManagementRequestRejected: status 404 when the vhost does not exist.
            ManagementApiError: see the class docstring.
        """
        result: list[JsonObject] = self._call(
            "GET", ("vhosts", vhost, "connections"), query={"columns": "name,user"}
        )
        return result

    def list_consumers(self, vhost: str) -> list[JsonObject]:
        """The consumers on the vhost: ``queue.name`` and the ``channel_details``
        (``connection_name``, ``user``) of each.

        Raises:
            ManagementRequestRejected: status 404 when the vhost does not exist.
            ManagementApiError: see the class docstring.
        """
        result: list[JsonObject] = self._call(
            "GET",
            ("consumers", vhost),
            query={"columns": "queue.name,channel_details.connection_name,channel_details.user"},
        )
        return result

    def close_connection(self, name: str, *, reason: str) -> bool:
        """Close the connection ``list_connections`` named so, telling the client ``reason``;
        ``False`` if it was closed already.

        Raises:
            ManagementApiError: see the class docstring.
        """
        return self._delete(("connections", name), headers={"X-Reason": reason})

    # --- transport ------------------------------------------------------------------------

    def _get_or_none(
        self, segments: tuple[str, ...], query: Mapping[str, str] | None = None
    ) -> JsonObject | None:
        try:
            result: JsonObject = self._call("GET", segments, query=query)
        except ManagementRequestRejected as exc:
            if exc.status == _NOT_FOUND:
                return None
            raise
        return result

    def _delete(self, segments: tuple[str, ...], headers: Mapping[str, str] | None = None) -> bool:
        try:
            self._call("DELETE", segments, headers=headers)
        except ManagementRequestRejected as exc:
            if exc.status == _NOT_FOUND:
                return False
            raise
        return True

    def _call(
        self,
        method: str,
        segments: tuple[str, ...],
        *,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        redact: tuple[str, ...] = (),
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        # Every request the client makes is idempotent (PUTs, DELETEs, and a binding POST that
        # changes nothing when the binding exists), so a refusal that says "not now" is retried.
        maybe_done = False  # an earlier attempt may have been carried out, its answer lost
        for attempt in range(self._retries + 1):
            try:
                return self._send(
                    method, segments, body=body, query=query, redact=redact, headers=headers
                )
            except ManagementRequestRejected as exc:
                # The object a retried DELETE finds gone is the one the lost attempt deleted.
                if method == "DELETE" and maybe_done and exc.status == _NOT_FOUND:
                    return None
                raise
            except ManagementUnavailable as exc:
                pause = self._backoff * 2**attempt
                if attempt == self._retries or not _transient(exc) or self._left() <= pause:
                    raise
                _LOG.info("management API %s %s: %s; retrying", method, exc.path, exc)
                maybe_done = maybe_done or not _not_carried_out(exc)
                time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(
        self,
        method: str,
        segments: tuple[str, ...],
        *,
        body: Mapping[str, Any] | None,
        query: Mapping[str, str] | None,
        redact: tuple[str, ...],
        headers: Mapping[str, str] | None,
    ) -> Any:
        path = "/api/" + "/".join(urllib.parse.quote(s, safe="") for s in segments)
        url = self._base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(  # noqa: S310 (scheme checked in __init__)
            url,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": self._authorization,
                "Content-Type": "application/json",
                "Accept": "application/json",
                **(headers or {}),
            },
        )
        timeout = min(self._timeout, self._left())
        if timeout <= 0:
            raise ManagementUnavailable(
                "no time left before the deadline", method=method, path=path
            )
        try:
            with self._opener.open(request, timeout=timeout) as response:
                status = response.status
                data = response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise self._http_error(method, path, exc, redact) from exc
        except (OSError, http.client.HTTPException) as exc:
            # URLError (refused, DNS, TLS), TimeoutError and dropped connections alike.
            problem = f"cannot reach the management API: {type(exc).__name__}"
            if self._left() <= 0:
                problem = f"no answer before the deadline ({type(exc).__name__})"
            raise ManagementUnavailable(problem, method=method, path=path) from exc
        _LOG.debug("management API %s %s -> %s", method, path, status)
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ManagementApiError("answer is not JSON", method=method, path=path) from exc

    def _left(self) -> float:
        """Seconds until the deadline (infinite without one)."""
        return float("inf") if self._deadline is None else self._deadline - time.monotonic()

    def _http_error(
        self, method: str, path: str, exc: urllib.error.HTTPError, redact: tuple[str, ...]
    ) -> ManagementApiError:
        status = exc.code
        if status >= 500 or status in _RETRYABLE_4XX:
            return ManagementUnavailable(f"HTTP {status}", method=method, path=path)
        if status < 400:
            return ManagementApiError(f"unexpected HTTP {status}", method=method, path=path)
        return ManagementRequestRejected(
            method=method, path=path, status=status, reason=self._reason(exc, redact)
        )

    def _reason(self, exc: urllib.error.HTTPError, redact: tuple[str, ...]) -> str:
        try:
            payload = json.loads(exc.read() or b"{}")
        except (OSError, ValueError, http.client.HTTPException):
            payload = {}
        reason = payload.get("reason") if isinstance(payload, dict) else None
        text = str(reason) if reason else (exc.reason or "")
        # Defence in depth: an echoed request must not carry a password into a log.
        for secret in (self._password, *redact):
            if secret:
                text = text.replace(secret, "***")
        return text


def _transient(error: ManagementUnavailable) -> bool:
    """A 5xx, 408 or 429 answer, or a connection refused or dropped: worth another try soon.

    Not a timeout (the server is slow, and each try costs the whole timeout again) nor a TLS
    failure (it will fail the same way).
    """
    cause = error.__cause__
    if isinstance(cause, urllib.error.HTTPError):
        return True
    if isinstance(cause, urllib.error.URLError):
        cause = cause.reason if isinstance(cause.reason, BaseException) else None
    return isinstance(cause, ConnectionError)


def _not_carried_out(error: ManagementUnavailable) -> bool:
    """A connection refused (the request never reached the API), or a 408 or 429 (the server
    said "not now" before doing anything). A 5xx answer or a dropped connection may come after
    the broker carried the request out."""
    cause = error.__cause__
    if isinstance(cause, urllib.error.HTTPError):
        return cause.code in _RETRYABLE_4XX
    if isinstance(cause, urllib.error.URLError):
        cause = cause.reason if isinstance(cause.reason, BaseException) else None
    return isinstance(cause, ConnectionRefusedError)


def _destination_kind(destination_type: str) -> str:
    """The API's path letter for a binding's destination: ``q`` or ``e``.

    Raises:
        ValueError: ``destination_type`` is neither ``queue`` nor ``exchange``.
    """
    kind = {"queue": "q", "exchange": "e"}.get(destination_type)
    if kind is None:
        raise ValueError(f"destination_type must be queue or exchange, not {destination_type!r}")
    return kind
