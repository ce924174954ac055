"""The topology custom resource's logic: apply, update or remove the broker topology.

Settings come from the function's environment (set by the stack): ``MANAGEMENT_URL`` (the
broker's console URL), ``ADMIN_SECRET_ARN`` (the broker admin), ``USER_SECRET_ARNS`` (JSON
object: broker user name -> secret ARN), ``FABRIC_ENV`` and, optionally, ``RABBITMQ_VHOST``
(default ``/``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from fabric.adapters.management import ManagementClient
from fabric.adapters.secrets import SecretCredentials
from fabric.errors import ConfigError
from fabric.routing import default_routing_table
from fabric.topology import definitions
from fabric.topology_apply import (
    ApplyReport,
    ManagementApi,
    apply_topology,
    delete_topology,
    password_matches,
)


def on_event(
    request_type: str,
    environ: Mapping[str, str],
    *,
    client_factory: Callable[[str, str, str], ManagementApi] | None = None,
    secrets_client: Callable[[], Any] | None = None,
    physical_id: str | None = None,
    deadline: float | None = None,
) -> tuple[str, dict[str, str]]:
    """Handle one CloudFormation request; returns (physical id, response data).

    ``physical_id``: the request's (Update and Delete). A Delete of any other id than the one
    a Create answers (a failed Create's, whose rollback sends it) removes nothing: the topology
    on the broker is not that resource's.

    ``deadline`` (``time.monotonic()``) bounds every management API call: a run that has not
    finished by then fails with ``ManagementUnavailable`` (the function can still answer
    CloudFormation before its own timeout); what was applied stays, and the next run resumes.

    Raises:
        ConfigError: a setting is missing, or a definition differs in a way that needs an
            operator (a quorum queue argument changed: ``fabric topology diff`` explains).
        ManagementApiError: the broker's management API refused or could not be reached.
    """
    try:
        url = environ["MANAGEMENT_URL"]
        user_secrets: dict[str, str] = json.loads(environ["USER_SECRET_ARNS"])
        environment = environ["FABRIC_ENV"]
        admin_arn = environ["ADMIN_SECRET_ARN"]
        vhost = environ.get("RABBITMQ_VHOST") or "/"
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"topology resource setting missing or malformed: {exc}") from None
    ours = f"fabric-{environment}-topology"
    if request_type == "Delete" and physical_id != ours:
        return str(physical_id), {"Deleted": "0", "Kept": "0"}
    make_secrets = secrets_client or _secrets_manager
    admin_user, admin_password = SecretCredentials(admin_arn, make_secrets)()
    make_client = client_factory or partial(ManagementClient, deadline=deadline)
    client = make_client(url, admin_user, admin_password)
    document = definitions(default_routing_table(), vhost=vhost)
    if request_type == "Delete":
        report = delete_topology(client, document, vhost)
        return ours, {"Deleted": str(len(report.deleted)), "Kept": str(len(report.kept))}
    passwords = {
        name: _password(client, name, SecretCredentials(arn, make_secrets))
        for name, arn in user_secrets.items()
    }
    applied: ApplyReport = apply_topology(client, document, passwords=passwords, vhost=vhost)
    return ours, {"Changes": str(len(applied.applied)), "Extra": str(len(applied.extra))}


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
    # function's timeout on their own, and CloudFormation would get no answer at all.
    return boto3.client(
        "secretsmanager",
        config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3}),
    )
