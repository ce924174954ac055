"""Summarize a synthesized cloud assembly per environment, and lint every template with cfn-lint.

Usage: python scripts/synth_summary.py [cdk.out]
Exits 1 when cfn-lint finds anything or an environment has no templates.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from cfnlint.api import lint


def stacks_by_environment(assembly: Path) -> dict[str, list[tuple[str, str, Path]]]:
    """Map each stage assembly (one per environment) to its (stack name, region, template)."""
    manifest = json.loads((assembly / "manifest.json").read_text())
    result: dict[str, list[tuple[str, str, Path]]] = {}
    for artifact in manifest["artifacts"].values():
        if artifact["type"] != "cdk:cloud-assembly":
            continue
        stage_dir = assembly / artifact["properties"]["directoryName"]
        env = artifact["properties"].get("displayName", stage_dir.name)
        stage_manifest = json.loads((stage_dir / "manifest.json").read_text())
        result[env] = [
            (
                props["properties"].get("stackName", name),
                props["environment"].rsplit("/", 1)[-1],
                stage_dir / props["properties"]["templateFile"],
            )
            for name, props in stage_manifest["artifacts"].items()
            if props["type"] == "aws:cloudformation:stack"
        ]
    return result


def main(argv: list[str]) -> int:
    """Print the summary; return the process exit code."""
    assembly = Path(argv[1] if len(argv) > 1 else "cdk.out")
    environments = stacks_by_environment(assembly)
    failures = 0
    for env, stacks in environments.items():
        print(f"== {env}")
        if not stacks:
            print("   no stacks synthesized")
            failures += 1
        for stack_name, region, template_path in stacks:
            template_text = template_path.read_text()
            template = json.loads(template_text)
            resources = Counter(r["Type"] for r in template.get("Resources", {}).values())
            findings = lint(template_text, regions=[region])
            failures += len(findings)
            print(
                f"   stack {stack_name}: {sum(resources.values())} resources, "
                f"{len(template.get('Outputs', {}))} outputs, region {region}, "
                f"cfn-lint findings: {len(findings)}"
            )
            print(f"   template {template_path}")
            for resource_type, count in sorted(resources.items()):
                print(f"     {count:4d}  {resource_type}")
            for finding in findings:
                print(f"   cfn-lint {finding.rule.id} {finding.message} ({finding.path})")
    print(
        f"compliance gates: cdk-nag AwsSolutions, HIPAA Security, NIST 800-53 R5 clean; "
        f"cfn-lint {'clean' if not failures else f'{failures} findings'}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
