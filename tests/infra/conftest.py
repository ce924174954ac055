"""One in-process synth of every environment per test session, shared by the infra tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App
from aws_cdk.assertions import Template

from app import build_app
from stacks.config import read_cdk_context
from stacks.stage import FabricStage
from tests.conftest import ROOT


@dataclass(frozen=True)
class Synthesized:
    """One environment's synthesized stateful stack."""

    stage: FabricStage
    template: Template
    template_path: Path
    region: str

    @property
    def json(self) -> dict[str, Any]:
        return self.template.to_json()  # type: ignore[no-any-return]

    def resources(self, resource_type: str) -> dict[str, dict[str, Any]]:
        return self.template.find_resources(resource_type)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Assembly:
    """The whole synthesized app: one entry per environment, and the validation report."""

    outdir: Path
    envs: dict[str, Synthesized]

    @property
    def validation_report(self) -> dict[str, Any]:
        return json.loads((self.outdir / "validation-report.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def assembly(tmp_path_factory: pytest.TempPathFactory) -> Assembly:
    """Synthesize dev, staging and prod once, with the compliance gates on (a finding fails)."""
    outdir = tmp_path_factory.mktemp("cdk.out")
    app = App(context=read_cdk_context(ROOT), outdir=str(outdir))
    stages = build_app(app)
    app.synth()
    envs = {}
    for stage in stages:
        stack = stage.stateful
        template_path = outdir / stage.artifact_id / stack.template_file
        envs[stage.stage_name] = Synthesized(
            stage=stage,
            template=Template.from_json(json.loads(template_path.read_text())),
            template_path=template_path,
            region=stack.region,
        )
    return Assembly(outdir=outdir, envs=envs)


@pytest.fixture(scope="session", params=["dev", "staging", "prod"])
def env(request: pytest.FixtureRequest, assembly: Assembly) -> Synthesized:
    """Each environment in turn."""
    return assembly.envs[request.param]
