"""docker/Dockerfile.serve, checked offline (no registry is reachable here to build it): its pins are
pyproject.toml's, the serving code it installs without the training stack imports none of it, and its command
is one the CLI accepts."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")   # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile.serve"
LEFT_OUT = ("torch", "pandas", "onnx", "onnxscript", "implicit")


def _pip_specs() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("RUN python -m pip install \""))
    first = line.split("&&")[0].removeprefix("RUN python -m pip install")
    return shlex.split(first)


def test_the_images_pins_are_pyprojects():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    specs = _pip_specs()
    assert specs and all(spec in deps for spec in specs), sorted(set(specs) - set(deps))
    names = {re.split(r"[\[<>=]", d)[0] for d in deps}
    installed = {re.split(r"[\[<>=]", s)[0] for s in specs}
    assert names - installed == set(LEFT_OUT), "every dependency is either installed or knowingly left out"


def test_serving_imports_none_of_the_packages_the_image_leaves_out():
    code = ("import sys, recserve.cli, recserve.server, recserve.supervisor, recserve.serving.frontdoor, "
            "recserve.serving.steps.fused, recserve.serving.steps.retrieval, recserve.serving.steps.onnx_model, "
            "recserve.serving.steps.catalogue; "
            f"print([m for m in {LEFT_OUT!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_images_command_is_one_the_cli_accepts():
    text = DOCKERFILE.read_text()
    entry = eval(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))   # noqa: S307 - a JSON list
    cmd = eval(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))           # noqa: S307
    assert entry == ["recserve"] and cmd[0] == "serve"
    from typer.testing import CliRunner

    from recserve.cli import app

    help_text = CliRunner().invoke(app, ["serve", "--help"]).output
    for flag in cmd[1:]:
        assert flag.split("=")[0] in help_text, flag
    assert re.search(r"^USER 10001$", text, re.M), "the uid the Deployment runs as (runAsUser 10001)"
