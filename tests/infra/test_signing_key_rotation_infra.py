"""A rotated audit signing key (``audit.signing_keys`` raised): the new key signs, for the audit
writer only; the retired ones stay for the verifiers and can never sign again; the gates stay
clean."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App

from app import build_app
from stacks.config import read_cdk_context
from stacks.nag import unacknowledged_findings
from tests.conftest import ROOT
from tests.infra.resolve import render
from tests.infra.test_functions import fabric_functions

KEYS = 3  # two rotations


class Rotated:
    """dev synthesized after two rotations: its two templates, with the signing keys' ARNs
    rendered as the logical ids of the keys."""

    def __init__(self, outdir: Path) -> None:
        (assembly,) = outdir.glob("assembly-dev")
        self.outdir = outdir
        self.stateful = json.loads(next(assembly.glob("devStateful*.template.json")).read_text())
        self.services = json.loads(next(assembly.glob("devServices*.template.json")).read_text())
        self.keys = [
            logical_id
            for logical_id, resource in self.stateful["Resources"].items()
            if resource["Type"] == "AWS::KMS::Key"
            and resource["Properties"].get("KeyUsage") == "SIGN_VERIFY"
        ]

    def key(self, value: Any) -> str:
        """The logical id of the signing key ``value`` (a stateful-stack GetAtt, or a services
        stack reference to the stateful output that exports it) names."""
        if "Fn::GetStackOutput" in value:
            name = value["Fn::GetStackOutput"]["OutputName"]
            value = self.stateful["Outputs"][name]["Value"]
        (logical_id, attribute) = value["Fn::GetAtt"]
        assert attribute == "Arn"
        return str(logical_id)

    def keys_of(self, joined: Any) -> list[str]:
        """The keys a comma-joined list of ARNs names, in order."""
        (separator, parts) = joined["Fn::Join"]
        assert separator == ""
        assert parts[1::2] == [","] * (len(parts) // 2)
        return [self.key(part) for part in parts[::2]]

    def function(self, description: str) -> dict[str, Any]:
        ((function),) = (
            v
            for v in fabric_functions(self.services).values()
            if description in v["Properties"]["Description"]
        )
        return function

    def statement(self, sid: str, role_prefix: str) -> dict[str, Any]:
        (found,) = (
            statement
            for logical_id, resource in self.services["Resources"].items()
            if resource["Type"] == "AWS::IAM::Policy" and logical_id.startswith(role_prefix)
            for statement in resource["Properties"]["PolicyDocument"]["Statement"]
            if statement.get("Sid") == sid
        )
        return found


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> Rotated:
    context = copy.deepcopy(read_cdk_context(ROOT))
    context["env"] = "dev"
    context["environments"]["dev"]["audit"]["signing_keys"] = KEYS
    outdir = tmp_path_factory.mktemp("rotated")
    app = App(context=context, outdir=str(outdir))
    build_app(app)
    app.synth()
    return Rotated(outdir)


def test_each_signing_key_is_retained_under_its_own_alias_and_the_first_keeps_its_place(
    rotated: Rotated,
) -> None:
    assert len(rotated.keys) == KEYS
    resources = rotated.stateful["Resources"]
    assert all(resources[key]["DeletionPolicy"] == "Retain" for key in rotated.keys)
    aliases = {
        rotated.key(alias["Properties"]["TargetKeyId"]): alias["Properties"]["AliasName"]
        for alias in resources.values()
        if alias["Type"] == "AWS::KMS::Alias"
        and "audit-signing" in alias["Properties"]["AliasName"]
    }
    order = rotated.keys_of(rotated.stateful["Outputs"]["TrustedSigningKeyArns"]["Value"])
    assert [aliases[key] for key in order] == [
        "alias/fabric/dev/audit-signing",  # the key of an environment never rotated
        "alias/fabric/dev/audit-signing-2",
        "alias/fabric/dev/audit-signing-3",
    ]
    # The first key's logical id is the one it had before rotation existed: no replacement.
    assert order[0].startswith("KeysSigning")
    assert not order[0].startswith("KeysSigning2")


def test_only_the_writer_signs_and_a_retired_key_for_nobody_else(rotated: Rotated) -> None:
    # The key retired last still signs for the audit writer until the services stack moves it
    # to the new key (the stateful stack deploys first), and for nobody else; older ones for
    # nobody at all.
    *older, last, current = rotated.keys_of(
        rotated.stateful["Outputs"]["TrustedSigningKeyArns"]["Value"]
    )
    assert len(older) == KEYS - 2
    resources = rotated.stateful["Resources"]
    deny = {
        "Sid": "RetiredNeverSignsAgain",
        "Effect": "Deny",
        "Principal": {"AWS": "*"},
        "Action": "kms:Sign",
        "Resource": "*",
    }

    def denies(key: str) -> list[dict[str, Any]]:
        statements = resources[key]["Properties"]["KeyPolicy"]["Statement"]
        return [s for s in statements if s["Effect"] == "Deny"]

    for key in older:
        assert denies(key) == [deny]
    (last_deny,) = denies(last)
    writer_role = last_deny.pop("Condition")["ArnNotEquals"]["aws:PrincipalArn"]
    assert last_deny == deny
    assert render(writer_role).endswith(":role/fabric-dev-audit-writer")
    # The current key signs for the writer's role only, too (nobody else can sign a forged
    # checkpoint with it, whatever their IAM policy allows).
    (current_deny,) = denies(current)
    assert current_deny == {
        **deny,
        "Sid": "OnlyTheAuditWriterSigns",
        "Condition": {"ArnNotEquals": {"aws:PrincipalArn": writer_role}},
    }
    writer = rotated.function("writes audit batches")
    assert (
        rotated.key(writer["Properties"]["Environment"]["Variables"]["SIGNING_KEY_ARN"]) == current
    )
    assert writer["Properties"]["Role"]["Fn::GetAtt"][0] in {
        k
        for k, r in rotated.services["Resources"].items()
        if r["Properties"].get("RoleName") == "fabric-dev-audit-writer"
    }
    sign = rotated.statement("SignCheckpoints", "AuditWriter")
    assert rotated.key(sign["Resource"]) == current


@pytest.mark.parametrize(
    ("description", "role"),
    [("replays archived messages", "Replay"), ("for compliance", "ComplianceReport")],
)
def test_the_verifiers_trust_every_key_in_order_of_service(
    rotated: Rotated, description: str, role: str
) -> None:
    order = rotated.keys_of(rotated.stateful["Outputs"]["TrustedSigningKeyArns"]["Value"])
    variables = rotated.function(description)["Properties"]["Environment"]["Variables"]
    assert rotated.key(variables["SIGNING_KEY_ARN"]) == order[-1]
    assert rotated.keys_of(variables["RETIRED_SIGNING_KEY_ARNS"]) == order[:-1]
    verify = rotated.statement("VerifyCheckpoints", role)
    assert verify["Action"] == "kms:Verify"
    assert sorted(rotated.key(arn) for arn in verify["Resource"]) == sorted(order)


def test_a_rotated_environment_has_no_unacknowledged_finding(rotated: Rotated) -> None:
    assert unacknowledged_findings(rotated.outdir) == []
