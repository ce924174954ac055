"""Apply, diff and delete a RabbitMQ topology (a definitions document) through the management API.

The document has the shape of RabbitMQ's definitions export for one vhost (see
``fabric.topology.definitions``); the ``vhost`` argument says which broker vhost it goes to, so
the same document serves every environment and every test vhost.

Rules the functions share:

- Exchanges and queues cannot change in place. One that differs is ``needs_recreate``: ``apply``
  refuses to go on (naming it and what differs) unless told to recreate, and never recreates a
  queue that may hold messages.
- What the broker has in the vhost but the document does not is reported as ``extra`` and left
  alone, with two exceptions. A binding from one of the document's own exchanges that the
  document no longer has is a route the routing table removed (a group taken off a topic), and
  leaving it would go on delivering there; apply deletes it, after creating the new bindings.
  Bindings hold no messages. And the vhost permissions of a ``fabric-*`` user (not the
  administrator) that the document no longer has: a removed group's user loses its access.
  Because RabbitMQ checks a consumer's permission only when it starts, apply closes the
  connections to the vhost of a user whose permissions it removed or changed, and, on every
  run, those of a document or ``fabric-*`` user consuming a queue its permissions no longer let
  it read (a run that stopped between a change and its close).
  Built-in exchanges (``""``, ``amq.*``), the default exchange's implicit bindings and the
  permissions of the user the client logs in as (RabbitMQ grants them to whoever creates a
  vhost through the API) are never reported.
- Users are compared by tags and, when passwords are given, by password: the password is
  checked against the broker's salted hash locally, so re-applying never rewrites a password
  that is already right. A hash the applier cannot check counts as different.
- Queue message counts come from the management statistics, which RabbitMQ samples every few
  seconds (5 s by default); quorum queues refuse ``if-empty`` deletes, so these counts are the
  only check there is. A queue whose count has not been sampled yet counts as not empty. A
  count can be seconds old, so before deleting a queue (a recreation, ``delete_topology``) the
  applier cuts its inflow: it deletes every binding into it (not the default exchange's, which
  cannot go; nothing of the fabric may publish there), waits for statistics sampled after that
  (``ManagementApi.wait_for_statistics``) and keeps the queue, with its bindings back, unless
  the new count is 0. What is routed to it meanwhile reaches only the message's other queues,
  or none: producers must be stopped for a recreation or a stack Delete (docs/runbook.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any, Protocol

from fabric.errors import ConfigError, TopologyConflict

_LOG = logging.getLogger(__name__)

JsonObject = dict[str, Any]

_HIDDEN = "(hidden)"
FABRIC_USER_PREFIX = "fabric-"
ADMIN_USER = "fabric-admin"  # stacks/constructs/broker.py ADMIN_USERNAME
_DEFAULT_VHOST = "/"
_PASSWORD_HASHES: dict[str, Callable[[bytes], Any]] = {
    "rabbit_password_hashing_sha256": hashlib.sha256,
    "rabbit_password_hashing_sha512": hashlib.sha512,
}
_SALT_BYTES = 4  # RabbitMQ's password_hash is base64(4-byte salt + hash(salt + password))


class ManagementApi(Protocol):
    """The management API operations the applier needs.

    Implemented by ``fabric.adapters.management.ManagementClient`` (HTTP) and
    ``fabric.adapters.memory_management.MemoryManagementClient`` (tests). ``get_*`` return
    ``None`` and ``delete_*`` return ``False`` for objects that do not exist; ``list_*`` on a
    vhost that does not exist raise ``ManagementRequestRejected`` (404). Any call may raise
    ``ManagementApiError``.
    """

    @property
    def username(self) -> str:
        """The user the client logs in as."""
        ...

    def get_vhost(self, name: str) -> JsonObject | None:
        """The vhost, or None."""
        ...

    def put_vhost(self, name: str) -> None:
        """Create the vhost."""
        ...

    def delete_vhost(self, name: str) -> bool:
        """Delete the vhost and everything in it."""
        ...

    def list_exchanges(self, vhost: str) -> list[JsonObject]:
        """Every exchange in the vhost."""
        ...

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
        """Declare an exchange."""
        ...

    def delete_exchange(self, vhost: str, name: str) -> bool:
        """Delete an exchange and its bindings."""
        ...

    def list_queues(self, vhost: str) -> list[JsonObject]:
        """Every queue in the vhost, with ``messages`` once sampled."""
        ...

    def wait_for_statistics(self) -> None:
        """Return once the statistics show what each queue held when this was called."""
        ...

    def put_queue(
        self,
        vhost: str,
        name: str,
        *,
        durable: bool,
        auto_delete: bool,
        arguments: Mapping[str, Any],
    ) -> None:
        """Declare a queue."""
        ...

    def delete_queue(self, vhost: str, name: str) -> bool:
        """Delete a queue and its messages."""
        ...

    def list_bindings(self, vhost: str) -> list[JsonObject]:
        """Every binding in the vhost."""
        ...

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
        """Create a binding."""
        ...

    def delete_binding(
        self,
        vhost: str,
        *,
        source: str,
        destination: str,
        destination_type: str,
        properties_key: str,
    ) -> bool:
        """Delete the binding ``list_bindings`` named with this ``properties_key``."""
        ...

    def get_user(self, name: str) -> JsonObject | None:
        """The user, or None."""
        ...

    def put_user(self, name: str, *, password: str, tags: list[str]) -> None:
        """Create or update a user."""
        ...

    def delete_user(self, name: str) -> bool:
        """Delete a user and its permissions."""
        ...

    def list_permissions(self, vhost: str) -> list[JsonObject]:
        """Every user's permissions on the vhost."""
        ...

    def put_permissions(
        self, vhost: str, user: str, *, configure: str, write: str, read: str
    ) -> None:
        """Set a user's permissions on the vhost."""
        ...

    def delete_permissions(self, vhost: str, user: str) -> bool:
        """Remove a user's permissions on the vhost."""
        ...

    def get_global_parameter(self, name: str) -> Any:
        """The broker-wide parameter's value, or None."""
        ...

    def put_global_parameter(self, name: str, value: Any) -> None:
        """Set a broker-wide parameter."""
        ...

    def delete_global_parameter(self, name: str) -> bool:
        """Remove a broker-wide parameter."""
        ...

    def list_connections(self, vhost: str) -> list[JsonObject]:
        """Every client connection to the vhost (``name``, ``user``)."""
        ...

    def list_consumers(self, vhost: str) -> list[JsonObject]:
        """Every consumer on the vhost (``queue.name``, ``channel_details.connection_name``
        and ``channel_details.user``)."""
        ...

    def close_connection(self, name: str, *, reason: str) -> bool:
        """Close a client connection."""
        ...


class ChangeKind(StrEnum):
    """What a difference between the document and the broker means."""

    CREATE = "create"  # missing on the broker; apply creates it
    UPDATE = "update"  # differs and can change in place (users, permissions); apply updates it
    NEEDS_RECREATE = "needs_recreate"  # differs and cannot change in place (exchanges, queues)
    EXTRA = "extra"  # on the broker but not in the document; reported, never deleted by apply
    DELETE = "delete"  # a binding or a fabric user's permission that the document no longer has


class Resource(StrEnum):
    """The kinds of broker objects a topology holds."""

    VHOST = "vhost"
    EXCHANGE = "exchange"
    QUEUE = "queue"
    BINDING = "binding"
    USER = "user"
    PERMISSION = "permission"


@dataclass(frozen=True)
class Change:
    """One difference: ``differences`` maps a property or argument to (broker, document).

    Passwords never appear: a differing password shows as ``(hidden)`` on both sides.
    """

    kind: ChangeKind
    resource: Resource
    name: str
    differences: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"{self.kind} {self.resource} {self.name!r}"
        if self.differences:
            text += ": " + ", ".join(
                f"{key} {current!r} -> {wanted!r}"
                for key, (current, wanted) in self.differences.items()
            )
        return text


@dataclass(frozen=True)
class ApplyReport:
    """What ``apply_topology`` changed (in the order it did), and what it found and left alone."""

    vhost: str
    applied: tuple[Change, ...]
    extra: tuple[Change, ...]

    @property
    def changed(self) -> bool:
        """True when apply changed anything on the broker."""
        return bool(self.applied)


@dataclass(frozen=True)
class Kept:
    """An object ``delete_topology`` left on the broker, and why."""

    resource: Resource
    name: str
    reason: str


@dataclass(frozen=True)
class DeleteReport:
    """What ``delete_topology`` deleted (in order) and what it kept."""

    vhost: str
    deleted: tuple[tuple[Resource, str], ...]
    kept: tuple[Kept, ...]


# --- the document --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Exchange:
    name: str
    properties: JsonObject  # type, durable, auto_delete, internal, arguments


@dataclass(frozen=True)
class _Queue:
    name: str
    properties: JsonObject  # durable, auto_delete, arguments


@dataclass(frozen=True)
class _Binding:
    source: str
    destination: str
    destination_type: str
    routing_key: str
    arguments: JsonObject
    properties_key: str = field(default="", compare=False)  # the broker's name for it

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        canonical = json.dumps(self.arguments, sort_keys=True, separators=(",", ":"))
        return (self.source, self.destination_type, self.destination, self.routing_key, canonical)

    def __str__(self) -> str:
        text = f"{self.source} -> {self.destination_type} {self.destination} [{self.routing_key}]"
        return f"{text} {self.key[4]}" if self.arguments else text


@dataclass(frozen=True)
class _User:
    name: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class _Permission:
    user: str
    regexes: JsonObject  # configure, write, read


@dataclass(frozen=True)
class _Document:
    owns_vhost: bool
    exchanges: tuple[_Exchange, ...]
    queues: tuple[_Queue, ...]
    bindings: tuple[_Binding, ...]
    users: tuple[_User, ...]
    permissions: tuple[_Permission, ...]


def _items(definitions: Mapping[str, Any], section: str) -> list[Mapping[str, Any]]:
    items = definitions.get(section) or []
    if not isinstance(items, list) or not all(isinstance(item, Mapping) for item in items):
        raise ConfigError(f"definitions: {section!r} must be a list of objects")
    return items


def _require(item: Mapping[str, Any], key: str, section: str, index: int) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (key == "name" and not value):
        raise ConfigError(f"definitions: {section}[{index}] needs a string {key!r}")
    return value


def _exchange_properties(item: Mapping[str, Any]) -> JsonObject:
    return {
        "type": item.get("type"),
        "durable": bool(item.get("durable", True)),
        "auto_delete": bool(item.get("auto_delete", False)),
        "internal": bool(item.get("internal", False)),
        "arguments": dict(item.get("arguments") or {}),
    }


def _queue_properties(item: Mapping[str, Any]) -> JsonObject:
    # A queue declared without x-queue-type is classic; some versions list the type, some not.
    arguments = {"x-queue-type": "classic", **(item.get("arguments") or {})}
    return {
        "durable": bool(item.get("durable", True)),
        "auto_delete": bool(item.get("auto_delete", False)),
        "arguments": arguments,
    }


def user_tags(value: Any) -> tuple[str, ...]:
    """A user's tags as the management API lists them, sorted, whatever the broker's version."""
    if isinstance(value, str):  # older versions list tags as one string, "a,b"
        value = value.split(",")
    return tuple(sorted({str(tag).strip() for tag in value or () if str(tag).strip()}))


def _parse(definitions: Mapping[str, Any]) -> _Document:
    vhosts = {_require(v, "name", "vhosts", i) for i, v in enumerate(_items(definitions, "vhosts"))}
    for section in ("exchanges", "queues", "bindings", "permissions"):
        vhosts.update(
            str(item["vhost"]) for item in _items(definitions, section) if "vhost" in item
        )
    if len(vhosts) > 1:
        raise ConfigError(f"definitions span several vhosts {sorted(vhosts)}; apply one at a time")
    exchanges = tuple(
        _Exchange(
            _require(item, "name", "exchanges", i),
            {**_exchange_properties(item), "type": _require(item, "type", "exchanges", i)},
        )
        for i, item in enumerate(_items(definitions, "exchanges"))
    )
    queues = tuple(
        _Queue(_require(item, "name", "queues", i), _queue_properties(item))
        for i, item in enumerate(_items(definitions, "queues"))
    )
    bindings: dict[tuple[str, str, str, str, str], _Binding] = {}
    for i, item in enumerate(_items(definitions, "bindings")):
        binding = _Binding(
            source=_require(item, "source", "bindings", i),
            destination=_require(item, "destination", "bindings", i),
            destination_type=_require(item, "destination_type", "bindings", i),
            routing_key=str(item.get("routing_key", "")),
            arguments=dict(item.get("arguments") or {}),
        )
        if binding.destination_type not in ("queue", "exchange"):
            raise ConfigError(f"definitions: bindings[{i}] destination_type must be queue/exchange")
        bindings.setdefault(binding.key, binding)
    users = tuple(
        _User(_require(item, "name", "users", i), user_tags(item.get("tags")))
        for i, item in enumerate(_items(definitions, "users"))
    )
    permissions = tuple(
        _Permission(
            _require(item, "user", "permissions", i),
            {key: _require(item, key, "permissions", i) for key in ("configure", "write", "read")},
        )
        for i, item in enumerate(_items(definitions, "permissions"))
    )
    return _Document(
        owns_vhost=bool(_items(definitions, "vhosts")),
        exchanges=exchanges,
        queues=queues,
        bindings=tuple(bindings.values()),
        users=users,
        permissions=permissions,
    )


# --- comparing -----------------------------------------------------------------------------


def _differences(
    current: Mapping[str, Any], wanted: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    found = {
        key: (current.get(key), wanted.get(key))
        for key in wanted
        if key != "arguments" and current.get(key) != wanted.get(key)
    }
    current_arguments, wanted_arguments = current["arguments"], wanted["arguments"]
    for key in sorted(set(current_arguments) | set(wanted_arguments)):
        if current_arguments.get(key) != wanted_arguments.get(key):
            found[key] = (current_arguments.get(key), wanted_arguments.get(key))
    return found


def user_secret_arns(environ: Mapping[str, str]) -> dict[str, str]:
    """``USER_SECRET_ARNS``, the JSON object broker user name -> secret ARN that the topology
    and rotation functions get from the stack.

    Raises:
        KeyError: the setting is missing.
        ValueError: it is not JSON.
        TypeError: it is not a JSON object.
    """
    user_secrets = json.loads(environ["USER_SECRET_ARNS"])
    if not isinstance(user_secrets, dict):
        raise TypeError("USER_SECRET_ARNS is not a JSON object")
    return {str(name): str(arn) for name, arn in user_secrets.items()}


def password_matches(user: Mapping[str, Any], password: str) -> bool:
    """Whether ``password`` is the one behind the broker's salted hash; False if uncheckable."""
    algorithm = _PASSWORD_HASHES.get(str(user.get("hashing_algorithm")))
    stored = user.get("password_hash")
    if algorithm is None or not isinstance(stored, str):
        return False
    try:
        raw = base64.b64decode(stored, validate=True)
    except (binascii.Error, ValueError):
        return False
    if len(raw) <= _SALT_BYTES:
        return False
    salt, digest = raw[:_SALT_BYTES], raw[_SALT_BYTES:]
    return hmac.compare_digest(algorithm(salt + password.encode()).digest(), digest)


def _may_hold_messages(messages: int | None) -> bool:
    # No count yet means no statistics sample yet, not an empty queue.
    return messages is None or messages > 0


def _is_builtin_exchange(name: str) -> bool:
    return name == "" or name.startswith("amq.")


def _binding_from_broker(item: Mapping[str, Any]) -> _Binding:
    return _Binding(
        source=str(item["source"]),
        destination=str(item["destination"]),
        destination_type=str(item["destination_type"]),
        routing_key=str(item.get("routing_key", "")),
        arguments=dict(item.get("arguments") or {}),
        properties_key=str(item.get("properties_key", "")),
    )


@dataclass(frozen=True)
class _Step:
    change: Change
    run: Callable[[], object]


@dataclass
class _Plan:
    """The steps that bring the broker to the document, phase by phase, and what is extra."""

    vhost: list[_Step] = field(default_factory=list)
    exchanges: list[_Step] = field(default_factory=list)
    queues: list[_Step] = field(default_factory=list)
    bindings: list[_Step] = field(default_factory=list)
    users: list[_Step] = field(default_factory=list)
    permissions: list[_Step] = field(default_factory=list)
    extra: list[Change] = field(default_factory=list)
    queue_messages: dict[str, int | None] = field(default_factory=dict)

    def steps(self) -> list[_Step]:
        return [
            *self.vhost,
            *self.exchanges,
            *self.queues,
            *self.bindings,
            *self.users,
            *self.permissions,
        ]


def _plan(
    client: ManagementApi,
    doc: _Document,
    vhost: str,
    passwords: Mapping[str, str] | None,
) -> _Plan:
    plan = _Plan()
    exists = client.get_vhost(vhost) is not None
    if not exists:
        plan.vhost.append(
            _Step(Change(ChangeKind.CREATE, Resource.VHOST, vhost), lambda: client.put_vhost(vhost))
        )
    _plan_exchanges(client, doc, vhost, exists, plan)
    _plan_queues(client, doc, vhost, exists, plan)
    plan.bindings = _binding_steps(client, doc, vhost, exists, plan.extra)
    _plan_users(client, doc, passwords, plan)
    _plan_permissions(client, doc, vhost, exists, plan)
    return plan


def _plan_exchanges(
    client: ManagementApi, doc: _Document, vhost: str, exists: bool, plan: _Plan
) -> None:
    current = {
        str(item["name"]): _exchange_properties(item)
        for item in (client.list_exchanges(vhost) if exists else [])
        if not _is_builtin_exchange(str(item["name"]))
    }

    def declare(exchange: _Exchange) -> None:
        properties = exchange.properties
        client.put_exchange(
            vhost,
            exchange.name,
            exchange_type=properties["type"],
            durable=properties["durable"],
            auto_delete=properties["auto_delete"],
            internal=properties["internal"],
            arguments=properties["arguments"],
        )

    def recreate(exchange: _Exchange) -> None:
        # Deleting an exchange drops its bindings: restore the document's at once, a route
        # missing meanwhile loses what it would carry. Not those into a queue that waits to be
        # recreated (apply_topology cut its inflow); nor those to an object that does not exist
        # yet, which the bindings phase creates.
        client.delete_exchange(vhost, exchange.name)
        declare(exchange)
        waiting = {s.change.name for s in plan.queues if s.change.kind is ChangeKind.NEEDS_RECREATE}
        exchanges = {str(item["name"]) for item in client.list_exchanges(vhost)}
        queues = {str(item["name"]) for item in client.list_queues(vhost)} - waiting
        for binding in doc.bindings:
            targets = queues if binding.destination_type == "queue" else exchanges
            touches = binding.source == exchange.name or (
                binding.destination_type == "exchange" and binding.destination == exchange.name
            )
            if touches and binding.source in exchanges and binding.destination in targets:
                _bind(client, vhost, binding)

    for exchange in doc.exchanges:
        if exchange.name not in current:
            change = Change(ChangeKind.CREATE, Resource.EXCHANGE, exchange.name)
            plan.exchanges.append(_Step(change, partial(declare, exchange)))
        elif differences := _differences(current[exchange.name], exchange.properties):
            change = Change(
                ChangeKind.NEEDS_RECREATE, Resource.EXCHANGE, exchange.name, differences
            )
            plan.exchanges.append(_Step(change, partial(recreate, exchange)))
    wanted = {exchange.name for exchange in doc.exchanges}
    plan.extra.extend(
        Change(ChangeKind.EXTRA, Resource.EXCHANGE, name) for name in current if name not in wanted
    )


def _plan_queues(
    client: ManagementApi, doc: _Document, vhost: str, exists: bool, plan: _Plan
) -> None:
    listed = client.list_queues(vhost) if exists else []
    current = {str(item["name"]): _queue_properties(item) for item in listed}
    plan.queue_messages = {str(item["name"]): item.get("messages") for item in listed}

    def declare(queue: _Queue) -> None:
        properties = queue.properties
        client.put_queue(
            vhost,
            queue.name,
            durable=properties["durable"],
            auto_delete=properties["auto_delete"],
            arguments=properties["arguments"],
        )

    def recreate(queue: _Queue) -> None:
        # Only reached after apply_topology cut its inflow and checked that it holds no messages.
        # Bound again at once: until then it receives nothing.
        client.delete_queue(vhost, queue.name)
        declare(queue)
        for binding in doc.bindings:
            if binding.destination_type == "queue" and binding.destination == queue.name:
                _bind(client, vhost, binding)

    for queue in doc.queues:
        if queue.name not in current:
            change = Change(ChangeKind.CREATE, Resource.QUEUE, queue.name)
            plan.queues.append(_Step(change, partial(declare, queue)))
        elif differences := _differences(current[queue.name], queue.properties):
            change = Change(ChangeKind.NEEDS_RECREATE, Resource.QUEUE, queue.name, differences)
            plan.queues.append(_Step(change, partial(recreate, queue)))
    wanted = {queue.name for queue in doc.queues}
    plan.extra.extend(
        Change(ChangeKind.EXTRA, Resource.QUEUE, name) for name in current if name not in wanted
    )


def _binding_steps(
    client: ManagementApi, doc: _Document, vhost: str, exists: bool, extra: list[Change]
) -> list[_Step]:
    """Bindings compared as sets; the default exchange's implicit bindings are not compared."""
    current = {
        binding.key: binding
        for binding in map(_binding_from_broker, client.list_bindings(vhost) if exists else [])
        if binding.source != ""
    }

    wanted = {binding.key for binding in doc.bindings}
    own_exchanges = {exchange.name for exchange in doc.exchanges}
    stale = [binding for key, binding in current.items() if key not in wanted]
    extra.extend(
        Change(ChangeKind.EXTRA, Resource.BINDING, str(binding))
        for binding in stale
        if binding.source not in own_exchanges
    )
    # New routes first, then the removed ones: a message routed meanwhile reaches both.
    return [
        *(
            _Step(
                Change(ChangeKind.CREATE, Resource.BINDING, str(b)),
                partial(_bind, client, vhost, b),
            )
            for b in doc.bindings
            if b.key not in current
        ),
        *(
            _Step(
                Change(ChangeKind.DELETE, Resource.BINDING, str(b)),
                partial(_unbind, client, vhost, b),
            )
            for b in stale
            if b.source in own_exchanges
        ),
    ]


def _bind(client: ManagementApi, vhost: str, binding: _Binding) -> None:
    client.create_binding(
        vhost,
        source=binding.source,
        destination=binding.destination,
        destination_type=binding.destination_type,
        routing_key=binding.routing_key,
        arguments=binding.arguments,
    )


def _unbind(client: ManagementApi, vhost: str, binding: _Binding) -> bool:
    return client.delete_binding(
        vhost,
        source=binding.source,
        destination=binding.destination,
        destination_type=binding.destination_type,
        properties_key=binding.properties_key,
    )


def _recount_without_inflow(
    client: ManagementApi, vhost: str, queues: Collection[str]
) -> tuple[dict[str, int | None], list[_Binding]]:
    """Cut the inflow of ``queues`` (delete every binding into them but the default exchange's,
    which cannot be deleted), wait for statistics sampled after that, and return every queue's
    count then (no entry: the queue is gone) with the bindings cut, to put back where a queue
    stays. A message that reached a queue just before the cut shows in that count; one that
    the previous sample missed would not show in it.

    A failure before the counts are read puts the bindings back (as far as the management API
    still answers) and raises.
    """
    cut: list[_Binding] = []
    try:
        for binding in map(_binding_from_broker, client.list_bindings(vhost)):
            if (
                binding.destination_type == "queue"
                and binding.destination in queues
                and binding.source != ""
                and _unbind(client, vhost, binding)
            ):
                cut.append(binding)
        client.wait_for_statistics()
        counts = {str(item["name"]): item.get("messages") for item in client.list_queues(vhost)}
    except Exception:
        _restore(client, vhost, cut)
        raise
    return counts, cut


def _restore(client: ManagementApi, vhost: str, bindings: Iterable[_Binding]) -> list[_Binding]:
    """Put bindings back, as far as the management API answers (after a failure, that failure
    is the one to report); returns those it could not."""
    missed = []
    for binding in bindings:
        try:
            _bind(client, vhost, binding)
        except Exception:  # logged and returned: the caller decides
            _LOG.warning("topology: could not put back binding %s", binding, exc_info=True)
            missed.append(binding)
    return missed


def _plan_users(
    client: ManagementApi, doc: _Document, passwords: Mapping[str, str] | None, plan: _Plan
) -> None:
    secrets = passwords or {}  # diff plans (no passwords) are never run

    def put(user: _User) -> None:
        client.put_user(user.name, password=secrets[user.name], tags=list(user.tags))

    for user in doc.users:
        current = client.get_user(user.name)
        if current is None:
            change = Change(ChangeKind.CREATE, Resource.USER, user.name)
            plan.users.append(_Step(change, partial(put, user)))
            continue
        differences: dict[str, tuple[Any, Any]] = {}
        if (tags := user_tags(current.get("tags"))) != user.tags:
            differences["tags"] = (list(tags), list(user.tags))
        if passwords is not None and not password_matches(current, passwords[user.name]):
            differences["password"] = (_HIDDEN, _HIDDEN)
        if differences:
            change = Change(ChangeKind.UPDATE, Resource.USER, user.name, differences)
            plan.users.append(_Step(change, partial(put, user)))


def _plan_permissions(
    client: ManagementApi, doc: _Document, vhost: str, exists: bool, plan: _Plan
) -> None:
    current = {
        str(item["user"]): {key: item.get(key) for key in ("configure", "write", "read")}
        for item in (client.list_permissions(vhost) if exists else [])
    }

    def grant(permission: _Permission, *, reconnect: bool) -> None:
        regexes = permission.regexes
        client.put_permissions(
            vhost,
            permission.user,
            configure=regexes["configure"],
            write=regexes["write"],
            read=regexes["read"],
        )
        if reconnect:
            _close_connections(client, vhost, permission.user, "permissions changed")

    def revoke(user: str) -> None:
        client.delete_permissions(vhost, user)
        _close_connections(client, vhost, user, "permissions revoked")

    for permission in doc.permissions:
        now = current.get(permission.user)
        if now is None:
            change = Change(ChangeKind.CREATE, Resource.PERMISSION, permission.user)
        elif now != permission.regexes:
            differences = {
                key: (now[key], wanted)
                for key, wanted in permission.regexes.items()
                if now[key] != wanted
            }
            change = Change(ChangeKind.UPDATE, Resource.PERMISSION, permission.user, differences)
        else:
            continue
        reconnect = change.kind is ChangeKind.UPDATE
        plan.permissions.append(_Step(change, partial(grant, permission, reconnect=reconnect)))
    wanted = {permission.user for permission in doc.permissions} | {client.username}
    stale = [user for user in current if user not in wanted]
    plan.extra.extend(
        Change(ChangeKind.EXTRA, Resource.PERMISSION, user)
        for user in stale
        if not _fabric_user(user)
    )
    # A user of the fabric's own naming that the document no longer has is a group the routing
    # table removed: left in place, its user could go on reading what its queues still hold.
    plan.permissions.extend(
        _Step(Change(ChangeKind.DELETE, Resource.PERMISSION, user), partial(revoke, user))
        for user in stale
        if _fabric_user(user)
    )


def _close_connections(client: ManagementApi, vhost: str, user: str, reason: str) -> None:
    """Close ``user``'s connections to ``vhost`` after its permissions changed or went.

    RabbitMQ checks read permission when a consumer starts, not per delivery: a consumer
    started before the change would go on receiving from a queue it may no longer read.
    Reconnecting, a client gets the new permissions (or, revoked, is refused the vhost).
    """
    for connection in client.list_connections(vhost):
        if connection.get("user") == user and client.close_connection(
            str(connection["name"]), reason=f"fabric topology: {reason}"
        ):
            _LOG.info("topology: closed connection %r of %r (%s)", connection["name"], user, reason)


def _close_stray_consumers(client: ManagementApi, doc: _Document, vhost: str) -> None:
    """Close the connections of the document's and the fabric's users that consume a queue
    their permissions on ``vhost`` no longer let them read.

    A permission step closes the user's connections right after changing its permissions. A run
    that stopped in between (a management API error, the Lambda's timeout) left the permission
    changed, so the next run plans no step for it, and a consumer started before the change would
    go on receiving for good. The consumers themselves are therefore checked on every apply.
    """
    managed = {user.name for user in doc.users} | {p.user for p in doc.permissions}
    readable = {
        str(item["user"]): str(item.get("read") or "") for item in client.list_permissions(vhost)
    }
    stray: dict[str, str] = {}
    for consumer in client.list_consumers(vhost):
        channel = consumer.get("channel_details") or {}
        user, connection = str(channel.get("user", "")), channel.get("connection_name")
        queue = str((consumer.get("queue") or {}).get("name", ""))
        if (
            connection is not None
            and (user in managed or _fabric_user(user))
            and user != client.username
            and not _may_read(readable.get(user), queue)
        ):
            stray[str(connection)] = user
    for connection, user in stray.items():
        if client.close_connection(connection, reason="fabric topology: permissions changed"):
            _LOG.info(
                "topology: closed connection %r of %r (reads %r no more)", connection, user, vhost
            )


def _may_read(regex: str | None, queue: str) -> bool:
    """Whether RabbitMQ lets a user with this read regex (None: no permission) read ``queue``.

    RabbitMQ searches the regex in the name (anchors are the regex's own), and an empty one
    matches nothing. A regex Python cannot read counts as allowing: closing is for certain cases.
    """
    if not regex:
        return False
    try:
        return re.search(regex, queue) is not None
    except re.error:
        return True


def _fabric_user(name: str) -> bool:
    """A broker user the topology itself names (``fabric-<group>``, ``fabric-platform``,
    ``fabric-monitor``), not the administrator the applier logs in as."""
    return name.startswith(FABRIC_USER_PREFIX) and name != ADMIN_USER


# --- the operations ------------------------------------------------------------------------


def diff_topology(
    client: ManagementApi,
    definitions: Mapping[str, Any],
    vhost: str,
    *,
    passwords: Mapping[str, str] | None = None,
) -> list[Change]:
    """What ``apply_topology`` would do to ``vhost``, then what it would leave as ``extra``.

    Without ``passwords`` users are compared by tags only. Changes come in apply's order
    (vhost, exchanges, queues, bindings, users, permissions); an empty list means the broker
    matches the document. Read-only.

    Raises:
        ConfigError: the document is malformed or spans several vhosts, or ``passwords`` lacks
            a user of the document.
        ManagementApiError: the management API failed.
    """
    doc = _parse(definitions)
    if passwords is not None:
        _check_passwords(doc, passwords)
    plan = _plan(client, doc, vhost, passwords)
    return [step.change for step in plan.steps()] + plan.extra


def apply_topology(
    client: ManagementApi,
    definitions: Mapping[str, Any],
    *,
    passwords: Mapping[str, str],
    vhost: str,
    recreate_empty: bool = False,
) -> ApplyReport:
    """Bring ``vhost`` to the document: create what is missing, update users and permissions.

    Idempotent; works in dependency order (vhost, exchanges, queues, bindings, users with
    their passwords, permissions) and deletes nothing that is extra, except the document's
    exchanges' bindings that it no longer has (see the module docstring). An exchange or queue that
    differs is deleted and declared again only with ``recreate_empty=True`` and, for a queue,
    only when the statistics show it holds no messages, once before any change and again after
    its inflow was cut (see the module docstring); each is bound again right after it is
    declared. Everything is checked before the first change, so a refusal leaves the broker as
    it was (the bindings cut for the second check put back).

    Raises:
        ConfigError: the document is malformed or spans several vhosts, or a user of the
            document has no (or an empty) password in ``passwords``.
        TopologyConflict: an exchange or queue differs and cannot change in place (the message
            names each one and what differs), or a queue to recreate may hold messages.
        ManagementApiError: the management API failed; what was applied before stays applied,
            and applying again resumes.
    """
    doc = _parse(definitions)
    _check_passwords(doc, passwords)
    plan = _plan(client, doc, vhost, passwords)
    _check_recreations(plan, recreate_empty)
    cut = _check_recreated_queues_again(client, plan, vhost)
    applied: list[Change] = []
    recreated: set[str] = set()
    try:
        for step in [*plan.vhost, *plan.exchanges, *plan.queues]:
            _run(step, applied)
            if step.change.kind is ChangeKind.NEEDS_RECREATE:
                recreated.add(step.change.name)
    except Exception:
        # A queue whose inflow was cut and that is not recreated yet must not stay unbound.
        _restore(client, vhost, (b for b in cut if b.destination not in recreated))
        raise
    # What a recreated exchange or queue could not be bound to yet: compare bindings again.
    bindings = _binding_steps(client, doc, vhost, True, []) if recreated else plan.bindings
    for step in [*bindings, *plan.users, *plan.permissions]:
        _run(step, applied)
    _close_stray_consumers(client, doc, vhost)
    return ApplyReport(vhost=vhost, applied=tuple(applied), extra=tuple(plan.extra))


def _run(step: _Step, applied: list[Change]) -> None:
    step.run()
    applied.append(step.change)
    _LOG.info("topology: %s", step.change)


def _check_passwords(doc: _Document, passwords: Mapping[str, str]) -> None:
    missing = [user.name for user in doc.users if not passwords.get(user.name)]
    if missing:
        raise ConfigError(f"no password for broker users {missing}")


def _check_recreations(plan: _Plan, recreate_empty: bool) -> None:
    blocking = [
        step.change
        for step in [*plan.exchanges, *plan.queues]
        if step.change.kind is ChangeKind.NEEDS_RECREATE
    ]
    if not blocking:
        return
    described = "; ".join(str(change) for change in blocking)
    if not recreate_empty:
        raise TopologyConflict(
            f"cannot change in place, delete and declare again (recreate_empty=True does so "
            f"for empty queues): {described}"
        )
    for change in blocking:
        if change.resource is not Resource.QUEUE:
            continue
        messages = plan.queue_messages.get(change.name)
        if _may_hold_messages(messages):
            count = "an unsampled number of" if messages is None else messages
            raise TopologyConflict(
                f"queue {change.name!r} holds {count} messages; not recreating it: {described}"
            )


def _check_recreated_queues_again(client: ManagementApi, plan: _Plan, vhost: str) -> list[_Binding]:
    """Cut the inflow of the queues to recreate and check them empty once more, on statistics
    sampled after the cut (the plan's may be seconds old); returns the bindings cut, which stay
    cut until each queue is recreated and bound again.

    Raises:
        TopologyConflict: a queue to recreate may hold messages; its bindings are back.
    """
    names = [s.change.name for s in plan.queues if s.change.kind is ChangeKind.NEEDS_RECREATE]
    if not names:
        return []
    counts, cut = _recount_without_inflow(client, vhost, names)
    holding = {name: counts.get(name) for name in names if _may_hold_messages(counts.get(name))}
    if holding:
        missed = _restore(client, vhost, cut)
        described = "; ".join(
            f"queue {name!r} holds {'an unsampled number of' if count is None else count} messages"
            for name, count in holding.items()
        )
        problem = f"not recreating: once its inflow was cut, {described}"
        if missed:
            problem += f" (bindings not put back: {'; '.join(map(str, missed))})"
        raise TopologyConflict(problem)
    return cut


def delete_topology(
    client: ManagementApi, definitions: Mapping[str, Any], vhost: str
) -> DeleteReport:
    """Remove the document's objects from ``vhost`` without destroying a message.

    Deletes the document's permissions and users (never the user the client logs in as),
    then its queues that hold no messages, then its exchanges. A queue that holds messages (or
    whose count is not sampled yet) is kept together with its onward path: its dead-letter
    exchange, alternate exchanges, and whatever those route to, so that nothing it holds can
    be dropped later. A queue is found empty twice: on the statistics, then on statistics
    sampled after its inflow was cut (see the module docstring); the queues kept are bound
    again from the exchanges that stay. The vhost itself goes only when the document declares
    it, it is not ``/``, and no queue at all is left in it. Objects already gone are skipped.

    Raises:
        ConfigError: the document is malformed or spans several vhosts.
        ManagementApiError: the management API failed; running it again resumes.
    """
    doc = _parse(definitions)
    removal = _Removal(vhost)
    exists = client.get_vhost(vhost) is not None
    own_login = "the user the applier logs in as"
    for permission in doc.permissions if exists else ():
        removal.remove(
            Resource.PERMISSION,
            permission.user,
            partial(client.delete_permissions, vhost, permission.user),
            keep_because=own_login if permission.user == client.username else None,
        )
    for user in doc.users:
        removal.remove(
            Resource.USER,
            user.name,
            partial(client.delete_user, user.name),
            keep_because=own_login if user.name == client.username else None,
        )
    if exists:
        _delete_vhost_objects(client, doc, vhost, removal)
    return removal.report()


@dataclass
class _Removal:
    vhost: str
    deleted: list[tuple[Resource, str]] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)

    def remove(
        self,
        resource: Resource,
        name: str,
        delete: Callable[[], bool],
        *,
        keep_because: str | None,
    ) -> None:
        if keep_because is not None:
            self.kept.append(Kept(resource, name, keep_because))
        elif delete():
            self.deleted.append((resource, name))
            _LOG.info("topology: deleted %s %r", resource, name)

    def report(self) -> DeleteReport:
        return DeleteReport(vhost=self.vhost, deleted=tuple(self.deleted), kept=tuple(self.kept))


def _delete_vhost_objects(
    client: ManagementApi, doc: _Document, vhost: str, removal: _Removal
) -> None:
    queues = {str(item["name"]): item.get("messages") for item in client.list_queues(vhost)}
    exchanges = {str(item["name"]) for item in client.list_exchanges(vhost)}
    holding = {
        queue.name: queue_messages
        for queue in doc.queues
        if queue.name in queues and _may_hold_messages(queue_messages := queues[queue.name])
    }
    reasons = _keep_reasons(doc, holding)
    doomed = [
        q.name for q in doc.queues if q.name in queues and (Resource.QUEUE, q.name) not in reasons
    ]
    cut: list[_Binding] = []
    if doomed:
        # The sampled counts may be seconds old: count the queues to delete again once nothing
        # can reach them any more.
        counts, cut = _recount_without_inflow(client, vhost, doomed)
        holding.update(
            (name, counts[name])
            for name in doomed
            if name in counts and _may_hold_messages(counts[name])
        )
        reasons = _keep_reasons(doc, holding)
    if any(resource is Resource.QUEUE for resource, _name in reasons):
        _restore_inflow(client, doc, vhost, cut, reasons)
    for queue in (queue for queue in doc.queues if queue.name in queues):
        removal.remove(
            Resource.QUEUE,
            queue.name,
            partial(client.delete_queue, vhost, queue.name),
            keep_because=reasons.get((Resource.QUEUE, queue.name)),
        )
    for exchange in (exchange for exchange in doc.exchanges if exchange.name in exchanges):
        removal.remove(
            Resource.EXCHANGE,
            exchange.name,
            partial(client.delete_exchange, vhost, exchange.name),
            keep_because=reasons.get((Resource.EXCHANGE, exchange.name)),
        )
    if doc.owns_vhost and vhost != _DEFAULT_VHOST:
        remaining = sorted(str(item["name"]) for item in client.list_queues(vhost))
        removal.remove(
            Resource.VHOST,
            vhost,
            partial(client.delete_vhost, vhost),
            keep_because=f"still holds queues {remaining}" if remaining else None,
        )


def _restore_inflow(
    client: ManagementApi,
    doc: _Document,
    vhost: str,
    cut: list[_Binding],
    reasons: Mapping[tuple[Resource, str], str],
) -> None:
    """Bind the queues kept again: those whose inflow was cut, and the document's bindings into
    any kept queue (an earlier run may have stopped between its cut and this), from an
    exchange that exists and stays. A queue kept on the onward path of another must receive
    what that one dead-letters or routes on."""
    exchanges = {str(item["name"]) for item in client.list_exchanges(vhost)}
    leaving = {e.name for e in doc.exchanges if (Resource.EXCHANGE, e.name) not in reasons}
    current = {b.key for b in map(_binding_from_broker, client.list_bindings(vhost))}
    for binding in [*cut, *doc.bindings]:
        if (
            binding.destination_type == "queue"
            and (Resource.QUEUE, binding.destination) in reasons
            and binding.source in exchanges
            and binding.source not in leaving
            and binding.key not in current
        ):
            _bind(client, vhost, binding)
            current.add(binding.key)


def _keep_reasons(
    doc: _Document, holding: Mapping[str, int | None]
) -> dict[tuple[Resource, str], str]:
    """Each object a message in a holding queue may still travel to, with why it is kept."""
    onward: dict[tuple[Resource, str], list[tuple[Resource, str]]] = {}
    for queue in doc.queues:
        if dead_letter := queue.properties["arguments"].get("x-dead-letter-exchange"):
            onward.setdefault((Resource.QUEUE, queue.name), []).append(
                (Resource.EXCHANGE, str(dead_letter))
            )
    for exchange in doc.exchanges:
        if alternate := exchange.properties["arguments"].get("alternate-exchange"):
            onward.setdefault((Resource.EXCHANGE, exchange.name), []).append(
                (Resource.EXCHANGE, str(alternate))
            )
    for binding in doc.bindings:
        destination = Resource.QUEUE if binding.destination_type == "queue" else Resource.EXCHANGE
        onward.setdefault((Resource.EXCHANGE, binding.source), []).append(
            (destination, binding.destination)
        )
    reasons: dict[tuple[Resource, str], str] = {}
    for name, messages in holding.items():
        reasons[(Resource.QUEUE, name)] = (
            "message count not sampled yet" if messages is None else f"holds {messages} messages"
        )
    pending = list(reasons)
    while pending:
        origin = pending.pop()
        for target in onward.get(origin, []):
            if target not in reasons:
                reasons[target] = f"on the onward path of {origin[0]} {origin[1]!r}"
                pending.append(target)
    return reasons
