"""The CI recipes users copy, end to end: ci/check.sh and the run steps of ci/github-workflow.yml, in a
fresh directory holding a model file and a tiny property suite, on a healthy and an exploding model.
Every output is written in both cases; the exit code is the documented one (0 stable, 1 explosion)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CI = Path(__file__).resolve().parent.parent / "ci"

MODEL = """
from torch import nn

SPACE = {{"depth": (1, {max_depth})}}


def build(depth=2, width=16):
    layers = [nn.Linear(width, width, bias=False) for _ in range(depth)]
    for layer in layers:
        nn.init.normal_(layer.weight, std={sigma} / width**0.5)
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())])
"""
"""A tanh MLP at sigma_w: 1.0 is the critical scale (stable at any depth); at 3.0 the mean-field gain
per layer is ~1.5, so the backward signal passes growth 100 within a dozen layers."""
MODELS = {
    "healthy": (MODEL.format(sigma=1.0, max_depth=6), 0),
    "exploding": (MODEL.format(sigma=3.0, max_depth=40), 1),
}

PROPERTY = """
from hypothesis import given, strategies as st


@given(st.integers(1, 8))
def test_tiny(n):
    assert n >= 1
"""


def workdir(tmp_path: Path, kind: str) -> tuple[Path, dict[str, str]]:
    """A directory as a user's repository would be: model.py and properties/; the environment with
    this interpreter's scripts (stabilitycheck, pytest) first on PATH and one torch thread."""
    (tmp_path / "model.py").write_text(MODELS[kind][0])
    (tmp_path / "properties").mkdir()
    (tmp_path / "properties" / "test_tiny.py").write_text(PROPERTY)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH="")
    env.pop("GITHUB_STEP_SUMMARY", None)
    env.pop("PYTEST_ADDOPTS", None)
    return tmp_path, env


def assert_outputs(cwd: Path, code: int, expected: int, stderr: str) -> None:
    assert code == expected, stderr[-2000:]
    entries = json.loads((cwd / "stability.json").read_text())
    assert len(entries) == 1
    assert (entries[0]["counterexample"] is not None) == (expected == 1)
    assert (cwd / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def shell(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_check_sh(tmp_path: Path, kind: str) -> None:
    cwd, env = workdir(tmp_path, kind)
    proc = shell(["bash", str(CI / "check.sh"), "model.py"], cwd, env)
    assert_outputs(cwd, proc.returncode, MODELS[kind][1], proc.stderr + proc.stdout)
    assert (cwd / "stability.md").read_text().startswith("## stabilitycheck")


def run_steps(workflow: str) -> dict[str, str]:
    """The `run:` command of each named step (folded `>` and literal `|` blocks joined as the shell
    would see them)."""
    steps: dict[str, str] = {}
    for block in re.split(r"\n\s*- (?=name: )", workflow)[1:]:
        name = block.split("\n", 1)[0].removeprefix("name: ").strip()
        match = re.search(r"\n\s*run: *(>|\|)?[ \t]*\n?(.*)", block, re.S)
        if match is None:
            continue
        style, body = match.groups()
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        lines = [line for line in lines if not re.match(r"^(uses|with|if|path|name|key|restore-keys):", line)]
        steps[name] = (" " if style == ">" else "\n").join(lines) if style else lines[0]
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_github_workflow_steps(tmp_path: Path, kind: str) -> None:
    steps = run_steps((CI / "github-workflow.yml").read_text())
    cwd, env = workdir(tmp_path, kind)
    summary = cwd / "summary.md"
    env["GITHUB_STEP_SUMMARY"] = str(summary)
    props = shell(["bash", "-c", steps["Property suites"]], cwd, env)
    assert props.returncode == 0, props.stdout[-2000:]
    check = shell(["bash", "-c", steps["Check the model"]], cwd, env)
    assert_outputs(cwd, check.returncode, MODELS[kind][1], check.stderr + check.stdout)
    assert summary.read_text().startswith("## stabilitycheck") and "model.py" in summary.read_text()
