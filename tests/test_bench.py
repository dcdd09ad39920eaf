"""Smoke tests of ci/bench.py: every section runs on tiny sizes and yields its rows; no timing asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "ci" / "bench.py"


def load_bench() -> ModuleType:
    """ci/bench.py as a module (ci/ is not a package)."""
    spec = importlib.util.spec_from_file_location("stabilitycheck_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_fit_exponent_recovers_a_power_law() -> None:
    bench = load_bench()
    xs = [8.0, 16.0, 32.0, 64.0]
    assert bench.fit_exponent(xs, [3.0 * x**1.5 for x in xs]) == pytest.approx(1.5)
    assert bench.fit_exponent(xs, [2.0 for _ in xs]) == pytest.approx(0.0)


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    bench = load_bench()
    num = [(2.0, 4.0), (3.0, 6.0), (100.0, 200.0)]
    den = [(1.0, 2.0), (1.0, 2.0), (1.0, 2.0)]
    assert bench.paired_ratio(num, den, 1) == 3.0
    assert bench.med(num, 0) == 3000.0


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """The stdout and the JSON of one `python ci/bench.py --quick --json FILE` run."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_prints_every_table_and_its_rows_hold_positive_numbers(
    quick: tuple[str, dict[str, Any]],
) -> None:
    stdout, result = quick
    for title in (
        "## machine",
        "## probe and its peers vs a bare step",
        "## search vs exhaustive sweep",
        "## probe time vs size",
        "## scaling exponents",
        "## parallel property suite",
        "total bench time",
    ):
        assert title in stdout
    for word in (
        "torch threads",
        "malloc",
        "probe steps=0",
        "detect_anomaly",
        "same minimum",
        "target",
        "met",
    ):
        assert word in stdout
    # the JSON of the same run (one test: under xdist two tests could each run the 10 s bench)
    assert result["quick"] is True
    assert result["machine"]["cpus"] >= 1
    assert [r["model"].split()[0] for r in result["overhead"]] == ["mlp", "transformer", "rnn"]
    for row in result["overhead"]:
        assert row["bare ms"] > 0 and row["bare x2 + step ms"] > 0
        for key in (
            "probe steps=0",
            "probe steps=1",
            "floor",
            "detect_anomaly",
            "lightning norms",
            "hooks + .item()",
        ):
            assert row[f"{key} ratio"] > 0 and math.isfinite(row[f"{key} ratio"]), (key, row)
            assert row[key].endswith("]") and "x [" in row[key], (key, row)
        assert row["watch"] == "-"  # its slot: nothing measured until the watch mode exists
        assert row["met"] in ("yes", "NO")
    assert [r["space"] for r in result["search"]] == ["mlp 2-knob", "mlp 4-knob"]
    for row in result["search"]:
        assert row["search probes"] > 0 and row["sweep probes"] == row["grid"]
        assert row["search s"] > 0 and row["sweep s"] > 0
        assert row["same minimum"] == "yes"  # the quick limits make the tiny grids explode
    assert len(result["scaling"]) == len(result["exponents"]) == 4
    for row in result["scaling"]:
        assert all(v > 0 for k, v in row.items() if k != "axis")
    assert all(math.isfinite(row["k"]) for row in result["exponents"])
    assert [r["run"].split(",")[0].split(" (")[0] for r in result["parallel"]] == ["-n 2", "-n 0", "-n 0"]
    for row in result["parallel"]:
        assert row["exit"] == 0 and row["wall s"] > 0
