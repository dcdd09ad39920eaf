"""The README's examples run, and the output it shows is what the tool prints today."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, re.S)
OUTPUTS = re.findall(r"```\n\$ (stabilitycheck .*?)\n(.*?)```", README, re.S)


def test_readme_has_examples() -> None:
    assert len(PYTHON) >= 3 and OUTPUTS


@pytest.mark.parametrize("source", [s for s in PYTHON if not s.startswith("# model.py")])
def test_python_block_runs(source: str) -> None:
    namespace: dict[str, object] = {}
    exec(compile(source, "README.md", "exec"), namespace)
    for name, obj in namespace.items():
        if name.startswith("test_") and callable(obj):
            obj()  # a property test shown in the README: Hypothesis runs it here


def test_model_file_example_prints_what_the_readme_shows(tmp_path: Path) -> None:
    (model,) = [s for s in PYTHON if s.startswith("# model.py")]
    (tmp_path / "model.py").write_text(model)
    ((command, shown),) = [o for o in OUTPUTS if o[0] == "stabilitycheck model.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "stabilitycheck.cli", *command.split()[1:], "--database", "none"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip() == shown.strip()


def test_zoo_table_is_what_stabilitycheck_zoo_prints() -> None:
    ((_, shown),) = [o for o in OUTPUTS if o[0] == "stabilitycheck zoo"]
    proc = subprocess.run(
        [sys.executable, "-m", "stabilitycheck.cli", "zoo", "--database", "none"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.split("\n\n")[0].strip() == shown.strip()
