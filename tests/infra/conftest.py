"""One in-process synth of every environment per test session, shared by the infra tests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
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


# A cfn-lint worker: for each line [template path, region] it reads, one line with the findings
# of cfnlint.api.lint, as "<rule id> <message>".
_LINT_WORKER = """
import json
import sys
from pathlib import Path

from cfnlint.api import lint

for line in sys.stdin:
    path, region = json.loads(line)
    found = lint(Path(path).read_text(), regions=[region])
    print(json.dumps([f"{match.rule.id} {match.message}" for match in found]), flush=True)
"""


class CfnLint:
    """cfn-lint's findings (``"<rule id> <message>"``) for templates, each template linted once
    a session for a region, whichever tests ask for it.

    cfn-lint takes seconds a template, in Python, and the test run leaves the machine's second
    core idle: two worker processes, kept for the session (the first template a process lints
    costs seconds more), share out the templates of one call and lint them at once."""

    WORKERS = 2

    def __init__(self) -> None:
        self._found: dict[tuple[str, str], list[str]] = {}
        self._workers: list[subprocess.Popen[str]] = []

    def __call__(self, templates: Sequence[tuple[Path, str]]) -> list[list[str]]:
        """The findings of each ``(template path, region)``, in order."""
        keys = [(path.read_text(), region) for path, region in templates]
        todo = {key: path for key, (path, _) in zip(keys, templates, strict=True)}
        for key in self._found:
            todo.pop(key, None)
        jobs = list(todo.items())
        shares = [jobs[n :: self.WORKERS] for n in range(min(len(jobs), self.WORKERS))]
        while len(self._workers) < len(shares):
            self._workers.append(
                subprocess.Popen(
                    [sys.executable, "-c", _LINT_WORKER],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        try:
            for worker, share in zip(self._workers, shares, strict=False):
                assert worker.stdin is not None
                for (_, region), path in share:
                    worker.stdin.write(json.dumps([str(path), region]) + "\n")
                worker.stdin.flush()
            for worker, share in zip(self._workers, shares, strict=False):
                assert worker.stdout is not None
                for key, path in share:
                    line = worker.stdout.readline()
                    assert line, f"the cfn-lint worker ended linting {path}: see its stderr"
                    self._found[key] = json.loads(line)
        except BaseException:
            # Answers still on their way would be taken for the next call's: new workers then.
            self.close()
            raise
        return [self._found[key] for key in keys]

    def close(self) -> None:
        """End the workers (idle, or answering a call that failed)."""
        for worker in self._workers:
            worker.kill()
            worker.wait()
        self._workers.clear()


@pytest.fixture(scope="session")
def cfn_lint() -> Iterator[CfnLint]:
    """cfn-lint, each template once a session."""
    linter = CfnLint()
    yield linter
    linter.close()


@pytest.fixture(scope="session")
def assembly_lint(assembly: Assembly, cfn_lint: CfnLint) -> dict[tuple[str, str], list[str]]:
    """cfn-lint's findings for each environment's ``stateful`` and ``services`` templates, for
    the environment's region, by ``(environment, stack)``: all six linted at once."""
    templates = {
        (name, stack): (
            assembly.outdir / env.stage.artifact_id / getattr(env.stage, stack).template_file,
            env.region,
        )
        for name, env in assembly.envs.items()
        for stack in ("stateful", "services")
    }
    return dict(zip(templates, cfn_lint(list(templates.values())), strict=True))
