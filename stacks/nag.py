"""The compliance gates: cdk-nag rule packs run as CDK validation plugins on every synth."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aws_cdk import Acknowledgment, App, Aspects, CfnResource, Stack, Stage, Validations
from cdk_nag import (
    AwsSolutionsChecks,
    HIPAASecurityChecks,
    NIST80053R5Checks,
    WriteNagSuppressionsToCloudFormationAspect,
)
from constructs import IConstruct


def add_compliance_gates(app: App) -> None:
    """Run AwsSolutions, HIPAA Security and NIST 800-53 R5 on every stack of ``app``.

    A finding that is not acknowledged (``Validations.of(construct).acknowledge``, next to the
    resource, with its reason) fails the synth; acknowledgments are also written into the
    templates' metadata (``cdk_nag.rules_to_suppress``) so that an auditor reads them next to
    the resource.
    """
    Validations.of(app).add_plugins(
        AwsSolutionsChecks(app, verbose=True),
        HIPAASecurityChecks(app, verbose=True),
        NIST80053R5Checks(app, verbose=True),
    )
    # Aspects do not cross Stage boundaries, so the metadata writer goes on every stage (and on
    # the app, for stacks that live directly in it).
    for scope in (app, *(child for child in app.node.children if isinstance(child, Stage))):
        Aspects.of(scope).add(WriteNagSuppressionsToCloudFormationAspect())


def acknowledge(scope: IConstruct, rule_id: str, reason: str) -> None:
    """Acknowledge one cdk-nag finding on one construct, with the reason it does not apply.

    Raises:
        ValueError: the reason is too short to tell a reviewer anything.
    """
    if len(reason.split()) < 8:
        raise ValueError(f"acknowledgment of {rule_id} needs a real reason, got {reason!r}")
    Validations.of(scope).acknowledge(Acknowledgment(id=rule_id, reason=reason))


def wildcard_resource_finding(scope: IConstruct, resource: str) -> str:
    """The ``AwsSolutions-IAM5`` finding id cdk-nag reports for ``resource``, a wildcard ARN.

    cdk-nag names a wildcard resource by flattening its CloudFormation value (its
    ``flattenCfnReference``: joins joined, ``Ref`` and ``GetAtt`` as ``<...>``, other intrinsics
    as compact JSON); this renders ``resource`` the same way, in ``scope``'s stack. Only for
    values whose cross-stack parts are explicit intrinsics (``Fn.get_stack_output``): CDK's own
    cross-stack references are rewritten only after construction, when acknowledging is over.
    """
    return f"AwsSolutions-IAM5[Resource::{_flatten(Stack.of(scope).resolve(resource))}]"


def _flatten(node: Any) -> str:
    if isinstance(node, str):
        return node.replace("${", "<").replace("}", ">")
    if isinstance(node, dict) and len(node) == 1:
        ((function, argument),) = node.items()
        flatten = _FLATTEN.get(function)
        if flatten is not None:
            return flatten(argument)
    return json.dumps(node, separators=(",", ":"))


_FLATTEN: dict[str, Callable[[Any], str]] = {
    "Fn::Join": lambda argument: str(argument[0]).join(_flatten(item) for item in argument[1]),
    "Fn::Sub": _flatten,
    "Fn::ImportValue": _flatten,
    "Fn::GetAtt": lambda argument: f"<{_flatten(argument[0])}.{_flatten(argument[1])}>",
    "Ref": lambda argument: f"<{_flatten(argument)}>",
}


def unacknowledged_findings(assembly_dir: str | Path) -> list[str]:
    """Read the synthesized validation report and list every finding nobody acknowledged.

    CDK fails an in-memory synth (pytest) on these by itself, but under the CDK CLI it only sets
    the exit code of its embedded Node process, which Python never sees; ``app.py`` checks here.
    """
    report_path = Path(assembly_dir) / "validation-report.json"
    if not report_path.exists():
        return []
    report = json.loads(report_path.read_text())
    findings = []
    for plugin in report.get("pluginReports", []):
        for violation in plugin.get("violations", []):
            if violation.get("severity", "error") not in ("error", "fatal"):
                continue
            for construct in violation.get("violatingConstructs", []):
                findings.append(f"{violation['ruleName']} at {construct['constructPath']}")
    return findings


def ignore_cfn_lint(resource: IConstruct, rule_id: str) -> None:
    """Tell cfn-lint to skip one rule on one resource (its ``Metadata.cfn-lint``).

    Only for resources that CDK itself generates, where the template cannot be changed from here;
    the caller says why in a comment.
    """
    if not isinstance(resource, CfnResource):
        raise TypeError(f"{resource.node.path} is not a CloudFormation resource")
    existing = resource.get_metadata("cfn-lint") or {"config": {"ignore_checks": []}}
    existing["config"]["ignore_checks"].append(rule_id)
    resource.add_metadata("cfn-lint", existing)
