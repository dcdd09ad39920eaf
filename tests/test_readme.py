"""The README's examples run, and the output it shows has the shape, and makes the claims, of what the
tool prints today (the numbers of one seeded run are not frozen: an oracle checks them instead)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from stabilitycheck import Config, Limits, assess
from stabilitycheck.report import HEADERS

README = (Path(__file__).parents[1] / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, re.S)
OUTPUTS = re.findall(r"```\n\$ (stabilitycheck .*?)\n(.*?)```", README, re.S)


def table(text: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the rows (cells split on two or more spaces) of the report's first table."""
    lines = text.strip().split("\n\n")[0].splitlines()
    assert set(lines[1]) == {"-", " "}, lines[1]
    header, *rows = [
        [c.strip() for c in re.split(r"\s{2,}", line.strip())] for line in [lines[0], *lines[2:]]
    ]
    return header, rows


def run_cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stabilitycheck.cli", *argv, "--database", "none"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def criterion_fired(cell: str) -> bool:
    """'growth 107 > 100' (or 'nonfinite'): the number shown is past the limit shown."""
    if cell.startswith("nonfinite"):
        return True
    _, number, op, limit = cell.split()[:4]
    return op == ">" and float(number) > float(limit)


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
    proc = run_cli(*command.split()[1:], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    header, (row,) = table(proc.stdout)
    shown_header, (shown_row,) = table(shown)
    assert header == shown_header == list(HEADERS)
    assert row[0] == shown_row[0] == "model.py"  # the target as typed
    assert row[3] == shown_row[3] and re.fullmatch(r"depth=\d+", row[3])  # the canonical point
    assert criterion_fired(row[4]) and criterion_fired(shown_row[4])
    assert "reproduce python -c" in proc.stdout and "reproduce python -c" in shown
    # oracle: the point is 1-minimal, re-judged over seeds here (sigma_w = 2 tanh: gain > 1 per layer,
    # so growth rises with depth); one layer less does not explode
    depth = int(row[3].split("=")[1])
    subject = f"{tmp_path / 'model.py'}:build"
    assert assess(Config.of(subject, depth=depth), limits=Limits()).exploded
    assert not assess(Config.of(subject, depth=depth - 1), limits=Limits()).exploded


def test_zoo_table_is_what_stabilitycheck_zoo_prints() -> None:
    ((_, shown),) = [o for o in OUTPUTS if o[0] == "stabilitycheck zoo"]
    proc = run_cli("zoo")
    assert proc.returncode == 1, proc.stderr
    header, rows = table(proc.stdout)
    shown_header, shown_rows = table(shown)
    assert header == shown_header == list(HEADERS)
    assert [r[0] for r in rows] == [r[0] for r in shown_rows]  # every zoo target, in order
    for row, shown_row in zip(rows, shown_rows, strict=True):
        stable = row[3].startswith("stable")
        assert shown_row[3].startswith("stable") == stable, (row, shown_row)  # the README's claims
        if stable:
            assert row[4] == shown_row[4] == "-"
        else:  # the same knobs searched, and a criterion past its limit in both
            assert [kv.split("=")[0] for kv in row[3].split()] == [
                kv.split("=")[0] for kv in shown_row[3].split()
            ]
            assert criterion_fired(row[4]) and criterion_fired(shown_row[4])
    # theory the README states: the LSTM's gates keep it stable; the tanh MLP and RNN explode above
    # the critical sigma_w = 1
    status = {r[0]: r[3].startswith("stable") for r in rows}
    assert status["lstm"] and not status["mlp"] and not status["rnn"]
    for r in rows:
        if r[0] in ("mlp", "rnn"):
            assert float(dict(kv.split("=") for kv in r[3].split())["init_scale"]) > 1.0
