"""The fabric's error hierarchy: what went wrong, not where, so callers branch on the class."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fabric.envelope import Rejection


class FabricError(Exception):
    """Base class of every error the fabric raises on purpose."""


class ConfigError(FabricError):
    """Configuration is invalid; raised at load time so a bad deploy never starts serving."""


class RoutingTableError(ConfigError):
    """The routing table is invalid; `route` names the offending route or rule when known."""

    def __init__(self, message: str, *, route: str | None = None) -> None:
        super().__init__(f"route {route!r}: {message}" if route is not None else message)
        self.route = route


class MessageRejected(FabricError):
    """A message is bad and will never succeed on retry; it carries the rejection to report."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(f"{rejection.reason}: {rejection.message}")
        self.rejection = rejection


class TransportUnavailable(FabricError):
    """A transport (or what it needs to connect) cannot be reached now: fail over, retry later."""


class ManagementApiError(FabricError):
    """The RabbitMQ management HTTP API did not do what was asked.

    ``method`` and ``path`` name the call (never credentials); raised as is for answers the
    client cannot read, such as a redirect or a body that is not JSON.
    """

    def __init__(self, message: str, *, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: {message}")
        self.method = method
        self.path = path


class ManagementUnavailable(ManagementApiError):
    """The management API cannot be reached now (refused, timeout, 5xx, throttled): retry later."""


class ManagementRequestRejected(ManagementApiError):
    """The management API refused the request (4xx); ``status`` and the API's ``reason`` say why.

    404 means the named object does not exist; 400 usually that it exists with other properties.
    """

    def __init__(self, *, method: str, path: str, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}", method=method, path=path)
        self.status = status
        self.reason = reason


class RotationError(FabricError):
    """A password rotation step cannot be done: the secret, its versions or the broker's user
    are not what the step needs. Secrets Manager marks the rotation failed and retries it."""


class TopologyConflict(FabricError):
    """The broker holds an exchange or queue whose properties differ from the definitions.

    RabbitMQ cannot change them in place; the object must be deleted and declared again, which
    the applier does only when asked to and only when no message would be lost.
    """


class EncryptionUnavailable(FabricError):
    """The key service cannot be used now (unreachable, throttled, key disabled or access denied).

    Systemic, not the message's fault: nothing restricted can be protected or opened until it
    recovers, so retry later and never send child data in clear instead.
    """


class DecryptionFailed(FabricError):
    """This ciphertext cannot be opened: corrupt, under another key, or bound to another context.

    The message is bad and will never succeed on retry: dead-letter it.
    """
