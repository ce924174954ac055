"""cdk.json context becomes typed config; bad values fail with the key named; residency holds."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from stacks.config import ConfigError, DeploymentMode, LockMode, load_app_config, read_cdk_context
from tests.conftest import ROOT


@pytest.fixture
def context() -> dict[str, Any]:
    """A private copy of the repository's own cdk.json context."""
    return copy.deepcopy(read_cdk_context(ROOT))


def test_repository_config_defines_the_three_environments_with_their_defaults(
    context: dict[str, Any],
) -> None:
    envs = {env.name: env for env in load_app_config(context).environments}
    assert list(envs) == ["dev", "staging", "prod"]
    assert envs["dev"].broker.deployment_mode is DeploymentMode.SINGLE_INSTANCE
    assert envs["staging"].broker.deployment_mode is DeploymentMode.SINGLE_INSTANCE
    assert envs["prod"].broker.deployment_mode is DeploymentMode.CLUSTER_MULTI_AZ
    assert envs["prod"].audit.lock_mode is LockMode.COMPLIANCE
    assert envs["prod"].audit.lock_years == 7
    assert envs["dev"].audit.lock_mode is LockMode.GOVERNANCE
    assert envs["prod"].termination_protection is True
    assert all(env.region == "ap-southeast-3" for env in envs.values())


def test_env_context_selects_one_environment(context: dict[str, Any]) -> None:
    context["env"] = "staging"
    assert [env.name for env in load_app_config(context).environments] == ["staging"]


def test_unknown_env_names_the_known_ones(context: dict[str, Any]) -> None:
    context["env"] = "qa"
    with pytest.raises(
        ConfigError, match=r"context\.env: unknown environment 'qa' \(known: dev, staging, prod\)"
    ):
        load_app_config(context)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ("broker", "instance_type"),
            None,
            r"context\.environments\.dev\.broker\.instance_type: Field required",
        ),
        (
            ("broker", "engine_version"),
            "3.12",
            r"broker\.engine_version: .*older than the supported 3\.13",
        ),
        (
            ("broker", "deployment_mode"),
            "ACTIVE_STANDBY",
            r"broker\.deployment_mode: Input should be",
        ),
        (
            ("account",),
            111111111111,
            r"context\.environments\.dev\.account: Input should be a valid string",
        ),
        (("account",), "12345", r"context\.environments\.dev\.account: String should match"),
        (
            ("log_retention_days",),
            42,
            r"log_retention_days: .*CloudWatch Logs does not offer 42 days",
        ),
        (
            ("audit", "lock_years"),
            7,
            r"context\.environments\.dev\.audit: .*exactly one of lock_days or lock_years",
        ),
        (
            ("audit", "signing_keys"),
            0,
            r"context\.environments\.dev\.audit\.signing_keys: Input should be greater than",
        ),
        (
            ("max_azs",),
            "2",
            r"context\.environments\.dev\.max_azs: Input should be a valid integer",
        ),
        (("brokr",), {}, r"context\.environments\.dev\.brokr: Extra inputs are not permitted"),
    ],
)
def test_a_bad_value_fails_with_its_key_named(
    context: dict[str, Any], path: tuple[str, ...], value: Any, message: str
) -> None:
    target = context["environments"]["dev"]
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        load_app_config(context)


def test_a_cluster_broker_needs_three_availability_zones(context: dict[str, Any]) -> None:
    context["environments"]["prod"]["max_azs"] = 2
    with pytest.raises(
        ConfigError,
        match=r"context\.environments\.prod: .*CLUSTER_MULTI_AZ broker needs max_azs = 3",
    ):
        load_app_config(context)


def test_missing_environment_is_named(context: dict[str, Any]) -> None:
    del context["environments"]["prod"]
    with pytest.raises(ConfigError, match=r"context\.environments: missing prod"):
        load_app_config(context)


def test_region_outside_the_allowed_regions_fails_for_data_residency(
    context: dict[str, Any],
) -> None:
    context["environments"]["prod"]["region"] = "us-east-1"
    with pytest.raises(
        ConfigError,
        match=(
            r"data residency: environment 'prod' may only be deployed to ap-southeast-3, "
            r"not us-east-1"
        ),
    ):
        load_app_config(context)


def test_region_override_is_held_to_the_allowed_regions_too(context: dict[str, Any]) -> None:
    context["region"] = "eu-west-1"
    with pytest.raises(ConfigError, match="data residency"):
        load_app_config(context)
    context["environments"]["dev"]["allowed_regions"] = ["ap-southeast-3", "ap-southeast-1"]
    context["env"] = "dev"
    context["region"] = "ap-southeast-1"
    (dev,) = load_app_config(context).environments
    assert dev.region == "ap-southeast-1"


def test_synth_for_a_disallowed_region_exits_with_a_clear_message(context: dict[str, Any]) -> None:
    """The real entry point, as the CDK CLI runs it (`cdk synth -c region=us-east-1`)."""
    context["region"] = "us-east-1"
    env = {**os.environ, "CDK_CONTEXT_JSON": json.dumps(context)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert (
        "configuration error: data residency: environment 'dev' may only be deployed to"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
