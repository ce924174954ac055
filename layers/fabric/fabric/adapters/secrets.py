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
    """

    def __init__(self, secret_arn: str, client_factory: Callable[[], Any]) -> None:
        self._secret_arn = secret_arn
        self._client_factory = client_factory
        self._value: tuple[str, str] | None = None

    def __call__(self) -> tuple[str, str]:
        """The (username, password) pair.

        Raises:
            TransportUnavailable: Secrets Manager cannot be reached (retry later, fail over).
            ConfigError: the secret exists but is not a JSON object with username and password.
        """
        if self._value is None:
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                response = self._client_factory().get_secret_value(SecretId=self._secret_arn)
            except (BotoCoreError, ClientError) as exc:
                raise TransportUnavailable("cannot read the broker credentials") from exc
            try:
                data = json.loads(response["SecretString"])
                self._value = (str(data["username"]), str(data["password"]))
            except (KeyError, TypeError, ValueError):
                raise ConfigError(
                    "the broker secret must be JSON with username and password"
                ) from None
        return self._value

    def forget(self) -> None:
        """Drop the pair read so far: the next call reads the secret again (after the broker
        refused it, e.g. once the password was rotated)."""
        self._value = None
