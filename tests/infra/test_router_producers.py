"""Producers of cdk.json, of this account or another, may invoke their group's router alias,
and the stacks never change the producers' own roles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App

from app import build_app
from stacks.config import read_cdk_context
from stacks.nag import unacknowledged_findings
from tests.conftest import ROOT
from tests.infra.conftest import CfnLint

# dev's account (cdk.json) and another one.
SAME_ACCOUNT = "arn:aws:iam::111111111111:role/government-producer"
OTHER_ACCOUNT = "arn:aws:iam::999999999999:role/media-producer"


@pytest.fixture(scope="module")
def with_producers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """dev, synthesized with the compliance gates on (a finding fails the synth), with a
    producer of its own account for government and one of another account for media."""
    context = read_cdk_context(ROOT)
    context["env"] = "dev"
    context["environments"]["dev"]["producers"] = {
        "government": [SAME_ACCOUNT],
        "media": [OTHER_ACCOUNT],
    }
    outdir = tmp_path_factory.mktemp("producers")
    app = App(context=context, outdir=str(outdir))
    (stage,) = build_app(app)
    app.synth()
    stacks = (stage.stateful, stage.services)
    paths = [Path(outdir) / stage.artifact_id / stack.template_file for stack in stacks]
    return {
        "outdir": outdir,
        "paths": paths,
        "stateful": json.loads(paths[0].read_text()),
        "services": json.loads(paths[1].read_text()),
    }


def _of_type(template: dict[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == resource_type}


def test_the_gates_pass_with_producers_configured(
    with_producers: dict[str, Any], cfn_lint: CfnLint
) -> None:
    assert unacknowledged_findings(with_producers["outdir"]) == []
    paths = with_producers["paths"]
    findings = cfn_lint([(path, "ap-southeast-3") for path in paths])
    assert dict(zip([path.name for path in paths], findings, strict=True)) == {
        path.name: [] for path in paths
    }


def test_each_producer_may_invoke_its_groups_alias_whatever_its_account(
    with_producers: dict[str, Any],
) -> None:
    template = with_producers["services"]
    aliases = {
        v["Properties"]["Name"]: k for k, v in _of_type(template, "AWS::Lambda::Alias").items()
    }
    invokers = {
        (p["Properties"]["FunctionName"]["Ref"], p["Properties"]["Principal"])
        for p in _of_type(template, "AWS::Lambda::Permission").values()
        if p["Properties"]["Principal"] in (SAME_ACCOUNT, OTHER_ACCOUNT)
    }
    assert invokers == {(aliases["government"], SAME_ACCOUNT), (aliases["media"], OTHER_ACCOUNT)}
    for permission in _of_type(template, "AWS::Lambda::Permission").values():
        if permission["Properties"]["Principal"] in (SAME_ACCOUNT, OTHER_ACCOUNT):
            assert permission["Properties"]["Action"] == "lambda:InvokeFunction"


def test_no_policy_is_written_onto_a_producers_role(with_producers: dict[str, Any]) -> None:
    # A producer's role belongs to its team: an IAM policy attached to it here would change it
    # (and be removed again by the next deploy that drops the producer).
    for name in ("stateful", "services"):
        template = with_producers[name]
        for kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            for logical_id, policy in _of_type(template, kind).items():
                roles = json.dumps(policy["Properties"].get("Roles", []))
                assert "producer" not in roles, (name, logical_id, roles)
