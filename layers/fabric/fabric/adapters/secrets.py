"""Credentials from AWS Secrets Manager, fetched on first use and kept until the broker refuses
them, then read again (see ``fabric.adapters.rabbitmq``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fabric.errors import ConfigError, TransportUnavailable


class SecretCredentials:
    """``username``/``password`` from a JSON secret; read lazily so cold starts stay cheap.

    ``client_factory`` builds a boto3 Secrets Manager client when first needed (moto must be
    active before a client exists in tests).

    After the broker refused the pair (``forget``), the next call reads the secret again. If its
    current version still holds the refused password, a rotation is under way: the broker may
    already have the new password while the secret's ``AWSPENDING`` version holds it and
    ``AWSCURRENT`` does not yet (``fabric.rotation``), so the pending pair is used if there is
    one.
    """

    def __init__(self, secret_arn: str, client_factory: Callable[[], Any]) -> None:
        self._secret_arn = secret_arn
        self._client_factory = client_factory
        self._value: tuple[str, str] | None = None
        self._refused: tuple[str, str] | None = None

    def __call__(self) -> tuple[str, str]:
        """The (username, password) pair.

        Raises:
            TransportUnavailable: Secrets Manager cannot be reached (retry later, fail over).
            ConfigError: the secret exists but is not a JSON object with username and password.
        """
        if self._value is None:
            value = _pair(self._get("AWSCURRENT"))
            if value == self._refused:
                pending = self._get("AWSPENDING", missing_ok=True)  # a rotation under way
                value = value if pending is None else _pair(pending)
            self._value = value
        return self._value

    def pending(self) -> tuple[str, str] | None:
        """The pair of the secret's ``AWSPENDING`` version (a rotation under way, or one that
        stopped), or None if it has none.

        Raises:
            TransportUnavailable: Secrets Manager cannot be reached.
            ConfigError: the pending version is not a JSON object with username and password.
        """
        pending = self._get("AWSPENDING", missing_ok=True)
        return None if pending is None else _pair(pending)

    def forget(self) -> None:
        """Drop the pair read so far: the broker refused it (e.g. the password was rotated), so
        the next call reads the secret again."""
        self._refused, self._value = self._value, None

    def _get(self, stage: str, *, missing_ok: bool = False) -> Any:
        """The secret's version labelled ``stage``; None if it has none and ``missing_ok``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client_factory().get_secret_value(
                SecretId=self._secret_arn, VersionStage=stage
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if missing_ok and code == "ResourceNotFoundException":
                return None
            raise TransportUnavailable("cannot read the broker credentials") from exc
        except BotoCoreError as exc:
            raise TransportUnavailable("cannot read the broker credentials") from exc


def _pair(response: Any) -> tuple[str, str]:
    try:
        data = json.loads(response["SecretString"])
        return (str(data["username"]), str(data["password"]))
    except (KeyError, TypeError, ValueError):
        raise ConfigError("the broker secret must be JSON with username and password") from None
