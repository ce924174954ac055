"""In-memory RabbitMQ management API: ManagementClient's test double, with the broker's quirks."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fabric.errors import ManagementRequestRejected

JsonObject = dict[str, Any]

_BUILTIN_EXCHANGES = {
    "": "direct",
    "amq.direct": "direct",
    "amq.fanout": "fanout",
    "amq.headers": "headers",
    "amq.match": "headers",
    "amq.rabbitmq.trace": "topic",
    "amq.topic": "topic",
}


@dataclass
class _VHost:
    exchanges: dict[str, JsonObject] = field(default_factory=dict)
    queues: dict[str, JsonObject] = field(default_factory=dict)
    messages: dict[str, int | None] = field(default_factory=dict)
    unsampled: dict[str, int] = field(default_factory=dict)  # held, not in the statistics yet
    bindings: list[JsonObject] = field(default_factory=list)
    permissions: dict[str, JsonObject] = field(default_factory=dict)
    connections: dict[str, str] = field(default_factory=dict)  # name -> user
    consumers: list[tuple[str, str]] = field(default_factory=list)  # (connection, queue)


class MemoryManagementClient:
    """Implements ``fabric.topology_apply.ManagementApi`` on dictionaries.

    Like RabbitMQ it: grants the creating user full permissions on a new vhost; starts a vhost
    with the built-in exchanges; lists an implicit default-exchange binding per queue; answers
    404 for missing objects and 400 for a redeclaration with other properties; drops bindings
    with the exchange or queue they involve and permissions with their user; stores salted
    SHA-256 password hashes; closes a user's connections when the user or its vhost goes (not
    when its permissions do); keeps broker-wide parameters. ``calls`` records every change as
    ``"<method> <name>"`` in order, and each ``wait_for_statistics``; ``set_messages`` sets what
    the statistics report for a queue (``None``: not sampled yet), or, with ``sampled=False``,
    what it holds that they report only after the next ``wait_for_statistics``;
    ``open_connection`` plays a client connecting and ``consume`` one of its consumers.
    """

    def __init__(self, username: str = "admin") -> None:
        """An empty broker; ``username`` plays the user the client logs in as."""
        self._username = username
        self._vhosts: dict[str, _VHost] = {}
        self._users: dict[str, JsonObject] = {}
        self._parameters: dict[str, Any] = {}
        self._connections_opened = 0
        self.calls: list[str] = []

    @property
    def username(self) -> str:
        """The user this client logs in as."""
        return self._username

    def set_messages(
        self, vhost: str, queue: str, count: int | None, *, sampled: bool = True
    ) -> None:
        """Make the statistics report ``count`` messages in the queue (``None``: unsampled);
        with ``sampled=False`` the queue holds ``count`` messages (arrived since the last
        sample) and the statistics go on reporting the old count until ``wait_for_statistics``.

        Raises:
            ManagementRequestRejected: 404 when the vhost or queue does not exist.
        """
        space = self._vhost(vhost, f"queues/{vhost}/{queue}")
        if queue not in space.queues:
            raise _not_found(f"queues/{vhost}/{queue}")
        if sampled:
            space.messages[queue] = count
        elif count is not None:
            space.unsampled[queue] = count

    def wait_for_statistics(self) -> None:
        """A new sample: every count ``set_messages(..., sampled=False)`` left shows now."""
        self.calls.append("wait_for_statistics")
        for space in self._vhosts.values():
            space.messages.update(space.unsampled)
            space.unsampled.clear()

    def open_connection(self, vhost: str, user: str) -> str:
        """A client of ``user`` connects to the vhost; returns the connection's name.

        Raises:
            ManagementRequestRejected: 404 when the vhost does not exist.
        """
        space = self._vhost(vhost, f"vhosts/{vhost}/connections")
        self._connections_opened += 1
        name = f"127.0.0.1:{50000 + self._connections_opened} -> 127.0.0.1:5672"
        space.connections[name] = user
        return name

    def consume(self, vhost: str, connection: str, queue: str) -> None:
        """The client on ``connection`` starts a consumer on ``queue`` (no permission check:
        RabbitMQ checks when a consumer starts, which is not what these tests look at).

        Raises:
            ManagementRequestRejected: 404 when the vhost does not exist.
        """
        self._vhost(vhost, f"consumers/{vhost}").consumers.append((connection, queue))

    # --- vhosts ---------------------------------------------------------------------------

    def get_vhost(self, name: str) -> JsonObject | None:
        """The vhost, or ``None``."""
        return {"name": name} if name in self._vhosts else None

    def put_vhost(self, name: str) -> None:
        """Create the vhost with the built-in exchanges; the creator gets full permissions."""
        self.calls.append(f"put_vhost {name}")
        if name in self._vhosts:
            return
        space = _VHost()
        for exchange, kind in _BUILTIN_EXCHANGES.items():
            space.exchanges[exchange] = _exchange(
                exchange, kind, durable=True, auto_delete=False, internal=False, arguments={}
            )
        space.permissions[self._username] = {"configure": ".*", "write": ".*", "read": ".*"}
        self._vhosts[name] = space

    def delete_vhost(self, name: str) -> bool:
        """Delete the vhost and everything in it; ``False`` if it did not exist."""
        self.calls.append(f"delete_vhost {name}")
        return self._vhosts.pop(name, None) is not None

    # --- exchanges ------------------------------------------------------------------------

    def list_exchanges(self, vhost: str) -> list[JsonObject]:
        """Every exchange of the vhost, built-ins included.

        Raises:
            ManagementRequestRejected: 404 when the vhost does not exist.
        """
        return copy.deepcopy(list(self._vhost(vhost, f"exchanges/{vhost}").exchanges.values()))

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
        """Declare the exchange.

        Raises:
            ManagementRequestRejected: 404 without the vhost, 400 when it exists with other
                properties.
        """
        path = f"exchanges/{vhost}/{name}"
        space = self._vhost(vhost, path)
        wanted = _exchange(
            name,
            exchange_type,
            durable=durable,
            auto_delete=auto_delete,
            internal=internal,
            arguments=dict(arguments),
        )
        _declare(space.exchanges, name, wanted, path)
        self.calls.append(f"put_exchange {name}")

    def delete_exchange(self, vhost: str, name: str) -> bool:
        """Delete the exchange and its bindings; ``False`` if it did not exist."""
        self.calls.append(f"delete_exchange {name}")
        space = self._vhosts.get(vhost)
        if space is None or space.exchanges.pop(name, None) is None:
            return False
        space.bindings = [
            b
            for b in space.bindings
            if b["source"] != name
            and not (b["destination_type"] == "exchange" and b["destination"] == name)
        ]
        return True

    # --- queues ---------------------------------------------------------------------------

    def list_queues(self, vhost: str) -> list[JsonObject]:
        """The vhost's queues; ``messages`` is absent while unsampled.

        Raises:
            ManagementRequestRejected: 404 when the vhost does not exist.
        """
        space = self._vhost(vhost, f"queues/{vhost}")
        listed = []
        for name, queue in space.queues.items():
            item = copy.deepcopy(queue)
            if (messages := space.messages.get(name)) is not None:
                item["messages"] = messages
            listed.append(item)
        return listed

    def put_queue(
        self,
        vhost: str,
        name: str,
        *,
        durable: bool,
        auto_delete: bool,
        arguments: Mapping[str, Any],
    ) -> None:
        """Declare the queue, bound to the default exchange by its name.

        Raises:
            ManagementRequestRejected: 404 without the vhost, 400 when it exists with other
                properties.
        """
        path = f"queues/{vhost}/{name}"
        space = self._vhost(vhost, path)
        wanted = {
            "name": name,
            "vhost": vhost,
            "durable": durable,
            "auto_delete": auto_delete,
            "arguments": dict(arguments),
        }
        if _declare(space.queues, name, wanted, path):
            space.messages[name] = 0
            space.bindings.append(
                _binding(
                    vhost,
                    source="",
                    destination=name,
                    destination_type="queue",
                    routing_key=name,
                    arguments={},
                )
            )
        self.calls.append(f"put_queue {name}")

    def delete_queue(self, vhost: str, name: str) -> bool:
        """Delete the queue, its messages and bindings; ``False`` if it did not exist."""
        self.calls.append(f"delete_queue {name}")
        space = self._vhosts.get(vhost)
        if space is None or space.queues.pop(name, None) is None:
            return False
        space.messages.pop(name, None)
        space.unsampled.pop(name, None)
        space.bindings = [
            b
            for b in space.bindings
            if not (b["destination_type"] == "queue" and b["destination"] == name)
        ]
        return True

    # --- bindings -------------------------------------------------------------------------

    def list_bindings(self, vhost: str) -> list[JsonObject]:
        """Every binding, the default exchange's too.

        Raises:
            ManagementRequestRejected: 404 when the vhost does not exist.
        """
        return copy.deepcopy(self._vhost(vhost, f"bindings/{vhost}").bindings)

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
        """Bind ``destination`` to ``source``; an identical binding is not added twice.

        Raises:
            ManagementRequestRejected: 404 when the vhost, source or destination is missing.
        """
        path = f"bindings/{vhost}/e/{source}/{destination_type[0]}/{destination}"
        space = self._vhost(vhost, path)
        targets = space.queues if destination_type == "queue" else space.exchanges
        if source not in space.exchanges or destination not in targets:
            raise _not_found(path)
        binding = _binding(
            vhost,
            source=source,
            destination=destination,
            destination_type=destination_type,
            routing_key=routing_key,
            arguments=arguments,
        )
        if binding not in space.bindings:
            space.bindings.append(binding)
        self.calls.append(f"create_binding {source}->{destination}")

    def delete_binding(
        self,
        vhost: str,
        *,
        source: str,
        destination: str,
        destination_type: str,
        properties_key: str,
    ) -> bool:
        """Delete the binding ``list_bindings`` named so; ``False`` if there is none."""
        space = self._vhost(vhost, f"bindings/{vhost}/e/{source}")
        named = (source, destination, destination_type, properties_key)
        kept = [
            b
            for b in space.bindings
            if (b["source"], b["destination"], b["destination_type"], b["properties_key"]) != named
        ]
        deleted = len(kept) != len(space.bindings)
        space.bindings = kept
        self.calls.append(f"delete_binding {source}->{destination}")
        return deleted

    # --- users and permissions ------------------------------------------------------------

    def get_user(self, name: str) -> JsonObject | None:
        """The user with ``tags``, ``password_hash`` and ``hashing_algorithm``, or ``None``."""
        user = self._users.get(name)
        return copy.deepcopy(user) if user is not None else None

    def put_user(self, name: str, *, password: str, tags: list[str]) -> None:
        """Create or replace the user, storing a salted SHA-256 hash of the password."""
        salt = os.urandom(4)
        digest = hashlib.sha256(salt + password.encode()).digest()
        self._users[name] = {
            "name": name,
            "password_hash": base64.b64encode(salt + digest).decode(),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": list(tags),
            "limits": {},
        }
        self.calls.append(f"put_user {name}")

    def delete_user(self, name: str) -> bool:
        """Delete the user and its permissions everywhere; ``False`` if it did not exist."""
        self.calls.append(f"delete_user {name}")
        for space in self._vhosts.values():
            space.permissions.pop(name, None)
            space.connections = {c: u for c, u in space.connections.items() if u != name}
        return self._users.pop(name, None) is not None

    def list_permissions(self, vhost: str) -> list[JsonObject]:
        """Every user's permissions on the vhost.

        Raises:
            ManagementRequestRejected: 404 when the vhost does not exist.
        """
        space = self._vhost(vhost, f"vhosts/{vhost}/permissions")
        return [
            {"user": user, "vhost": vhost, **regexes} for user, regexes in space.permissions.items()
        ]

    def put_permissions(
        self, vhost: str, user: str, *, configure: str, write: str, read: str
    ) -> None:
        """Set the user's permissions on the vhost.

        Raises:
            ManagementRequestRejected: 400 when the user or the vhost does not exist.
        """
        path = f"permissions/{vhost}/{user}"
        if user not in self._users or vhost not in self._vhosts:
            raise ManagementRequestRejected(
                method="PUT", path=f"/api/{path}", status=400, reason="no_such_user_or_vhost"
            )
        self._vhosts[vhost].permissions[user] = {
            "configure": configure,
            "write": write,
            "read": read,
        }
        self.calls.append(f"put_permissions {user}")

    def delete_permissions(self, vhost: str, user: str) -> bool:
        """Remove the user's permissions on the vhost; ``False`` if it had none."""
        self.calls.append(f"delete_permissions {user}")
        space = self._vhosts.get(vhost)
        return space is not None and space.permissions.pop(user, None) is not None

    # --- global parameters ----------------------------------------------------------------

    def get_global_parameter(self, name: str) -> Any:
        """The parameter's value, or ``None``."""
        return copy.deepcopy(self._parameters.get(name))

    def put_global_parameter(self, name: str, value: Any) -> None:
        """Set the parameter (a JSON value, stored as the broker would return it)."""
        self._parameters[name] = json.loads(json.dumps(value))
        self.calls.append(f"put_global_parameter {name}")

    def delete_global_parameter(self, name: str) -> bool:
        """Remove the parameter; ``False`` if it was not set."""
        self.calls.append(f"delete_global_parameter {name}")
        return self._parameters.pop(name, None) is not None

    # --- connections ----------------------------------------------------------------------

    def list_connections(self, vhost: str) -> list[JsonObject]:
        """The client connections to the vhost (``name``, ``user``).

        Raises:
            ManagementRequestRejected: 404 when the vhost does not exist.
        """
        space = self._vhost(vhost, f"vhosts/{vhost}/connections")
        return [{"name": name, "user": user} for name, user in space.connections.items()]

    def list_consumers(self, vhost: str) -> list[JsonObject]:
        """The consumers of the vhost's open connections, shaped as RabbitMQ lists them.

        Raises:
            ManagementRequestRejected: 404 when the vhost does not exist.
        """
        space = self._vhost(vhost, f"consumers/{vhost}")
        return [
            {
                "queue": {"name": queue, "vhost": vhost},
                "channel_details": {"connection_name": name, "user": space.connections[name]},
            }
            for name, queue in space.consumers
            if name in space.connections
        ]

    def close_connection(self, name: str, *, reason: str) -> bool:
        """Close the connection; ``False`` if there is none of that name."""
        self.calls.append(f"close_connection {name}")
        return any(space.connections.pop(name, None) is not None for space in self._vhosts.values())

    def _vhost(self, vhost: str, path: str) -> _VHost:
        space = self._vhosts.get(vhost)
        if space is None:
            raise _not_found(path)
        return space


def _not_found(path: str) -> ManagementRequestRejected:
    return ManagementRequestRejected(
        method="-", path=f"/api/{path}", status=404, reason="Not Found"
    )


def _declare(table: dict[str, JsonObject], name: str, wanted: JsonObject, path: str) -> bool:
    """Store ``wanted`` under ``name``; True if new, False if identical, 400 if different."""
    current = table.get(name)
    if current is None:
        table[name] = wanted
        return True
    if current != wanted:
        raise ManagementRequestRejected(
            method="PUT", path=f"/api/{path}", status=400, reason=f"inequivalent arg for {name!r}"
        )
    return False


def _exchange(
    name: str,
    exchange_type: str,
    *,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    arguments: dict[str, Any],
) -> JsonObject:
    return {
        "name": name,
        "type": exchange_type,
        "durable": durable,
        "auto_delete": auto_delete,
        "internal": internal,
        "arguments": arguments,
    }


def _binding(
    vhost: str,
    *,
    source: str,
    destination: str,
    destination_type: str,
    routing_key: str,
    arguments: Mapping[str, Any],
) -> JsonObject:
    return {
        "source": source,
        "vhost": vhost,
        "destination": destination,
        "destination_type": destination_type,
        "routing_key": routing_key,
        "arguments": dict(arguments),
        "properties_key": _properties_key(routing_key, arguments),
    }


def _properties_key(routing_key: str, arguments: Mapping[str, Any]) -> str:
    """RabbitMQ's name for a binding: the form-encoded key, ``~`` and an arguments hash."""
    key = urllib.parse.quote_plus(routing_key, safe="")
    if not arguments:
        return key or "~"
    canonical = json.dumps(dict(arguments), sort_keys=True).encode()
    return f"{key}~{base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()[:4]).decode()}"
