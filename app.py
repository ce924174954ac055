#!/usr/bin/env python3
"""CDK entry point: one Stage per environment in cdk.json, with the compliance gates on."""

from __future__ import annotations

import os
import sys

# jsii warns on every start under Node 20; the machine's Node is 20 and the warning is noise.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

from aws_cdk import App

from stacks.config import ConfigError, load_app_config
from stacks.nag import add_compliance_gates, unacknowledged_findings
from stacks.stage import FabricStage


def build_app(app: App) -> list[FabricStage]:
    """Add the configured environments' stages and the compliance gates to ``app``.

    Raises:
        ConfigError: cdk.json context is missing a value, holds a bad one, or puts an
            environment outside its allowed regions.
    """
    config = load_app_config(_context(app))
    stages = [FabricStage(app, config=env) for env in config.environments]
    add_compliance_gates(app)
    return stages


def _context(app: App) -> dict[str, object]:
    keys = ("environments", "env", "region")
    return {key: value for key in keys if (value := app.node.try_get_context(key)) is not None}


def main() -> None:
    """Synthesize; a configuration error ends the process with its message and no traceback."""
    app = App()
    try:
        build_app(app)
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        raise SystemExit(2) from None
    assembly = app.synth()
    findings = unacknowledged_findings(assembly.directory)
    if findings:
        sys.stderr.write("compliance gate: unacknowledged findings:\n")
        sys.stderr.writelines(f"  {finding}\n" for finding in findings)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
