"""Secrets Manager rotation of a RabbitMQ user's password, through the management API.

Secrets Manager rotates a secret by calling its rotation function four times with the same
``ClientRequestToken``, the id of the new version, which it has already labelled ``AWSPENDING``:

1. ``createSecret``: a new password into that version, next to the unchanged username;
2. ``setSecret``: the pending password onto the broker's user (tags kept);
3. ``testSecret``: the broker's salted hash of the user's password checked against it;
4. ``finishSecret``: the same check again, then ``AWSCURRENT`` moved to the new version.

Every step can run again without harm, as Secrets Manager retries a failed one. Between steps
2 and 4 the broker holds the pending password while the secret's current version still has the
old one: ``fabric.adapters.secrets.SecretCredentials`` reads the pending version after the
broker refused the current one, so the fabric's clients connect throughout; a client that reads
only ``AWSCURRENT`` (Lambda's Amazon MQ event sources) does not (docs/runbook.md, "A failed
rotation").

The function authenticates as the broker's administrator (``ADMIN_SECRET_ARN``) and refuses to
rotate that secret: it rotates only the fabric's users, which the topology creates. It does not
trust the ``username`` inside a secret: whoever may write one user's secret could name another
user there (the administrator, say), start a rotation and read that user's new password from
the secret. So it rotates only the secrets ``USER_SECRET_ARNS`` names, each only while both its
current and its pending versions name the user it is mapped to, and never a broker user tagged
``administrator``.
Settings come from the function's environment: ``MANAGEMENT_URL``, ``ADMIN_SECRET_ARN`` and
``USER_SECRET_ARNS`` (JSON object: broker user name -> secret ARN, the topology function's
setting).
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fabric.adapters.management import ManagementClient
from fabric.adapters.secrets import SecretCredentials
from fabric.errors import ConfigError, RotationError
from fabric.topology_apply import JsonObject, password_matches, user_secret_arns, user_tags

_LOG = logging.getLogger(__name__)

STEPS = ("createSecret", "setSecret", "testSecret", "finishSecret")
CURRENT, PENDING = "AWSCURRENT", "AWSPENDING"
# The broker's tag for the users that may administer it: never one of the fabric's users.
ADMINISTRATOR_TAG = "administrator"

# Amazon MQ refuses commas, colons and equal signs; the rest need quoting in AMQP URIs or
# shells. The first passwords (stacks/constructs/broker.py) leave out the same characters, from
# a fixed copy of their own: a change here changes only the passwords that rotations make.
EXCLUDED_PASSWORD_CHARACTERS = ",:=/@\"'\\`%&*?#[]{}()<>|;$ "  # noqa: S105 (not a secret)
PASSWORD_LENGTH = 32
_PUNCTUATION = "".join(c for c in string.punctuation if c not in EXCLUDED_PASSWORD_CHARACTERS)
_CLASSES = (string.ascii_lowercase, string.ascii_uppercase, string.digits, _PUNCTUATION)
_ALPHABET = "".join(_CLASSES)


def new_password() -> str:
    """32 characters from the OS's CSPRNG, at least one of each class, none excluded."""
    while True:
        password = "".join(secrets.choice(_ALPHABET) for _ in range(PASSWORD_LENGTH))
        if all(any(c in chars for c in password) for chars in _CLASSES):
            return password


@dataclass(frozen=True)
class RotationRequest:
    """One call from Secrets Manager: which secret, which new version, which step."""

    secret_id: str
    token: str
    step: str

    @classmethod
    def from_event(cls, event: Any) -> RotationRequest:
        """Raises RotationError: the event is not a Secrets Manager rotation request."""
        if not isinstance(event, Mapping):
            raise RotationError("a rotation event is a JSON object")
        fields = [event.get(key) for key in ("SecretId", "ClientRequestToken", "Step")]
        secret_id, token, step = (value if isinstance(value, str) else "" for value in fields)
        if not (secret_id and token and step):
            raise RotationError("a rotation event needs SecretId, ClientRequestToken and Step")
        request = cls(secret_id, token, step)
        if request.step not in STEPS:
            raise RotationError(f"unknown rotation step {request.step!r}; expected one of {STEPS}")
        return request


class BrokerUsers(Protocol):
    """The management API calls a rotation needs (``ManagementClient`` has them)."""

    def get_user(self, name: str) -> JsonObject | None: ...

    def put_user(self, name: str, *, password: str, tags: list[str]) -> None: ...


class PasswordRotation:
    """Runs the steps of a rotation against one Secrets Manager client and one broker.

    ``user_secrets`` maps each broker user the function may rotate to the ARN of its secret: a
    secret it does not name, or whose versions name another user, is refused.
    """

    def __init__(
        self,
        secrets_manager: Any,
        broker: BrokerUsers,
        *,
        admin_secret_arn: str,
        user_secrets: Mapping[str, str],
        generate: Callable[[], str] = new_password,
    ) -> None:
        self._secrets = secrets_manager
        self._broker = broker
        self._admin_secret_arn = admin_secret_arn
        self._users_by_arn = {arn: name for name, arn in user_secrets.items()}
        self._generate = generate

    def run(self, request: RotationRequest) -> None:
        """Do ``request.step`` once; a step already done is done again without effect.

        Raises:
            RotationError: the secret is the administrator's or not one of ``user_secrets``, a
                version of it names another user than its own, the broker's user is tagged
                ``administrator``, the secret is not being rotated with this token, its value
                or the broker's user is not what a rotation needs, or the broker does not hold
                the pending password at ``testSecret`` or ``finishSecret``.
            ManagementApiError: the management API refused or could not be reached.
            botocore.exceptions.ClientError: Secrets Manager refused a call.
        """
        metadata = self._secrets.describe_secret(SecretId=request.secret_id)
        if metadata.get("ARN") == self._admin_secret_arn:
            raise RotationError(
                "the rotation function authenticates as the broker administrator and does not "
                "rotate that secret (docs/runbook.md, 'Rotating the broker administrator')"
            )
        username = self._users_by_arn.get(metadata.get("ARN", ""))
        if username is None:
            raise RotationError(
                f"{request.secret_id} is not the secret of a broker user this function rotates "
                "(USER_SECRET_ARNS)"
            )
        if not metadata.get("RotationEnabled"):
            raise RotationError(f"rotation is not enabled for {request.secret_id}")
        stages = metadata.get("VersionIdsToStages", {}).get(request.token)
        if stages is None:
            raise RotationError(f"version {request.token} of the secret has no stage to rotate")
        if CURRENT in stages:
            _LOG.info("rotation %s: version is already current", request.step)
            return
        if PENDING not in stages:
            raise RotationError(f"version {request.token} of the secret is not {PENDING}")
        step = {
            "createSecret": self._create,
            "setSecret": self._set,
            "testSecret": self._test,
            "finishSecret": self._finish,
        }[request.step]
        step(request, metadata, username)
        _LOG.info("rotation %s done for %s", request.step, metadata.get("Name"))

    def _create(
        self, request: RotationRequest, _metadata: Mapping[str, Any], username: str
    ) -> None:
        current = self._current(request, username)
        if self._pending_or_none(request) is not None:
            return
        pending = {**current, "password": self._generate()}
        self._secrets.put_secret_value(
            SecretId=request.secret_id,
            ClientRequestToken=request.token,
            SecretString=json.dumps(pending),
            VersionStages=[PENDING],
        )

    def _set(self, request: RotationRequest, _metadata: Mapping[str, Any], username: str) -> None:
        password = self._pending_password(request, username)
        user = self._user(username)
        if not password_matches(user, password):
            tags = list(user_tags(user.get("tags")))
            self._broker.put_user(username, password=password, tags=tags)

    def _test(self, request: RotationRequest, _metadata: Mapping[str, Any], username: str) -> None:
        pending = self._pending_or_none(request)
        if pending is None:
            # Secrets Manager's check of a new schedule that does not rotate at once: it calls
            # testSecret alone, on a pending version no createSecret filled. What can be tested
            # then is that the broker and the secret agree on the current password.
            password = self._current(request, username)["password"]
            what = "current"
        else:
            password = self._pending_password(request, username, pending)
            what = "pending"
        self._check_broker_holds(username, password, what)

    def _finish(self, request: RotationRequest, metadata: Mapping[str, Any], username: str) -> None:
        # Checked again: something may have set the old password since testSecret (a deploy's
        # topology resource that read AWSCURRENT before setSecret). Moving AWSCURRENT then
        # would leave every client with a password the broker refuses.
        self._check_broker_holds(username, self._pending_password(request, username), "pending")
        current = next(
            version
            for version, stages in metadata["VersionIdsToStages"].items()
            if CURRENT in stages
        )
        self._secrets.update_secret_version_stage(
            SecretId=request.secret_id,
            VersionStage=CURRENT,
            MoveToVersionId=request.token,
            RemoveFromVersionId=current,
        )

    def _pending_password(
        self, request: RotationRequest, username: str, pending: dict[str, str] | None = None
    ) -> str:
        """The pending version's password (``pending``, if already read), once both it and the
        current version are checked to name ``username``, the secret's own user."""
        self._current(request, username)
        pending = pending or self._pending_or_none(request)
        if pending is None:
            raise RotationError(f"version {request.token} has no value: createSecret did not run")
        _check_names(pending, username, PENDING)
        return pending["password"]

    def _current(self, request: RotationRequest, username: str) -> dict[str, str]:
        """The current version, checked to name ``username``, the secret's own user."""
        current = self._value(request.secret_id, stage=CURRENT)
        _check_names(current, username, CURRENT)
        return current

    def _check_broker_holds(self, username: str, password: str, what: str) -> None:
        if not password_matches(self._user(username), password):
            raise RotationError(
                f"the broker's user {username} does not hold the {what} password "
                "(changed since setSecret, or a hash this check cannot read)"
            )

    def _user(self, username: str) -> JsonObject:
        user = self._broker.get_user(username)
        if user is None:
            raise RotationError(
                f"the broker has no user {username}: the topology creates it, rotation only "
                "changes its password"
            )
        # A backstop for a USER_SECRET_ARNS that would name an administrator: the topology
        # never tags one of the fabric's users so, and its password is not for this function
        # to set (docs/runbook.md, 'Rotating the broker administrator').
        if ADMINISTRATOR_TAG in user_tags(user.get("tags")):
            raise RotationError(
                f"the broker's user {username} is tagged {ADMINISTRATOR_TAG}: the rotation "
                "function does not rotate an administrator"
            )
        return user

    def _pending_or_none(self, request: RotationRequest) -> dict[str, str] | None:
        from botocore.exceptions import ClientError

        try:
            return self._value(request.secret_id, stage=PENDING, version=request.token)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                return None
            raise

    def _value(self, secret_id: str, *, stage: str, version: str | None = None) -> dict[str, str]:
        version_id = {"VersionId": version} if version else {}
        response = self._secrets.get_secret_value(
            SecretId=secret_id, VersionStage=stage, **version_id
        )
        try:
            value = json.loads(response["SecretString"])
            if isinstance(value.get("username"), str) and isinstance(value.get("password"), str):
                return dict(value)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass
        raise RotationError(f"the {stage} version is not JSON with a username and a password")


def _check_names(value: Mapping[str, str], username: str, stage: str) -> None:
    """Refuse a version of a user's secret that names another user: rotating it would give
    that user a new password, readable from this secret (the message leaves out the name the
    version has, a part of the secret's value)."""
    if value["username"] != username:
        raise RotationError(
            f"the {stage} version of the secret of {username} names another user: refused"
        )


def _user_secrets(environ: Mapping[str, str]) -> dict[str, str]:
    """``USER_SECRET_ARNS`` (``fabric.topology_apply.user_secret_arns``, as the topology
    function reads it).

    Raises:
        ConfigError: the setting is missing or not a JSON object.
    """
    try:
        return user_secret_arns(environ)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"rotation function setting USER_SECRET_ARNS missing or malformed: {exc}"
        ) from None


def on_event(
    event: Any,
    environ: Mapping[str, str],
    *,
    client_factory: Callable[[str, str, str], BrokerUsers] = ManagementClient,
    secrets_client: Callable[[], Any] | None = None,
) -> None:
    """Run one rotation step for the rotation function.

    Raises:
        ConfigError: a setting is missing.
        RotationError: see ``PasswordRotation.run``.
    """
    request = RotationRequest.from_event(event)
    try:
        url, admin_arn = environ["MANAGEMENT_URL"], environ["ADMIN_SECRET_ARN"]
    except KeyError as exc:
        raise ConfigError(f"rotation function setting missing: {exc}") from None
    user_secrets = _user_secrets(environ)
    client = (secrets_client or _secrets_manager)()
    admin_user, admin_password = SecretCredentials(admin_arn, lambda: client)()
    broker = client_factory(url, admin_user, admin_password)
    PasswordRotation(client, broker, admin_secret_arn=admin_arn, user_secrets=user_secrets).run(
        request
    )


def _secrets_manager() -> Any:
    # The topology function's bounded client (connect 5 s, read 10 s, one retry: at most 30 s
    # a call). With botocore's defaults a call to an endpoint that never answers takes 180 s,
    # three times this function's minute: Lambda ended it with "Task timed out" instead of the
    # call's error, whose traceback shows the step and the call that failed.
    from fabric.topology_resource import _secrets_manager as bounded

    return bounded()
