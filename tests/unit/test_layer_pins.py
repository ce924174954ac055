"""The dependency layer ships the versions the tests ran against.

layers/requirements.txt (installed into the Lambda layer) is kept by hand; requirements.txt
(the venv the tests run in) by `make lock`. A package pinned differently in the two would be
tested at one version and deployed at another.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)$")


def pins(path: Path) -> dict[str, str]:
    """``{normalized name: version}`` of a requirements file whose every line is ``name==version``
    (or a comment); any other line fails, so nothing is silently left unchecked."""
    found: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{path.relative_to(ROOT)}: not an exact pin: {line!r}"
        # PEP 503: 'typing_extensions' and 'Typing-Extensions' are one package.
        found[re.sub(r"[-_.]+", "-", match["name"]).lower()] = match["version"]
    return found


def test_every_layer_pin_is_the_version_the_tests_run_with() -> None:
    layer = pins(ROOT / "layers" / "requirements.txt")
    venv = pins(ROOT / "requirements.txt")

    assert layer, "layers/requirements.txt pins nothing"
    different = {
        name: f"layer {version}, requirements.txt {venv.get(name, 'missing')}"
        for name, version in layer.items()
        if venv.get(name) != version
    }
    assert different == {}
