"""Typed runtime settings of the fabric's functions, read once from environment variables."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fabric.errors import ConfigError
from fabric.naming import drained_queue_names
from fabric.topology import TRUSTED_AUDIT_PUBLISHERS


@dataclass(frozen=True)
class RouterSettings:
    """What the router function needs; the CDK stack sets exactly these variables.

    ``FABRIC_ENV``: environment name, part of every encryption context.
    ``RABBITMQ_HOST`` / ``RABBITMQ_PORT`` / ``RABBITMQ_TLS`` (default ``true``) /
    ``RABBITMQ_VHOST`` (default ``/``): the broker.
    ``RABBITMQ_SECRET_ARN``: Secrets Manager secret holding the router's ``username`` and
    ``password`` (never the credentials themselves in the environment).
    ``MESSAGES_KEY_ARN``: the KMS key for restricted payloads.
    ``FABRIC_IDENTITY_CLAIM`` (default ``fabric:group``): the JWT claim that names the caller's
    stakeholder group.
    ``FABRIC_INGEST_QUEUE_PREFIX``: SQS ingest queues are ``<prefix><group>``.
    ``FALLBACK_TOPIC_ARN`` / ``EMERGENCY_TOPIC_ARN``: the SNS topics of the fallback path.
    ``AUDIT_QUEUE_URL`` (optional; every deployed function has it): the SQS queue that takes
    audit batches while RabbitMQ cannot (the router, drain, redrive and replay all read it).
    Without it (local tools and tests build routers without one), RabbitMQ is the audit
    batches' only path: a batch it cannot take is lost, logged and counted
    (``AuditRecordsLost``). Optional rather than required so that those tools need no queue.
    """

    environment: str
    rabbitmq_host: str
    rabbitmq_port: int
    rabbitmq_tls: bool
    rabbitmq_vhost: str
    rabbitmq_secret_arn: str
    messages_key_arn: str
    identity_claim: str
    ingest_queue_prefix: str
    fallback_topic_arn: str
    emergency_topic_arn: str
    audit_queue_url: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RouterSettings:
        """Read and check the variables.

        Raises:
            ConfigError: a variable is missing or malformed; the message names it.
        """
        return cls(
            **_broker(environ),
            messages_key_arn=_required(environ, "MESSAGES_KEY_ARN"),
            identity_claim=environ.get("FABRIC_IDENTITY_CLAIM", "fabric:group") or "fabric:group",
            ingest_queue_prefix=_required(environ, "FABRIC_INGEST_QUEUE_PREFIX"),
            fallback_topic_arn=_required(environ, "FALLBACK_TOPIC_ARN"),
            emergency_topic_arn=_required(environ, "EMERGENCY_TOPIC_ARN"),
            audit_queue_url=_optional(environ, "AUDIT_QUEUE_URL"),
        )


def _required(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"environment variable {name} is required")
    return value


def _broker(environ: Mapping[str, str]) -> dict[str, Any]:
    """``FABRIC_ENV`` and the ``RABBITMQ_*`` variables, which every broker client reads."""
    return {
        "environment": _required(environ, "FABRIC_ENV"),
        "rabbitmq_host": _required(environ, "RABBITMQ_HOST"),
        "rabbitmq_port": _port(environ, "RABBITMQ_PORT"),
        "rabbitmq_tls": _flag(environ, "RABBITMQ_TLS"),
        "rabbitmq_vhost": environ.get("RABBITMQ_VHOST", "/") or "/",
        "rabbitmq_secret_arn": _required(environ, "RABBITMQ_SECRET_ARN"),
    }


def _optional(environ: Mapping[str, str], name: str) -> str | None:
    return environ.get(name, "").strip() or None


def _port(environ: Mapping[str, str], name: str) -> int:
    raw = _required(environ, name)
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) < 65536:
        raise ConfigError(f"environment variable {name} must be a TCP port, got {raw!r}")
    return int(raw)


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "true").strip().lower()
    if raw not in {"true", "false"}:
        raise ConfigError(f"environment variable {name} must be true or false, got {raw!r}")
    return raw == "true"


# An SQS queue URL without the queue name: https://sqs.<region>.<suffix>/<account>/.
_SQS_URL_PREFIX = re.compile(r"https://sqs\.[a-z0-9-]+\.[a-z0-9.]+/[0-9]{12}/")


@dataclass(frozen=True)
class DrainSettings:
    """What the drain function needs (set by the stack).

    ``RABBITMQ_*``, ``FABRIC_ENV`` as for the router; ``SQS_URL_PREFIX``
    (``https://sqs.<region>.<suffix>/<account>/``): the queues it drains are those
    ``fabric.naming.drained_queue_names`` gives for ``FABRIC_ENV`` (every fallback queue and its
    subscription's DLQ, named as the stack names them), at that prefix (a list of the twenty
    URLs with group and flow took 3.5 KB of Lambda's 4 KB of environment).
    ``DRAIN_MAX_MESSAGES`` (default 10000) and ``DRAIN_MAX_SECONDS`` (default 240) bound one run.
    """

    environment: str
    rabbitmq_host: str
    rabbitmq_port: int
    rabbitmq_tls: bool
    rabbitmq_vhost: str
    rabbitmq_secret_arn: str
    queues: tuple[tuple[str, str, bool], ...]
    max_messages: int
    max_seconds: float
    audit_queue_url: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DrainSettings:
        """Read and check the variables.

        Raises:
            ConfigError: a variable is missing or malformed; the message names it.
        """
        broker = _broker(environ)
        url_prefix = _required(environ, "SQS_URL_PREFIX")
        # Without the account, or without the closing slash, every URL would name a queue that
        # does not exist, and each run would fail on the first receive.
        if not _SQS_URL_PREFIX.fullmatch(url_prefix):
            raise ConfigError(
                "environment variable SQS_URL_PREFIX must be https://sqs.<region>.<suffix>/"
                f"<account>/, got {url_prefix!r}"
            )
        return cls(
            **broker,
            queues=tuple(
                (f"{url_prefix}{name}", group.value, emergency)
                for name, group, emergency in drained_queue_names(broker["environment"])
            ),
            max_messages=_positive(environ, "DRAIN_MAX_MESSAGES", 10_000),
            max_seconds=float(_positive(environ, "DRAIN_MAX_SECONDS", 240)),
            audit_queue_url=_optional(environ, "AUDIT_QUEUE_URL"),
        )


@dataclass(frozen=True)
class SqsDeadLetterQueue:
    """An SQS dead-letter queue the redrive may move messages out of, and its source queue."""

    name: str
    dlq_url: str
    dlq_arn: str
    source_url: str
    source_arn: str


@dataclass(frozen=True)
class RedriveSettings:
    """What the redrive function needs (set by the stack).

    ``RABBITMQ_*``, ``FABRIC_ENV`` as for the router (its own user, ``fabric-redrive``: it reads
    every DLQ and ``fabric.overflow``, and publishes to the redeliver, overflow return and audit
    exchanges);
    ``IDEMPOTENCY_TABLE``: the DynamoDB table that holds the redrive ledger;
    ``SQS_REDRIVE_SOURCES``: JSON list of the SQS queues whose dead-letter
    queue (``<name>-dlq``) may be redriven; ``SQS_URL_PREFIX`` (``https://sqs.<region>.<suffix>/
    <account>/``) and ``SQS_ARN_PREFIX`` (``arn:<partition>:sqs:<region>:<account>:``) turn the
    names into URLs and ARNs (the list stays far inside Lambda's 4 KB of environment);
    ``REDRIVE_MAX_SECONDS`` (default 840) bounds one run, inside the function's 15-minute timeout.
    """

    environment: str
    rabbitmq_host: str
    rabbitmq_port: int
    rabbitmq_tls: bool
    rabbitmq_vhost: str
    rabbitmq_secret_arn: str
    idempotency_table: str
    sqs_dead_letter_queues: tuple[SqsDeadLetterQueue, ...]
    max_seconds: float
    audit_queue_url: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RedriveSettings:
        """Read and check the variables.

        Raises:
            ConfigError: a variable is missing or malformed; the message names it.
        """
        url_prefix = _required(environ, "SQS_URL_PREFIX")
        arn_prefix = _required(environ, "SQS_ARN_PREFIX")
        try:
            names = json.loads(_required(environ, "SQS_REDRIVE_SOURCES"))
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise TypeError
        except (ValueError, TypeError):
            raise ConfigError("SQS_REDRIVE_SOURCES must be a JSON list of queue names") from None
        queues = tuple(
            SqsDeadLetterQueue(
                name=name,
                dlq_url=f"{url_prefix}{name}-dlq",
                dlq_arn=f"{arn_prefix}{name}-dlq",
                source_url=f"{url_prefix}{name}",
                source_arn=f"{arn_prefix}{name}",
            )
            for name in names
        )
        return cls(
            **_broker(environ),
            idempotency_table=_required(environ, "IDEMPOTENCY_TABLE"),
            sqs_dead_letter_queues=queues,
            max_seconds=float(_positive(environ, "REDRIVE_MAX_SECONDS", 840)),
            audit_queue_url=_optional(environ, "AUDIT_QUEUE_URL"),
        )


def _positive(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, str(default)).strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"environment variable {name} must be a positive integer, got {raw!r}")
    return int(raw)


@dataclass(frozen=True)
class AuditWriterSettings:
    """What the audit writer function needs (set by the stack).

    ``FABRIC_ENV``; ``AUDIT_BUCKET``: the Object Lock bucket; ``IDEMPOTENCY_TABLE``: chain
    states and batch marks; ``SIGNING_KEY_ARN``: the asymmetric key that signs checkpoints;
    ``AUDIT_WRITER_NAME``: the chain this function writes; ``AUDIT_TRUSTED_PUBLISHERS``
    (optional, comma-separated, default ``fabric.topology.TRUSTED_AUDIT_PUBLISHERS``: the
    platform and redrive users): the RabbitMQ users whose audit batches may record platform
    events (everyone else: consumer events only).
    """

    environment: str
    bucket: str
    table: str
    signing_key_arn: str
    writer: str
    trusted_publishers: frozenset[str] = frozenset(TRUSTED_AUDIT_PUBLISHERS)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AuditWriterSettings:
        """Read and check the variables.

        Raises:
            ConfigError: a variable is missing; the message names it.
        """
        trusted = frozenset(
            name.strip()
            for name in environ.get(
                "AUDIT_TRUSTED_PUBLISHERS", ",".join(TRUSTED_AUDIT_PUBLISHERS)
            ).split(",")
            if name.strip()
        )
        if not trusted:  # every platform batch would then be refused
            raise ConfigError("environment variable AUDIT_TRUSTED_PUBLISHERS names no user")
        return cls(
            environment=_required(environ, "FABRIC_ENV"),
            bucket=_required(environ, "AUDIT_BUCKET"),
            table=_required(environ, "IDEMPOTENCY_TABLE"),
            signing_key_arn=_required(environ, "SIGNING_KEY_ARN"),
            writer=_required(environ, "AUDIT_WRITER_NAME"),
            trusted_publishers=trusted,
        )


# -- replay ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplaySettings:
    """What the replay function needs (set by the stack).

    ``RABBITMQ_*``, ``FABRIC_ENV`` as for the router (the platform user: it publishes to the
    ingress and unrouted exchanges as the router does, and audit batches to the audit exchange);
    ``AUDIT_BUCKET``: the Object Lock bucket it reads the trail and the archive from;
    ``AUDIT_WRITERS``, ``SIGNING_KEY_ARN`` and ``RETIRED_SIGNING_KEY_ARNS``: the writers whose
    trails it verifies and reads, and the keys their checkpoints are signed with (as for the
    compliance report);
    ``AUDIT_QUEUE_URL``: where its audit batches go while RabbitMQ cannot take them;
    ``REPLAY_MAX_SECONDS`` (default 780) bounds one run, two minutes inside the function's
    15-minute timeout (``fabric.replay.MAX_SECONDS``: the compliance report's margin).
    """

    environment: str
    rabbitmq_host: str
    rabbitmq_port: int
    rabbitmq_tls: bool
    rabbitmq_vhost: str
    rabbitmq_secret_arn: str
    bucket: str
    writers: tuple[str, ...]
    signing_key_arn: str
    max_seconds: float
    audit_queue_url: str | None = None
    retired_signing_key_arns: tuple[str, ...] = ()

    @property
    def signing_key_arns(self) -> tuple[str, ...]:
        """The keys trusted to have signed checkpoints, oldest first (``fabric.audit_chain``)."""
        return (*self.retired_signing_key_arns, self.signing_key_arn)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ReplaySettings:
        """Read and check the variables.

        Raises:
            ConfigError: a variable is missing or malformed; the message names it.
        """
        return cls(
            **_broker(environ),
            bucket=_required(environ, "AUDIT_BUCKET"),
            writers=_writers(environ),
            signing_key_arn=_required(environ, "SIGNING_KEY_ARN"),
            max_seconds=float(_positive(environ, "REPLAY_MAX_SECONDS", 780)),
            audit_queue_url=_optional(environ, "AUDIT_QUEUE_URL"),
            retired_signing_key_arns=_retired_keys(environ),
        )


# -- compliance report -------------------------------------------------------------------------


@dataclass(frozen=True)
class ComplianceReportSettings:
    """What the compliance report function needs (set by the stack).

    ``FABRIC_ENV``; ``AUDIT_BUCKET``: the Object Lock bucket, read only; ``AUDIT_WRITERS``:
    the writers (chains) the report covers, comma-separated; ``SIGNING_KEY_ARN``: the key that
    signs checkpoints now; ``RETIRED_SIGNING_KEY_ARNS`` (optional, comma-separated, oldest
    first): the keys that signed them before a rotation; ``REPORTS_BUCKET`` and
    ``REPORTS_KEY_ARN``: where the report files go, SSE-KMS with that key;
    ``COMPLIANCE_TOPIC_ARN``: the summary's SNS topic.
    """

    environment: str
    audit_bucket: str
    writers: tuple[str, ...]
    signing_key_arn: str
    reports_bucket: str
    reports_key_arn: str
    topic_arn: str
    retired_signing_key_arns: tuple[str, ...] = ()

    @property
    def signing_key_arns(self) -> tuple[str, ...]:
        """The keys trusted to have signed checkpoints, oldest first (``fabric.audit_chain``)."""
        return (*self.retired_signing_key_arns, self.signing_key_arn)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ComplianceReportSettings:
        """Read and check the variables.

        Raises:
            ConfigError: a variable is missing or empty; the message names it.
        """
        return cls(
            environment=_required(environ, "FABRIC_ENV"),
            audit_bucket=_required(environ, "AUDIT_BUCKET"),
            writers=_writers(environ),
            signing_key_arn=_required(environ, "SIGNING_KEY_ARN"),
            reports_bucket=_required(environ, "REPORTS_BUCKET"),
            reports_key_arn=_required(environ, "REPORTS_KEY_ARN"),
            topic_arn=_required(environ, "COMPLIANCE_TOPIC_ARN"),
            retired_signing_key_arns=_retired_keys(environ),
        )


def _writers(environ: Mapping[str, str]) -> tuple[str, ...]:
    """``AUDIT_WRITERS``: the audit writers (one chain each), comma-separated, at least one."""
    writers = tuple(
        name.strip() for name in _required(environ, "AUDIT_WRITERS").split(",") if name.strip()
    )
    if not writers:
        raise ConfigError("environment variable AUDIT_WRITERS must name at least one writer")
    return writers


def _retired_keys(environ: Mapping[str, str]) -> tuple[str, ...]:
    """``RETIRED_SIGNING_KEY_ARNS``: the signing keys a rotation retired, oldest first (none if
    unset); none of them twice, and not the current ``SIGNING_KEY_ARN``."""
    retired = tuple(
        arn.strip() for arn in environ.get("RETIRED_SIGNING_KEY_ARNS", "").split(",") if arn.strip()
    )
    if len(set(retired)) != len(retired) or environ.get("SIGNING_KEY_ARN", "").strip() in retired:
        raise ConfigError(
            "environment variable RETIRED_SIGNING_KEY_ARNS names a key twice, or the current one"
        )
    return retired


# -- broker metrics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerMetricsSettings:
    """What the broker metrics function needs (set by the stack).

    ``FABRIC_ENV``; ``MANAGEMENT_URL``: the broker's management API (console URL);
    ``MONITOR_SECRET_ARN``: the secret of the broker user it reads queue depths as
    (``fabric-monitor``); ``RABBITMQ_VHOST`` (default ``/``); ``BROKER_DEPTH_QUEUES``: JSON list
    of the queues to measure, the ones the dead-letter alarms watch.
    """

    environment: str
    management_url: str
    monitor_secret_arn: str
    vhost: str
    queues: tuple[str, ...]

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> BrokerMetricsSettings:
        """Read and check the variables.

        Raises:
            ConfigError: a variable is missing or malformed; the message names it.
        """
        try:
            queues = json.loads(_required(environ, "BROKER_DEPTH_QUEUES"))
            if not isinstance(queues, list) or not all(isinstance(q, str) and q for q in queues):
                raise TypeError
        except (ValueError, TypeError):
            raise ConfigError("BROKER_DEPTH_QUEUES must be a JSON list of queue names") from None
        if not queues or len(set(queues)) != len(queues):
            raise ConfigError("BROKER_DEPTH_QUEUES must name at least one queue, each once")
        return cls(
            environment=_required(environ, "FABRIC_ENV"),
            management_url=_required(environ, "MANAGEMENT_URL"),
            monitor_secret_arn=_required(environ, "MONITOR_SECRET_ARN"),
            vhost=environ.get("RABBITMQ_VHOST", "/") or "/",
            queues=tuple(queues),
        )
