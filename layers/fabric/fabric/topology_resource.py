"""The topology function's logic: the custom resource (apply, update or remove the broker
topology at deploy time) and the runbook's requests (``topology diff``, ``topology apply``).

Settings come from the function's environment (set by the stack): ``MANAGEMENT_URL`` (the
broker's console URL), ``ADMIN_SECRET_ARN`` (the broker admin), ``USER_SECRET_ARNS`` (JSON
object: broker user name -> secret ARN), ``FABRIC_ENV`` and, optionally, ``RABBITMQ_VHOST``
(default ``/``).

Who owns the topology. CloudFormation replaces a custom resource (a new logical id, a move to
another stack) by creating the new one first and deleting the old one after; it rolls a
replacement back by deleting the new one. Both Deletes come while another resource still
manages the topology, so a Delete must not remove it just because the function handles it.
Each Create therefore answers a physical id of its own (``fabric-<env>-topology-<hash of the
stack and logical ids>-<hash of the request id>``; the version before answered one hash of all
three, and those ids stay valid), and the broker records the resources that manage the
topology of a vhost (``owners``: the broker-wide parameter ``owner_parameter(vhost)``, a JSON
object ``{"vhost", "owners"}``). Every write re-reads the record just before and adds or takes
off only its own id. A Create or an Update adds its id before it applies (so that a Delete
running meanwhile sees it) and checks after that it is still there (an overlapping write may
have dropped it: it adds it again and applies again); a Create that fails takes its id off
again, as far as the broker answers. A Delete takes its id off, re-reads, and removes the
topology only when no owner is left; it checks the record once more after the removal, and
applies the topology again if an owner was added meanwhile (that owner's apply may have
overlapped the removal); the record goes last, so a Delete that fails half-way and is sent
again resumes. The management API has no compare-and-swap: a write that lands between another
one's read and write (milliseconds apart) still loses that one's change, so deploys that apply
or remove the topology of one vhost must not overlap.

The rollback of a failed Create names ``respond``'s ``<logical id>-create-failed-<request id>``:
it takes off the record the failed Create's own id (computed again from that request id) and
that marker (an Update sent under it, a retry of the failed resource, recorded it), and goes on
as above: it removes whatever that Create left when no other owner is left. A Delete under an
id no Create answered (CloudFormation made it up: it cancelled the Create because another
resource failed, or got no answer in time) may come after a Create the function still ran to
the end and recorded: it takes off that id and every id of its stack and logical id (the first
hash), and goes on as above. That is safe because one stack and logical id has one resource at
a time (an Update keeps its id; a replacement has another logical id or stack, a stack created
again under its name another stack id) and the function runs one request at a time (reserved
concurrency 1). Both are best-effort and always succeed (within the deadline), so that a
rollback never hangs on a broker it cannot reach. A Delete with no id at all changes nothing.

Resources deployed before the record existed have the id ``fabric-<env>-topology`` (an Update
keeps it and records it): a Delete under that id with no record at all removes the topology as
before; a Create that finds the topology's platform user but no record counts that id among the
owners too (the resource it replaces). That is only right while no Create of this code has run:
each one writes the record before it changes anything and leaves it (empty, if need be) when it
fails, and the record is deleted only after the topology was removed (platform user included).
So the platform user without a record was left by a resource that never wrote one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from fabric.adapters.management import ManagementClient
from fabric.adapters.secrets import SecretCredentials
from fabric.custom_resource import FAILED_CREATE
from fabric.errors import (
    ConfigError,
    ManagementApiError,
    TopologyConflict,
    TransportUnavailable,
)
from fabric.routing import default_routing_table
from fabric.topology import PLATFORM_USER, definitions
from fabric.topology_apply import (
    ApplyReport,
    Change,
    ChangeKind,
    ManagementApi,
    apply_topology,
    delete_topology,
    diff_topology,
    password_matches,
    user_secret_arns,
)

_LOG = logging.getLogger(__name__)

# A diff report's groups: what ``apply`` would do with each kind of difference.
DIFF_GROUPS = {
    ChangeKind.CREATE: "missing",
    ChangeKind.UPDATE: "changed",
    ChangeKind.NEEDS_RECREATE: "needs_recreate",
    ChangeKind.DELETE: "obsolete",
    ChangeKind.EXTRA: "extra",
}


@dataclass(frozen=True)
class _Settings:
    url: str
    user_secrets: dict[str, str]
    environment: str
    admin_arn: str
    vhost: str


@dataclass(frozen=True)
class TopologyRequest:
    """An operator's request (the runbook's ``topology`` command): ``diff``, or ``apply``;
    ``recreate_empty`` lets apply delete and declare again the exchanges and the empty queues
    that cannot change in place."""

    action: str
    recreate_empty: bool = False


def topology_document(vhost: str) -> dict[str, Any]:
    """The routing table's topology for ``vhost``: what the custom resource and the runbook
    apply."""
    return definitions(default_routing_table(), vhost=vhost)


def is_cloudformation_event(event: object) -> bool:
    """Whether ``event`` is a CloudFormation custom-resource request (it always carries
    ``RequestType`` and ``ResponseURL``); the runbook's requests carry neither."""
    return isinstance(event, Mapping) and "RequestType" in event and "ResponseURL" in event


def parse_request(event: object) -> TopologyRequest:
    """The operator's request: ``{"action": "diff"}`` or ``{"action": "apply"}``, the latter
    with an optional ``"recreate_empty": true``.

    Raises:
        ValueError: not an object, an unknown field, an unknown action, or a ``recreate_empty``
            that is not a boolean or does not go with ``apply``; the message says which.
    """
    if not isinstance(event, Mapping):
        raise ValueError("a topology request is a JSON object")
    unknown = sorted(str(key) for key in event if key not in ("action", "recreate_empty"))
    if unknown:
        raise ValueError(
            f"unknown field(s) {unknown}: a topology request has 'action' and, for apply,"
            " 'recreate_empty'"
        )
    action = event.get("action")
    if action not in ("diff", "apply"):
        raise ValueError(f"'action' must be 'diff' or 'apply', not {action!r}")
    recreate_empty = event.get("recreate_empty", False)
    if not isinstance(recreate_empty, bool):
        raise ValueError("'recreate_empty' must be true or false")
    if recreate_empty and action != "apply":
        raise ValueError("'recreate_empty' goes with 'apply' only")
    return TopologyRequest(action, recreate_empty)


def on_event(
    event: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    client_factory: Callable[[str, str, str], ManagementApi] | None = None,
    secrets_client: Callable[[], Any] | None = None,
    deadline: float | None = None,
) -> tuple[str, dict[str, str]]:
    """Handle one CloudFormation request (``event``: its ``RequestType``, ``PhysicalResourceId``,
    ``StackId``, ``LogicalResourceId`` and ``RequestId``); returns (physical id, response data).

    Create answers a new id; Update answers the id it was sent (another one would be a
    replacement); a Delete removes the topology only as the module docstring says.

    ``deadline`` (``time.monotonic()``) bounds every management API call: a run that has not
    finished by then fails with ``ManagementUnavailable`` (the function can still answer
    CloudFormation before its own timeout); what was applied stays, and the next run resumes.

    Raises:
        ConfigError: a setting is missing, a definition differs in a way that needs an
            operator (a quorum queue argument changed: ``runbook.py topology diff`` explains),
            or the owner record is not what this function writes.
        ManagementApiError: the broker's management API refused or could not be reached.
        A Delete under a failed Create's answer or an id CloudFormation made up (a
        rollback, as a rule) raises nothing.
    """
    request_type = str(event["RequestType"])
    physical_id = str(event.get("PhysicalResourceId") or "")
    make_secrets = secrets_client or _secrets_manager

    def connect(settings: _Settings) -> _Topology:
        client = _admin_client(settings, make_secrets, client_factory, deadline)
        return _Topology(client, settings, make_secrets, deadline)

    if request_type == "Delete":
        return physical_id, _on_delete(event, physical_id, environ, connect)
    settings = _settings(environ)
    legacy = legacy_physical_id(settings.environment)
    if request_type == "Create":
        physical_id = _new_physical_id(legacy, event)
        return physical_id, _create(connect(settings), physical_id)
    physical_id = physical_id or legacy  # CloudFormation sends an Update its id
    return physical_id, _update(connect(settings), physical_id)


_NOTHING = {"Deleted": "0", "Kept": "0"}


def legacy_physical_id(environment: str) -> str:
    """The physical id every Create answered before each got its own: deployed resources
    keep it."""
    return f"fabric-{environment}-topology"


def owner_parameter(vhost: str) -> str:
    """The broker-wide parameter that records the owners of the topology on ``vhost``."""
    return f"fabric-topology-owners:{vhost}"


def _new_physical_id(legacy: str, event: Mapping[str, Any]) -> str:
    """A Create's own id: no other resource, in this stack or another, gets the same."""
    return f"{_resource_prefix(legacy, event)}{_digest(event.get('RequestId', ''))}"


def _resource_prefix(legacy: str, event: Mapping[str, Any]) -> str:
    """How the id of every Create of ``event``'s resource (its stack id, which is new for a
    stack created again under the same name, and its logical id) begins."""
    return f"{legacy}-{_digest(event.get('StackId', ''), event.get('LogicalResourceId', ''))}-"


def _digest(*parts: object) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:16]


def _answered(legacy: str, physical_id: str) -> bool:
    """Whether a Create of this function answered ``physical_id``: the legacy id, one hash (the
    version before) or two (``_new_physical_id``) after it."""
    return re.fullmatch(rf"{re.escape(legacy)}(-[0-9a-f]{{16}}){{0,2}}", physical_id) is not None


def _failed_request(event: Mapping[str, Any]) -> str | None:
    """The request id of the failed Create whose answer (``respond``'s ``<logical
    id>-create-failed-<request id>``) the Delete ``event`` names, or ``None``."""
    prefix = f"{event.get('LogicalResourceId')}{FAILED_CREATE}"
    physical_id = str(event.get("PhysicalResourceId") or "")
    request_id = physical_id.removeprefix(prefix)
    return request_id if physical_id.startswith(prefix) and request_id else None


@dataclass(frozen=True)
class _Topology:
    """The topology of the function's vhost, reached as the broker's administrator."""

    client: ManagementApi
    settings: _Settings
    make_secrets: Callable[[], Any]
    deadline: float | None

    @property
    def vhost(self) -> str:
        return self.settings.vhost

    @property
    def legacy(self) -> str:
        return legacy_physical_id(self.settings.environment)

    def passwords(self) -> dict[str, str]:
        return _passwords(self.client, self.settings.user_secrets, self.make_secrets, self.deadline)

    def apply(self, passwords: Mapping[str, str]) -> ApplyReport:
        return apply_topology(
            self.client, topology_document(self.vhost), passwords=passwords, vhost=self.vhost
        )

    def remove(self) -> dict[str, str]:
        report = delete_topology(self.client, topology_document(self.vhost), self.vhost)
        return {"Deleted": str(len(report.deleted)), "Kept": str(len(report.kept))}

    def owners(self) -> list[str] | None:
        """The recorded owners; ``None`` when there is no record.

        Raises:
            ConfigError: the record is not what this function writes (changed by hand).
        """
        name = owner_parameter(self.vhost)
        value = self.client.get_global_parameter(name)
        if value is None:
            return None
        owners = value.get("owners") if isinstance(value, dict) else None
        if not isinstance(owners, list) or not all(isinstance(owner, str) for owner in owners):
            raise ConfigError(f"broker parameter {name!r} is not an owner record: {value!r}")
        return owners

    def add_owner(self, owner: str, *, legacy: bool = False) -> bool:
        """Record ``owner``, reading the record right before; with ``legacy``, also the
        resource deployed before the record when there is no record but the platform user is
        there. Whether ``owner`` was missing."""
        deployed_before = legacy and self.client.get_user(PLATFORM_USER) is not None
        owners = self.owners()  # the write follows at once: the window another write can hit
        if owners is None:
            owners = [self.legacy] if deployed_before else []
        elif owner in owners:
            return False
        self._record([*owners, owner])
        return True

    def remove_owners(self, ids: Collection[str], prefix: str | None = None) -> list[str] | None:
        """Take ``ids`` off the record, and with ``prefix`` every id that begins with it,
        reading it right before; the owners left (``None``: no record)."""
        owners = self.owners()
        if owners is None:
            return None
        left = [
            owner
            for owner in owners
            if owner not in ids and not (prefix is not None and owner.startswith(prefix))
        ]
        if left != owners:
            self._record(left)
        return left

    def _record(self, owners: list[str]) -> None:
        self.client.put_global_parameter(
            owner_parameter(self.vhost), {"vhost": self.vhost, "owners": owners}
        )
        _LOG.info("topology: owners of vhost %r: %s", self.vhost, owners)


def _create(topology: _Topology, physical_id: str) -> dict[str, str]:
    """A Create: recorded before it applies; a failure takes its id off again, as far as the
    broker answers (the rollback's Delete tries too)."""
    passwords = topology.passwords()
    topology.add_owner(physical_id, legacy=True)
    try:
        return _apply(topology, physical_id, passwords)
    except Exception:
        try:
            topology.remove_owners([physical_id])
        except (ConfigError, ManagementApiError) as exc:
            _LOG.warning("topology: %s stays among the owners: %s", physical_id, exc)
        raise


def _update(topology: _Topology, physical_id: str) -> dict[str, str]:
    """An Update: recorded (a resource deployed before the record is recorded now), then
    applied; the resource stays whatever happens, and so does its id."""
    passwords = topology.passwords()
    topology.add_owner(physical_id)
    return _apply(topology, physical_id, passwords)


def _apply(topology: _Topology, physical_id: str, passwords: Mapping[str, str]) -> dict[str, str]:
    applied = topology.apply(passwords)
    changes = len(applied.applied)
    if topology.add_owner(physical_id):
        # A write that overlapped this one's dropped the id: a Delete may have found no owner
        # and removed the topology while it was being applied.
        _LOG.warning("topology: %s was off the owners; applied again", physical_id)
        applied = topology.apply(passwords)
        changes += len(applied.applied)
    return {"Changes": str(changes), "Extra": str(len(applied.extra))}


def _on_delete(
    event: Mapping[str, Any],
    physical_id: str,
    environ: Mapping[str, str],
    connect: Callable[[_Settings], _Topology],
) -> dict[str, str]:
    """A Delete (the module docstring): of a resource a Create answered, or, best-effort, of
    one whose Create CloudFormation never saw succeed (a marker, or an id it made up)."""
    failed_request = _failed_request(event)
    if failed_request is None:
        settings = _settings(environ)
        if _answered(legacy_physical_id(settings.environment), physical_id):
            return _delete(connect(settings), physical_id)
        if not physical_id:  # CloudFormation always sends one: this request names no resource
            return dict(_NOTHING)
    try:
        topology = connect(_settings(environ))
        if failed_request is not None:
            failed = _new_physical_id(topology.legacy, {**event, "RequestId": failed_request})
            return _delete(topology, physical_id, also=[failed])
        return _delete(topology, physical_id, prefix=_resource_prefix(topology.legacy, event))
    except Exception:  # a rollback must never fail: the record keeps what it could not do
        _LOG.warning("topology: the rollback of %s stopped", physical_id, exc_info=True)
        return dict(_NOTHING)


def _delete(
    topology: _Topology,
    physical_id: str,
    *,
    also: Collection[str] = (),
    prefix: str | None = None,
) -> dict[str, str]:
    """A Delete: takes off ``physical_id``, the ids in ``also`` and those that begin with
    ``prefix``; the topology goes only when no owner is left (with no record at all, only under
    the legacy id); the record goes after it, so a Delete that fails half-way and is sent again
    resumes."""
    owners = topology.remove_owners([physical_id, *also], prefix)
    if owners is None and physical_id != topology.legacy:
        return dict(_NOTHING)  # no record: what it applied went with it (or never came)
    left = topology.owners()
    if left:
        _LOG.info("topology: %s left the owners %s of %r", physical_id, left, topology.vhost)
        return dict(_NOTHING)
    removed = topology.remove()
    left = topology.owners()
    if left:
        _LOG.warning("topology: %s became owners during the removal; applied again", left)
        topology.apply(topology.passwords())
    elif left is not None:
        topology.client.delete_global_parameter(owner_parameter(topology.vhost))
    return removed


def on_request(
    event: object,
    environ: Mapping[str, str],
    *,
    client_factory: Callable[[str, str, str], ManagementApi] | None = None,
    secrets_client: Callable[[], Any] | None = None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Handle one operator request (``parse_request``) with the custom resource's settings,
    administrator and passwords; returns ``run_request``'s report, or ``{"error": ...}`` for a
    malformed request (nothing read, nothing changed).

    ``deadline`` bounds every management API call as in ``on_event``.

    Raises:
        ConfigError: a setting is missing or malformed, or a secret is not a username and
            password.
        TransportUnavailable: Secrets Manager could not be read.
        ManagementApiError: the broker's management API refused or could not be reached
            (what apply changed before stays; applying again resumes).
    """
    try:
        request = parse_request(event)
    except ValueError as exc:
        return {"error": str(exc)}
    settings = _settings(environ)
    make_secrets = secrets_client or _secrets_manager
    client = _admin_client(settings, make_secrets, client_factory, deadline)
    passwords = _passwords(client, settings.user_secrets, make_secrets, deadline)
    _LOG.info("topology: operator request %s on vhost %r", request, settings.vhost)
    return run_request(request, client, settings.vhost, passwords=passwords)


def run_request(
    request: TopologyRequest,
    client: ManagementApi,
    vhost: str,
    *,
    passwords: Mapping[str, str] | None,
) -> dict[str, Any]:
    """Diff or apply the routing table's topology on ``vhost``; a JSON-ready report, with no
    password in it.

    Each item is ``{"resource", "name"}`` plus, where something differs, ``"differences"``
    (property or argument -> ``[broker, document]``; passwords show as ``(hidden)``).

    diff: ``in_sync`` (apply would change nothing) and the differences grouped as
    ``missing``, ``changed`` (users and permissions, updated in place), ``needs_recreate``
    (exchanges and queues that cannot change in place), ``obsolete`` (bindings and ``fabric-*``
    permissions apply deletes) and ``extra`` (left alone). Without ``passwords`` users are
    compared by tags only.

    apply: ``complete``, ``applied`` (each item with its ``kind``, in order), ``extra``, and,
    when it refused (a ``TopologyConflict``: apply checks everything first, so nothing
    changed), ``conflict`` (the reason) with the ``needs_recreate`` items.

    Raises:
        ConfigError: apply without ``passwords``, or a user of the topology has none.
        ManagementApiError: the management API failed.
    """
    document = topology_document(vhost)
    if request.action == "diff":
        changes = diff_topology(client, document, vhost, passwords=passwords)
        report: dict[str, Any] = {"action": "diff", "vhost": vhost}
        for kind, group in DIFF_GROUPS.items():
            report[group] = _items(change for change in changes if change.kind is kind)
        report["in_sync"] = not any(
            report[group] for kind, group in DIFF_GROUPS.items() if kind is not ChangeKind.EXTRA
        )
        return report
    if passwords is None:
        raise ConfigError("apply needs the password of every broker user of the topology")
    try:
        applied = apply_topology(
            client,
            document,
            passwords=passwords,
            vhost=vhost,
            recreate_empty=request.recreate_empty,
        )
    except TopologyConflict as exc:
        changes = diff_topology(client, document, vhost, passwords=passwords)
        return {
            "action": "apply",
            "vhost": vhost,
            "complete": False,
            "conflict": str(exc),
            "applied": [],
            "needs_recreate": _items(c for c in changes if c.kind is ChangeKind.NEEDS_RECREATE),
            "extra": _items(c for c in changes if c.kind is ChangeKind.EXTRA),
        }
    return {
        "action": "apply",
        "vhost": vhost,
        "complete": True,
        "conflict": None,
        "applied": _items(applied.applied, kind=True),
        "needs_recreate": [],
        "extra": _items(applied.extra),
    }


def _items(changes: Iterable[Change], *, kind: bool = False) -> list[dict[str, Any]]:
    items = []
    for change in changes:
        item: dict[str, Any] = {"resource": str(change.resource), "name": change.name}
        if kind:
            item["kind"] = str(change.kind)
        if change.differences:
            item["differences"] = {
                key: [current, wanted] for key, (current, wanted) in change.differences.items()
            }
        items.append(item)
    return items


def _settings(environ: Mapping[str, str]) -> _Settings:
    try:
        return _Settings(
            url=environ["MANAGEMENT_URL"],
            user_secrets=user_secret_arns(environ),
            environment=environ["FABRIC_ENV"],
            admin_arn=environ["ADMIN_SECRET_ARN"],
            vhost=environ.get("RABBITMQ_VHOST") or "/",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"topology resource setting missing or malformed: {exc}") from None


def _admin_client(
    settings: _Settings,
    make_secrets: Callable[[], Any],
    client_factory: Callable[[str, str, str], ManagementApi] | None,
    deadline: float | None,
) -> ManagementApi:
    _in_time(deadline)
    admin_user, admin_password = SecretCredentials(settings.admin_arn, make_secrets)()
    make_client = client_factory or partial(ManagementClient, deadline=deadline)
    return make_client(settings.url, admin_user, admin_password)


def _passwords(
    client: ManagementApi,
    user_secrets: Mapping[str, str],
    make_secrets: Callable[[], Any],
    deadline: float | None = None,
) -> dict[str, str]:
    """Every user's password from its secret: the users' secrets are their one source, so no
    run ever makes one up (a rotation owns the next one)."""
    passwords = {}
    for name, arn in user_secrets.items():
        _in_time(deadline)
        passwords[name] = _password(client, name, SecretCredentials(arn, make_secrets))
    return passwords


def _in_time(deadline: float | None) -> None:
    """Raise before a secret read that would start past ``deadline``: thirteen slow reads
    could otherwise outlast the function, which must still answer CloudFormation.

    Raises:
        TransportUnavailable: the deadline has passed.
    """
    if deadline is not None and time.monotonic() >= deadline:
        raise TransportUnavailable("no time left before the deadline to read the secrets")


def _password(client: ManagementApi, name: str, credentials: SecretCredentials) -> str:
    """The password ``name`` must have: the secret's current one, unless a rotation has set its
    pending one on the broker and not finished yet (``fabric.rotation``). Applying the current
    one then would put the old password back after the rotation's test, and its finish would
    leave the secret and the broker apart."""
    current = credentials()[1]
    pending = credentials.pending()
    if pending is None or pending[1] == current:
        return current
    user = client.get_user(name)
    return pending[1] if user is not None and password_matches(user, pending[1]) else current


def _secrets_manager() -> Any:
    import boto3
    from botocore.config import Config

    # botocore's defaults (60 s to connect, 60 s to read, several attempts) could outlast the
    # function's timeout on their own, and CloudFormation would get no answer at all. One read
    # takes at most 2 x (5 + 10) s (one retry): inside the answer margin left after the deadline,
    # which is checked before each read (``_in_time``).
    return boto3.client(
        "secretsmanager",
        config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1}),
    )
