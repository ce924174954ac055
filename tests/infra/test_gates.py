"""The compliance gates: cdk-nag packs clean, acknowledgments specific, cfn-lint clean."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_cdk import App, Stack
from aws_cdk import aws_s3 as s3

from stacks.nag import add_compliance_gates, unacknowledged_findings
from tests.infra.conftest import Assembly, Synthesized

PACKS = {"AwsSolutions", "HIPAA.Security", "NIST.800.53.R5"}


def test_the_app_synthesizes_with_no_unacknowledged_finding(assembly: Assembly) -> None:
    # Packs that pass leave no entry in the report; one that fails would have one.
    for report in assembly.validation_report["pluginReports"]:
        assert report["conclusion"] == "success", (report["pluginName"], report["violations"])
    assert unacknowledged_findings(assembly.outdir) == []


def test_every_acknowledgment_names_one_rule_and_gives_a_reason(env: Synthesized) -> None:
    acknowledged = 0
    for logical_id, resource in env.json["Resources"].items():
        for rule in resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", []):
            acknowledged += 1
            assert rule["id"].split("-", 1)[0] in {*PACKS, "CloudFormation"}, (logical_id, rule)
            assert "*" not in rule["id"].split("[", 1)[0], (logical_id, rule)
            assert len(rule["reason"].split()) >= 8, (logical_id, rule)
    assert acknowledged > 0


def test_an_unacknowledged_finding_fails_the_synth(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = App(outdir=str(tmp_path))
    stack = Stack(app, "Careless")
    s3.Bucket(stack, "PlainBucket")  # no TLS-only policy, no access logs, no KMS
    add_compliance_gates(app)
    with pytest.raises(RuntimeError) as failure:
        app.synth()
    message = str(failure.value)
    # Each of the three packs is on and reports its own finding for the same bucket.
    for finding in (
        "AwsSolutions-S10",
        "HIPAA.Security-S3BucketLoggingEnabled",
        "NIST.800.53.R5-S3BucketLoggingEnabled",
    ):
        assert finding in message


def test_the_cli_gate_lists_unacknowledged_findings_from_the_report(tmp_path) -> None:  # type: ignore[no-untyped-def]
    report = {
        "pluginReports": [
            {
                "pluginName": "AwsSolutions",
                "violations": [
                    {
                        "ruleName": "AwsSolutions-S10",
                        "severity": "error",
                        "violatingConstructs": [{"constructPath": "dev/Stateful/Bucket/Resource"}],
                    }
                ],
            }
        ]
    }
    (tmp_path / "validation-report.json").write_text(json.dumps(report))
    assert unacknowledged_findings(tmp_path) == ["AwsSolutions-S10 at dev/Stateful/Bucket/Resource"]


@pytest.mark.parametrize("stack", ["stateful", "services"])
def test_cfn_lint_finds_nothing_for_the_target_region(
    env: Synthesized, assembly_lint: dict[tuple[str, str], list[str]], stack: str
) -> None:
    # cfn-lint for the environment's region (conftest: each template linted once a session).
    assert assembly_lint[(env.stage.stage_name, stack)] == []


def _statements(resource: dict[str, Any]) -> list[dict[str, Any]]:
    properties = resource["Properties"]
    documents = [properties.get("PolicyDocument")] + [
        policy["PolicyDocument"] for policy in properties.get("Policies", [])
    ]
    return [statement for document in documents if document for statement in document["Statement"]]


def _listed(value: object) -> list[object]:
    return value if isinstance(value, list) else [value]


def test_a_wildcard_resource_is_acknowledged_only_where_a_policy_holds_one(
    env: Synthesized, assembly: Assembly
) -> None:
    """``AwsSolutions-IAM5[Resource::*]`` sits on each policy with a ``"*"`` resource, and on
    nothing else: not on a function, its log group, queue or role, where it would tell an
    auditor that a wildcard there was reviewed, and would hide one added later."""
    stage = env.stage
    templates = [
        json.loads((assembly.outdir / stage.artifact_id / stack.template_file).read_text())
        for stack in (stage.stateful, stage.services)
    ]
    acknowledged, holding = set(), set()
    for template in templates:
        for logical_id, resource in template["Resources"].items():
            rules = resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", [])
            if any(rule["id"] == "AwsSolutions-IAM5[Resource::*]" for rule in rules):
                acknowledged.add(logical_id)
            if resource["Type"].startswith("AWS::IAM::") and any(
                "*" in _listed(statement.get("Resource", [])) for statement in _statements(resource)
            ):
                holding.add(logical_id)
    assert holding
    assert acknowledged == holding
