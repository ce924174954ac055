"""Typed environment configuration, parsed from cdk.json context and validated at synth."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fabric.stakeholders import STAKEHOLDERS

ENVIRONMENT_NAMES = ("dev", "staging", "prod")
GROUPS = tuple(group.value for group in STAKEHOLDERS)
DEFAULT_REGION = "ap-southeast-3"
# The lowest RabbitMQ engine line the fabric is built for (quorum-queue delivery limits,
# at-least-once dead-lettering).
MIN_ENGINE_VERSION = (3, 13)
# The RabbitMQ versions Amazon MQ offers from 3.13 on, and the fabric runs on. The broker
# dead-letter alarms read the fabric's own queue-depth metrics (stacks/constructs/
# broker_metrics.py), since Amazon MQ publishes no per-queue metrics for RabbitMQ 4. A new
# version is added here once its changes are checked (4.3, for one, no longer counts a
# basic.nack against the delivery limit: docs/dead-letters.md).
ENGINE_VERSIONS = ((3, 13), (4, 2))
# Instance families Amazon MQ offers for RabbitMQ 3.13; mq.t3 in one size, micro.
INSTANCE_FAMILIES = ("t3", "m5", "m7g")
# RabbitMQ 4 runs on mq.m7g only.
INSTANCE_FAMILIES_FROM_4 = ("m7g",)
# The retention periods that CloudWatch Logs accepts.
LOG_RETENTION_DAYS = (
    1,
    3,
    5,
    7,
    14,
    30,
    60,
    90,
    120,
    150,
    180,
    365,
    400,
    545,
    731,
    1096,
    1827,
    2192,
    2557,
    2922,
    3288,
    3653,
)


class ConfigError(ValueError):
    """cdk.json context is missing a value or holds a bad one; the message names the key."""


class DeploymentMode(StrEnum):
    """Amazon MQ for RabbitMQ deployment modes."""

    SINGLE_INSTANCE = "SINGLE_INSTANCE"
    CLUSTER_MULTI_AZ = "CLUSTER_MULTI_AZ"


class LockMode(StrEnum):
    """S3 Object Lock default retention modes."""

    GOVERNANCE = "GOVERNANCE"
    COMPLIANCE = "COMPLIANCE"


class RemovalPolicy(StrEnum):
    """What happens to stateful resources when their stack is deleted."""

    DESTROY = "destroy"
    RETAIN = "retain"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class MaintenanceWindow(_Model):
    """Weekly broker maintenance window (minor version upgrades, patching)."""

    day_of_week: str = Field(
        pattern=r"^(MONDAY|TUESDAY|WEDNESDAY|THURSDAY|FRIDAY|SATURDAY|SUNDAY)$"
    )
    time_of_day: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    time_zone: str = Field(min_length=1)


class BrokerConfig(_Model):
    """Amazon MQ for RabbitMQ settings."""

    engine_version: str = Field(pattern=r"^[0-9]+\.[0-9]+(\.[0-9]+)?$")
    instance_type: str = Field(pattern=r"^mq\.[a-z0-9]+\.[a-z0-9]+$")
    deployment_mode: DeploymentMode = Field(strict=False)
    maintenance_window: MaintenanceWindow

    @field_validator("engine_version")
    @classmethod
    def _supported_engine(cls, value: str) -> str:
        major, minor, *patch = (int(part) for part in value.split("."))
        if (major, minor) < MIN_ENGINE_VERSION:
            lowest = ".".join(map(str, MIN_ENGINE_VERSION))
            raise ValueError(f"RabbitMQ {value} is older than the supported {lowest}")
        if patch:
            # From 3.13 on, Amazon MQ names engine versions major.minor and applies the patch
            # versions itself, in the maintenance window (auto minor version upgrade).
            raise ValueError(
                f"Amazon MQ takes RabbitMQ {major}.{minor} without a patch version and applies "
                f"patches itself: use {major}.{minor}, not {value}"
            )
        if (major, minor) not in ENGINE_VERSIONS:
            offered = " or ".join(f"{a}.{b}" for a, b in ENGINE_VERSIONS)
            raise ValueError(f"Amazon MQ runs the fabric on RabbitMQ {offered}, not {value}")
        return value

    @field_validator("instance_type")
    @classmethod
    def _rabbitmq_instance(cls, value: str) -> str:
        family, size = value.split(".")[1:]
        if family not in INSTANCE_FAMILIES or (family == "t3" and size != "micro"):
            raise ValueError(
                f"Amazon MQ does not run RabbitMQ on {value}; use mq.t3.micro, mq.m5.* or mq.m7g.*"
            )
        return value

    @model_validator(mode="after")
    def _cluster_instance_size(self) -> BrokerConfig:
        if self.deployment_mode is DeploymentMode.CLUSTER_MULTI_AZ and "t3" in self.instance_type:
            raise ValueError("CLUSTER_MULTI_AZ brokers cannot use burstable mq.t3 instances")
        return self

    @model_validator(mode="after")
    def _instance_for_engine(self) -> BrokerConfig:
        family = self.instance_type.split(".")[1]
        if self.engine_major >= 4 and family not in INSTANCE_FAMILIES_FROM_4:
            raise ValueError(
                f"Amazon MQ runs RabbitMQ {self.engine_version} on mq.m7g.* only, not on "
                f"{self.instance_type}"
            )
        return self

    @property
    def engine_major(self) -> int:
        """The engine's major version (3 or 4)."""
        return int(self.engine_version.split(".")[0])


class AuditConfig(_Model):
    """Object Lock default retention of the audit bucket: exactly one of days or years; and how
    many checkpoint-signing keys the environment has put in service (raising it by one rotates
    the key: the new one signs, the older ones stay, retired, for verifying)."""

    lock_mode: LockMode = Field(strict=False)
    lock_days: int | None = Field(default=None, ge=1, le=36500)
    lock_years: int | None = Field(default=None, ge=1, le=100)
    signing_keys: int = Field(default=1, ge=1, le=20)

    @model_validator(mode="after")
    def _one_period(self) -> AuditConfig:
        if (self.lock_days is None) == (self.lock_years is None):
            raise ValueError("set exactly one of lock_days or lock_years")
        return self

    @property
    def retention_days(self) -> int:
        """The retention period in days (a year counted as 365 days), for comparisons."""
        return self.lock_days if self.lock_days is not None else 365 * (self.lock_years or 0)


class ApiConfig(_Model):
    """The HTTPS entry point: who issues the producers' JWTs and which claim names their group."""

    jwt_issuer: str = Field(pattern=r"^https://[^\s]+$")
    jwt_audience: tuple[str, ...] = Field(min_length=1)
    identity_claim: str = Field(min_length=1)
    throttle_rate: int = Field(ge=1)
    throttle_burst: int = Field(ge=1)


class RouterConfig(_Model):
    """Capacity of the router function.

    The reserved concurrency is shared by HTTPS, direct invokes and the SQS ingest queues' event
    source mappings, one per group. Each mapping may run at most ``ingest_max_concurrency``
    invocations (2 is the lowest Lambda accepts), and all of them together at most half of the
    reserved concurrency: an ingest backlog must not take the capacity that HTTPS and direct
    producers (their emergencies too) need. Without a maximum, a mapping's pollers also receive
    more batches than the function may run, and each throttled batch costs its messages a
    receive towards the queue's DLQ.
    """

    reserved_concurrency: int = Field(ge=1)
    ingest_max_concurrency: int = Field(ge=2, le=1000)
    memory_mb: int = Field(ge=128, le=10240)

    @model_validator(mode="after")
    def _room_for_https_and_direct(self) -> RouterConfig:
        ingest = self.ingest_concurrency
        if 2 * ingest > self.reserved_concurrency:
            raise ValueError(
                f"the {len(GROUPS)} SQS ingest queues may take {len(GROUPS)} x "
                f"ingest_max_concurrency {self.ingest_max_concurrency} = {ingest} of the "
                f"router's reserved_concurrency {self.reserved_concurrency}, more than half: "
                f"raise reserved_concurrency to at least {2 * ingest} or lower "
                "ingest_max_concurrency, so that HTTPS and direct invokes keep at least half"
            )
        return self

    @property
    def ingest_concurrency(self) -> int:
        """The most router invocations the ingest queues' mappings run at once, all together."""
        return len(GROUPS) * self.ingest_max_concurrency


class AlarmsConfig(_Model):
    """Alarm thresholds. The drain runs every minute, so an old fallback message means the broker
    has been unavailable that long, or the drain is failing."""

    fallback_queue_age_seconds: int = Field(ge=60, le=86400)


class EnvironmentConfig(_Model):
    """Everything that differs between dev, staging and prod."""

    name: str
    account: str = Field(pattern=r"^[0-9]{12}$")
    region: str = Field(pattern=r"^[a-z]{2}(-gov)?-[a-z]+-[0-9]$")
    allowed_regions: tuple[str, ...] = Field(min_length=1)
    max_azs: int = Field(ge=1, le=3)
    broker: BrokerConfig
    audit: AuditConfig
    removal_policy: RemovalPolicy = Field(strict=False)
    log_retention_days: int = Field(ge=1)
    termination_protection: bool
    api: ApiConfig
    router: RouterConfig
    alarms: AlarmsConfig
    # IAM role ARNs allowed to invoke the router directly, per stakeholder group (its alias).
    producers: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("producers")
    @classmethod
    def _known_groups(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        unknown = sorted(set(value) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown stakeholder group(s): {', '.join(unknown)}")
        for group, arns in value.items():
            bad = [
                arn for arn in arns if not re.match(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/", arn)
            ]
            if bad:
                raise ValueError(f"{group}: not IAM role ARNs: {', '.join(bad)}")
        return value

    @field_validator("log_retention_days")
    @classmethod
    def _valid_retention(cls, value: int) -> int:
        if value not in LOG_RETENTION_DAYS:
            raise ValueError(
                f"CloudWatch Logs does not offer {value} days; use one of {LOG_RETENTION_DAYS}"
            )
        return value

    @model_validator(mode="after")
    def _cluster_needs_azs(self) -> EnvironmentConfig:
        if self.broker.deployment_mode is DeploymentMode.CLUSTER_MULTI_AZ and self.max_azs < 3:
            raise ValueError("a CLUSTER_MULTI_AZ broker needs max_azs = 3")
        return self

    @property
    def stage_name(self) -> str:
        """The CDK Stage id, also the prefix of every stack name."""
        return self.name


@dataclass(frozen=True)
class AppConfig:
    """The environments that this synth builds, in cdk.json order."""

    environments: tuple[EnvironmentConfig, ...]


_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/")
_ENV_NAME = re.compile(r"^[a-z][a-z0-9-]{0,15}$")


def _describe(error: ValidationError, prefix: str) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in (prefix, *item["loc"]))
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)


def parse_environment(
    name: str, raw: Any, *, region_override: str | None = None
) -> EnvironmentConfig:
    """Validate one environment's context block.

    Raises:
        ConfigError: a key is missing or invalid (the message names it), or the region is not
            one of the environment's allowed regions (data residency).
    """
    prefix = f"context.environments.{name}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected an object, got {type(raw).__name__}")
    data = dict(raw)
    data["name"] = name
    if region_override is not None:
        data["region"] = region_override
    # JSON has no tuples; accept lists where the model keeps tuples.
    if isinstance(data.get("allowed_regions"), list):
        data["allowed_regions"] = tuple(data["allowed_regions"])
    api = data.get("api")
    if isinstance(api, Mapping) and isinstance(api.get("jwt_audience"), list):
        data["api"] = {**api, "jwt_audience": tuple(api["jwt_audience"])}
    producers = data.get("producers")
    if isinstance(producers, Mapping):
        data["producers"] = {
            group: tuple(arns) if isinstance(arns, list) else arns
            for group, arns in producers.items()
        }
    try:
        env = EnvironmentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, prefix)) from None
    if env.region not in env.allowed_regions:
        allowed = ", ".join(env.allowed_regions)
        raise ConfigError(
            f"data residency: environment '{name}' may only be deployed to {allowed}, "
            f"not {env.region} ({prefix}.allowed_regions)"
        )
    return env


def load_app_config(context: Mapping[str, Any]) -> AppConfig:
    """Build the typed configuration from CDK context.

    Context keys: ``environments`` (required), ``env`` (optional: synthesize only this
    environment), ``region`` (optional: override the region of the selected environments; it
    must still be an allowed region).

    Raises:
        ConfigError: the context is missing a value or holds a bad one.
    """
    environments = context.get("environments")
    if not isinstance(environments, Mapping) or not environments:
        raise ConfigError("context.environments: missing; cdk.json must define dev, staging, prod")
    missing = [name for name in ENVIRONMENT_NAMES if name not in environments]
    if missing:
        raise ConfigError(f"context.environments: missing {', '.join(missing)}")
    for name in environments:
        if not _ENV_NAME.match(str(name)):
            raise ConfigError(f"context.environments.{name}: environment names are [a-z0-9-]")

    selected = context.get("env")
    if selected is not None and selected not in environments:
        known = ", ".join(environments)
        raise ConfigError(f"context.env: unknown environment '{selected}' (known: {known})")
    region = context.get("region")
    if region is not None and not isinstance(region, str):
        raise ConfigError("context.region: expected a region name")

    names = [selected] if selected else list(environments)
    return AppConfig(
        environments=tuple(
            parse_environment(name, environments[name], region_override=region) for name in names
        )
    )


def read_cdk_context(root: Path) -> dict[str, Any]:
    """The context the CDK CLI would pass: cdk.json's ``context`` plus cdk.context.json.

    For in-process synths (tests, benchmarks) that do not go through the CLI.

    Raises:
        ConfigError: cdk.json is missing or has no context.
    """
    try:
        context = dict(json.loads((root / "cdk.json").read_text())["context"])
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cdk.json: cannot read its context ({exc})") from None
    cached = root / "cdk.context.json"
    if cached.exists():
        context.update(json.loads(cached.read_text()))
    # What the CLI adds, so that in-process templates equal `cdk synth` output.
    context.setdefault("aws:cdk:enable-path-metadata", True)
    context.setdefault("aws:cdk:enable-asset-metadata", True)
    return context
