"""Tests of ci/bench.py: every section runs on tiny sizes and yields its rows, and every printed number
agrees with its own definition (a ratio is the median of the per-round ratios behind it, a fraction is
its numerator over its denominator, met/NO follows from the ratio and the target). No timing asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
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


def test_judged_seeds_derives_its_ratios_and_verdicts_from_the_sums_over_bases() -> None:
    bench = load_bench()
    row = {"space": "x", "seeds": 5, "bases": 2}
    for key, many, one in (("points", 10, 12), ("probes", 25, 12), ("all probes", 30, 14)):
        row[f"{key} rounds"], row[f"{key} 1 seed rounds"] = [many] * 3, [one] * 3
    row["CPU rounds"], row["CPU 1 seed rounds"] = [3.0, 1.0, 2.0], [1.0, 1.0, 1.0]
    row["probe x per base"], row["CPU x per base"] = [2.5, 1.5], [3.0, 1.0]
    row["same point per base"] = [True, False]
    got = bench.judged_seeds(row)
    assert got["probe x"] == 25 / 12 and got["all probe x"] == 30 / 14
    assert got["CPU ratio"] == 2.0 and got["CPU s"] == 2.0 and got["CPU s 1 seed"] == 1.0
    assert got["CPU x"].startswith("2.000x [")
    assert got["probe x: bases"] == "2.00x [1.50, 2.50]" and got["CPU x: bases"] == "2.00x [1.00, 3.00]"
    assert got["bases > 2x probes"] == "1/2"
    assert got["#14: probes <= 3x"] == "yes"  # 2.08x
    assert got["#18: probes, CPU <= 2x"] == "NO"  # 2.08x > 2
    assert got["same point"] == "1/2"


def test_counting_subject_counts_one_build_per_probe() -> None:
    bench = load_bench()
    from stabilitycheck.config import Config
    from stabilitycheck.configprobe import probe
    from stabilitycheck.seeds import assess

    config = Config.of("rnn", width=4, seq_len=3, batch_size=2, seeds=3)
    subject = bench.Counting(bench.resolve("rnn"))
    probe(config, subject)
    probe(config, subject, last_step=True)
    assert subject.builds == 2
    j = assess(config, subject)  # judged through time: a last-step probe per seed beside its own
    assert j.per_token is not None and subject.builds == 2 + 2 * len(j.seeds)
    assert subject.name == "rnn"  # everything else is the wrapped subject's


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


def spread_agrees(text: str, rounds: list[float]) -> bool:
    """'m.mmmx [q1, q3]' is the median and quartiles of `rounds`."""
    q1, m, q3 = statistics.quantiles(rounds, n=4) if len(rounds) > 1 else (rounds[0],) * 3
    return text == f"{m:.3f}x [{q1:.2f}, {q3:.2f}]"


def check_overhead(rows: list[dict[str, Any]]) -> None:
    assert [r["model"].split()[0] for r in rows] == ["mlp", "transformer", "rnn"]
    for row in rows:
        assert row["bare ms"] > 0 and row["bare x2 + step ms"] > 0
        probes = []
        for key in (
            "probe steps=0",
            "probe steps=1",
            "floor",
            "detect_anomaly",
            "lightning norms",
            "hooks + .item()",
            *(() if row["model"].startswith("rnn") else ("input grad",)),  # the zoo's inputs are floats
        ):
            ratio, rounds = row[f"{key} ratio"], row[f"{key} rounds"]
            assert ratio > 0 and math.isfinite(ratio), (key, row)
            assert ratio == statistics.median(rounds), (key, row)
            assert spread_agrees(row[key], rounds), (key, row)
            if key.startswith("probe"):
                probes.append(ratio)
        if row["model"].startswith("rnn"):  # recurrent: no input gradient measured
            assert row["input grad"] == "-"
        assert row["target"] == f"<= {row['target ratio']:.2f}x"
        assert row["target ratio"] == (1.15 if row["model"].startswith("rnn") else 1.05)
        assert row["met"] == ("yes" if all(r <= row["target ratio"] for r in probes) else "NO")


def check_watch(rows: list[dict[str, Any]]) -> None:
    assert [r["model"].split()[0] for r in rows] == ["mlp", "transformer", "rnn"]
    for row in rows:
        for key in ("watch", "floor", "2nd copy"):
            ratio, rounds = row[f"{key} ratio"], row[f"{key} rounds"]
            assert ratio > 0 and math.isfinite(ratio) and ratio == statistics.median(rounds), (key, row)
            assert spread_agrees(row[key], rounds), (key, row)
        assert row["bare ms/step"] > 0 and row["watch ms/step"] > 0
        assert row["target ratio"] == (1.05 if row["bare ms/step"] >= 5.0 else 1.15)
        assert row["target"] == f"<= {row['target ratio']:.2f}x"
        assert row["met"] == ("yes" if row["watch ratio"] <= row["target ratio"] else "NO")
        # one flush (one host read) per timed call of 50 steps: warm-up calls and rounds
        assert row["steps"] == 50 * (2 + len(row["watch rounds"])) and row["host reads"] == row["steps"] // 50


def check_search(rows: list[dict[str, Any]]) -> None:
    assert [r["space"] for r in rows] == ["mlp 2-knob", "mlp 4-knob"]
    for row in rows:
        assert row["seeds"] == 5  # both sides judge over the default seeds budget
        assert 0 < row["search points"] <= row["grid"]
        assert row["point frac"] == row["search points"] / row["grid"]
        # each judged point costs 1..seeds probes; the sweep judges every point of the grid
        assert row["search points"] <= row["search judged probes"] <= row["seeds"] * row["search points"]
        assert row["search judged probes"] <= row["search probes"]  # + remedies
        assert row["grid"] <= row["sweep probes"] <= row["seeds"] * row["grid"]
        assert row["probe frac"] == row["search probes"] / row["sweep probes"]
        assert row["search s"] > 0 and row["sweep s"] > 0
        assert row["time frac"] == row["search s"] / row["sweep s"]
        assert row["boundary pts"] > 0  # the quick limits make the tiny grids explode
        assert row["same minimum"] == "yes"
    assert rows[0]["met"] == "-"
    ok = rows[1]["probe frac"] <= 0.10 and rows[1]["time frac"] <= 0.10
    assert rows[1]["met"] == ("yes" if ok else "NO")


def check_seeds(rows: list[dict[str, Any]]) -> None:
    from stabilitycheck.zoo import targets

    labels = list(targets())
    assert len(labels) == 8
    assert [r["space"] for r in rows] == [*labels, "total (8 targets)"]
    for row in rows:
        for key in ("points", "probes", "all probes"):
            assert row[key] == statistics.median(row[f"{key} rounds"]), (key, row)
            assert row[f"{key} 1 seed"] == statistics.median(row[f"{key} 1 seed rounds"]), (key, row)
        assert row["probes 1 seed"] == row["points 1 seed"]  # one seed: one probe per point judged
        assert row["points"] <= row["probes"] <= 5 * row["points"]
        assert row["probes"] <= row["all probes"] and row["probes 1 seed"] <= row["all probes 1 seed"]
        assert row["probe x"] == row["probes"] / row["probes 1 seed"]
        assert row["all probe x"] == row["all probes"] / row["all probes 1 seed"]
        cpu = [a / b for a, b in zip(row["CPU rounds"], row["CPU 1 seed rounds"], strict=True)]
        assert len(cpu) == len(row["probes rounds"]) >= 3
        assert row["CPU ratio"] == statistics.median(cpu)
        assert spread_agrees(row["CPU x"], cpu)
        assert row["CPU s"] == statistics.median(row["CPU rounds"]) > 0
        assert row["CPU s 1 seed"] == statistics.median(row["CPU 1 seed rounds"]) > 0
        assert row["#14: probes <= 3x"] == ("yes" if row["probe x"] <= 3 else "NO")
        ok = row["probe x"] <= 2 and row["CPU ratio"] <= 2
        assert row["#18: probes, CPU <= 2x"] == ("yes" if ok else "NO")
    per_target, total = rows[:-1], rows[-1]
    for key in ("points", "probes", "all probes", "CPU"):
        for side in (f"{key} rounds", f"{key} 1 seed rounds"):
            sums = [sum(col) for col in zip(*(r[side] for r in per_target), strict=True)]
            assert total[side] == pytest.approx(sums), side
    for row in per_target:
        assert row["seeds"] == 5 and row["bases"] == 2
        # a search is deterministic: every round judged the same points with the same probes
        for key in ("points rounds", "probes rounds", "all probes rounds", "points 1 seed rounds"):
            assert len(set(row[key])) == 1, (key, row)
        # the counts are the bases' sums, and each base's ratio is its own counts'
        assert sum(row["probes per base"]) == row["probes"]
        assert sum(row["probes 1 seed per base"]) == row["probes 1 seed"]
        ratios = [a / b for a, b in zip(row["probes per base"], row["probes 1 seed per base"], strict=True)]
        assert row["probe x per base"] == ratios and len(row["CPU x per base"]) == 2
        for key in ("probe x", "CPU x"):
            got = row[f"{key} per base"]
            assert row[f"{key}: bases"] == f"{statistics.median(got):.2f}x [{min(got):.2f}, {max(got):.2f}]"
        assert row["bases > 2x probes"] == f"{sum(x > 2 for x in ratios)}/2"
        # 'same point' counts only the bases where the search with seeds found a counterexample
        found = [(m, o) for m, o in row["found per base"] if m != "none found"]
        assert row["same point per base"] == [m == o != "varies" for m, o in found]
        assert row["same point"] == (f"{sum(m == o for m, o in found)}/{len(found)}" if found else "-")
    same = [x for r in per_target for x in r["same point per base"]]
    assert total["same point"] == (f"{sum(same)}/{len(same)}" if same else "-")


@pytest.mark.slow
def test_quick_run_prints_every_table_and_its_numbers_follow_their_definitions(
    quick: tuple[str, dict[str, Any]],
) -> None:
    stdout, result = quick
    for title in (
        "## machine",
        "## probe and its peers vs a bare step",
        "## watch mode vs a bare training step",
        "## search vs exhaustive sweep",
        "## seeds vs one seed",
        "## probe time vs size",
        "## scaling exponents",
        "## the test suite in parallel and not",
        "## the 10 slowest test phases",
        "total bench time",
    ):
        assert title in stdout
    for word in (
        "torch threads",
        "malloc",
        "probe steps=0",
        "detect_anomaly",
        "same minimum",
        "search points",
        "probe x",
        "CPU x",
        "#14: probes <= 3x",
        "#18: probes, CPU <= 2x",
        "target",
        "met",
    ):
        assert word in stdout
    assert "probes rounds" not in stdout and "CPU rounds" not in stdout  # per-round values: JSON only
    # the JSON of the same run (one test: under xdist two tests could each run the bench)
    assert result["quick"] is True
    assert result["machine"]["cpus"] >= 1
    check_overhead(result["overhead"])
    check_watch(result["watch"])
    check_search(result["search"])
    check_seeds(result["seeds"])
    assert len(result["scaling"]) == len(result["exponents"]) == 4
    for row in result["scaling"]:
        assert all(v > 0 for k, v in row.items() if k != "axis")
    assert all(math.isfinite(row["k"]) for row in result["exponents"])
    runs, start = result["parallel"][:2], result["parallel"][2]
    assert [r["run"] for r in runs] == ["-n 2", "-n 0"]
    for row in runs:
        # pytest ran the suite (0: all passed, 1: some failed; whether they pass is not the bench's
        # business, only how long they take); 2-5 would be a usage or internal error
        assert row["exit"] in (0, 1) and "passed" in row["summary"] and row["wall s"] > 0, row
        assert row["wall vs -n 2"] == row["wall s"] / runs[0]["wall s"]
        assert row["CPU vs -n 2"] == row["CPU s"] / runs[0]["CPU s"]
    # the workers' CPU time is counted, not pytest's alone: with -n 2, three processes import torch
    assert runs[0]["CPU s"] > 2 * start["import CPU s"]
    assert 0 < start["import CPU s"] < start["collect CPU s"]  # collecting imports them too
    phases = result["slowest"]
    assert 0 < len(phases) <= 10 and all(p["phase"] in ("call", "setup", "teardown") for p in phases)
    assert [p["s"] for p in phases] == sorted((p["s"] for p in phases), reverse=True)
    assert all(p["test"].startswith("tests/test_config.py::") for p in phases)
    assert set(result["section_s"]) == {"overhead", "watch", "search", "seeds", "scaling", "parallel"}


def test_only_runs_the_sections_named_and_rejects_unknown_ones(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "search", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "search" in result and not {"overhead", "watch", "seeds", "scaling", "parallel"} & set(result)
    assert "## seeds vs one seed" not in proc.stdout
    bad = subprocess.run(
        [sys.executable, str(BENCH), "--only", "nonsense"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "unknown section" in bad.stderr
