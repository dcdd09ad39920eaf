"""Phase maps: the traced frontier against theory computed here (mean field by our own quadrature,
exact linear growth), against the exhaustive grid judged by brute force, and the trace's own
guarantees (exact on monotone grids, a measured transition on any grid, the cost bound).

The theory tests judge growth alone (grad_norm and divergence off): growth is what mean-field theory
predicts; with the default limits a linear RNN's weight-gradient norm passes 1e3 first at small sigma.
Also the staircase trace (staircase) on hand-made boolean rows: confirmations and bisection.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meanfield_oracle import tanh_log_growth
from signalled import stopped_when_marked

from stabilitycheck import meanfield
from stabilitycheck._json import strict_json
from stabilitycheck.cli import main
from stabilitycheck.config import Config
from stabilitycheck.maptext import judged, markdown, text
from stabilitycheck.phasemap import PhaseMap, phase_map, theory
from stabilitycheck.seeds import assess
from stabilitycheck.space import Axis, Space
from stabilitycheck.spread import Spread
from stabilitycheck.staircase import Edge, trace
from stabilitycheck.verdicts import Limits
from stabilitycheck.zoo import Family

GROWTH_ONLY = Limits(growth=10.0, grad_norm=None, divergence=None)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def first(depths: range, log_growth: object, limit: float, below: bool = False) -> int | None:
    """The index of the first depth whose growth passes the limit (below 1/limit with `below`)."""
    for i, d in enumerate(depths):
        g = log_growth(d)  # type: ignore[operator]
        if (g < -math.log(limit)) if below else (g > math.log(limit)):
            return i
    return None


def mlp_map(activation: str, sigmas: Axis, depth: int, limits: Limits, width: int = 128) -> PhaseMap:
    base = Family("mlp").config(width=width, batch_size=8, activation=activation)
    space = Space("mlp", base, (Axis.range("depth", 1, depth), sigmas))
    return phase_map("mlp", x="depth", y="init_scale", space=space, limits=limits)


def within_spread(pm: PhaseMap, predicted: list[int | None], vanishing: bool = False) -> None:
    """Each row's predicted index lies in its measured band (one seed fired to all fired), one grid
    step either side."""
    edges = pm.vanish if vanishing else pm.explode
    assert edges is not None
    for e, want in zip(edges, predicted, strict=True):
        lo, hi = pm.band(e.y, vanishing)
        where = f"{pm.y.name}={pm.y.values[e.y]}: traced {e.x}, spread {lo}-{hi}, theory {want}"
        if want is None:
            assert e.x is None or e.x >= len(pm.x.values) - 2, where
        else:
            assert e.x is not None, where
            assert min(e.x, lo if lo is not None else e.x) - 1 <= want <= max(e.x, hi or e.x) + 1, where


# -- theory and brute force ---------------------------------------------------------------------------


@pytest.mark.slow
def test_tanh_frontier_matches_mean_field_and_the_exhaustive_grid() -> None:
    sigmas = Axis.range("init_scale", 2.0, 4.0, 0.5)
    pm = mlp_map("tanh", sigmas, 16, GROWTH_ONLY)
    depths = range(1, 17)
    predicted = [first(depths, lambda d, s=s: tanh_log_growth(s, d), 10.0) for s in sigmas.values]
    assert sum(p is not None for p in predicted) >= 4  # the frontier crosses the map
    within_spread(pm, predicted)
    base = pm.base
    for j, s in enumerate(sigmas.values):  # brute force: every point of the row judged
        row = [assess(base.with_knobs(depth=d, init_scale=s), None, GROWTH_ONLY).exploded for d in depths]
        assert pm.explode[j].x == next((i for i, x in enumerate(row) if x), None), f"sigma {s}: {row}"
    assert pm.violations == ()


def test_relu_frontier_follows_sigma_over_root_two_per_block() -> None:
    sigmas = Axis.range("init_scale", 2.0, 4.0, 0.5)
    pm = mlp_map("relu", sigmas, 16, GROWTH_ONLY)
    depths = range(1, 17)
    predicted = [
        first(depths, lambda d, s=s: (d - 1) * math.log(s / math.sqrt(2)), 10.0) for s in sigmas.values
    ]
    within_spread(pm, predicted)
    assert [e.x for e in pm.explode] != [None] * len(sigmas.values)


@pytest.mark.slow
def test_linear_rnn_seq_len_frontier_is_exact_and_costs_under_15_percent_of_the_grid() -> None:
    """Linear RNN, recurrence sigma x orthogonal, loss on the last step: growth is sigma^(T-1) exactly,
    so T* is the smallest T with (T-1) ln sigma > ln 100; on the 64 x 25 grid of the issue."""
    base = Family("rnn").config(width=8, batch_size=2, activation="linear")
    space = Space("rnn", base, (Axis.range("seq_len", 1, 64), Axis.range("init_scale", 1.0, 4.0, 0.125)))
    limits = Limits(grad_norm=None, divergence=None)
    pm = phase_map("rnn", x="seq_len", y="init_scale", space=space, limits=limits, loss="last")
    for e in pm.explode:
        s = float(pm.y.values[e.y])
        exact = next((t for t in range(1, 65) if (t - 1) * math.log(s) > math.log(100)), None)
        got = None if e.x is None else pm.x.values[e.x]
        assert got == exact, f"sigma {s}: traced T* {got}, exact {exact}"
    assert pm.verdicts <= 0.15 * pm.grid, pm.verdicts
    assert pm.verdicts == len({(p.x, p.y) for p in pm.points})
    said = judged(
        pm, theory(pm)
    )  # what its points and its theory column are (a review: it said mean field's)
    assert "(growth through time, the loss on the last step)" in said and "the exact product" in said
    assert "infinite-width" not in said


def test_vanishing_frontier_below_critical_sigma_matches_mean_field() -> None:
    sigmas = Axis.range("init_scale", 0.5, 1.5, 0.25)
    limits = Limits(growth=10.0, grad_norm=None, divergence=None, vanishing=10.0)
    pm = mlp_map("tanh", sigmas, 16, limits)
    depths = range(1, 17)
    predicted = [first(depths, lambda d, s=s: tanh_log_growth(s, d), 10.0, below=True) for s in sigmas.values]
    assert predicted[0] is not None and predicted[-1] is None  # vanishes below sigma 1, not above
    within_spread(pm, predicted, vanishing=True)
    assert pm.vanish is not None and all(
        e.x is None for e, s in zip(pm.vanish, sigmas.values, strict=True) if s > 1
    )


def test_meanfield_module_agrees_with_the_quadrature_here() -> None:
    for sigma in (0.5, 1.0, 1.5, 2.5, 4.0):
        for depth in (2, 9, 30):
            ours = meanfield.log_growths(sigma, "tanh", depth)[-1]
            assert ours == pytest.approx(tanh_log_growth(sigma, depth), rel=1e-6, abs=1e-9)
    assert meanfield.chi_1(2.0, "relu") == pytest.approx(2.0)  # sigma^2 / 2 exactly
    assert meanfield.chi_1(1.3, "linear") == pytest.approx(1.69)
    assert meanfield.chi_1(1.0, "tanh") == pytest.approx(1.0, abs=1e-4)  # the critical point


# -- the trace on synthetic grids ---------------------------------------------------------------------


def run_trace(grid: list[list[bool]]) -> tuple[list[Edge], list[str], set[tuple[int, int]]]:
    seen: set[tuple[int, int]] = set()

    def fires(x: int, y: int) -> bool:
        seen.add((x, y))
        return grid[y][x]

    edges: list[Edge] = []
    notes: list[str] = []
    trace(fires, len(grid[0]), len(grid), edges, notes)
    return edges, notes, seen


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.lists(st.integers(0, 40), min_size=1, max_size=30))
def test_trace_is_exact_on_monotone_grids(nx: int, frontier: list[int]) -> None:
    grid = [[x >= f for x in range(nx)] for f in frontier]
    edges, notes, seen = run_trace(grid)
    assert [e.x for e in edges] == [f if f < nx else None for f in frontier]
    assert notes == []
    assert len(seen) <= 4 * len(frontier) + sum(abs(a - b) for a, b in itertools.pairwise(frontier)) + nx


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 30).flatmap(
        lambda nx: st.lists(st.lists(st.booleans(), min_size=nx, max_size=nx), min_size=1)
    )
)
def test_trace_only_reports_measured_transitions(grid: list[list[bool]]) -> None:
    edges, _, seen = run_trace(grid)
    for e in edges:
        if e.x is None:
            assert (len(grid[0]) - 1, e.y) in seen and not grid[e.y][-1]
        else:
            assert (e.x, e.y) in seen and grid[e.y][e.x]
            assert e.x == 0 or ((e.x - 1, e.y) in seen and not grid[e.y][e.x - 1])


def test_a_blip_next_to_the_frontier_is_reported_and_bisected() -> None:
    """Deliberately non-monotone rows: one explodes at 4, is stable at 5 and explodes from 6 on (the
    walk's check two below the frontier sees it); one explodes at 6 only, then from 8 on."""
    blip_below = [False] * 4 + [True, False] + [True] * 4
    blip_above = [False] * 6 + [True, False] + [True] * 2
    edges, notes, _ = run_trace([[x >= 6 for x in range(10)], blip_below, blip_above])
    assert len(notes) == 2 and all("not monotone" in n for n in notes)
    assert [(e.x, e.how) for e in edges] == [(6, "bisection"), (4, "bisection"), (6, "bisection")]
    monotone, quiet, _ = run_trace([[x >= 6 for x in range(10)]] * 3)
    assert quiet == [] and [e.how for e in monotone] == ["bisection", "walk", "walk"]


# -- interruption, JSON, renderings, CLI ---------------------------------------------------------------


def small_space() -> Space:
    base = Family("mlp").config(width=16, batch_size=4, seeds=1)
    return Space("mlp", base, (Axis.range("depth", 1, 8), Axis.range("init_scale", 2.0, 4.0, 1.0)))


def test_ctrl_c_returns_what_was_traced_and_the_map_round_trips_through_json() -> None:
    calls: list[int] = []

    def interrupt(pm: PhaseMap) -> None:
        calls.append(pm.verdicts)
        if len(calls) == 5:
            raise KeyboardInterrupt

    pm = phase_map("mlp", x="depth", y="init_scale", space=small_space(), on_point=interrupt)
    assert pm.interrupted and pm.verdicts == 5
    assert any(e.how == "untraced" for e in pm.explode)
    back = PhaseMap.from_dict(json.loads(json.dumps(pm.to_dict())))
    assert back == pm
    nan = dataclasses.replace(pm.points[0], growth=Spread(math.nan, math.nan, math.nan))
    odd = dataclasses.replace(pm, points=(nan, *pm.points[1:]))
    strict = json.loads(strict_json(odd.to_dict()), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert math.isnan(PhaseMap.from_dict(strict).points[0].growth.mid)  # NaN written null, read back
    assert "not traced" in text(back) and "interrupted" in markdown(back)


def test_theory_is_offered_for_zoo_mlps_and_not_for_model_files() -> None:
    said: list[str] = []
    pm = phase_map("mlp", x="depth", y="init_scale", space=small_space(), progress=said.append)
    verdicts = [line for line in said if " verdicts of " in line]  # read '(208 (139-226))': of what?
    assert len(verdicts) == len(pm.points)
    assert all(re.search(r" \(growth \S+ \(.+\) over 1 seed\)$", line) for line in verdicts), verdicts
    assert theory(pm) is not None
    other = PhaseMap.from_dict(
        {**pm.to_dict(), "base": {**pm.base.to_dict(), "knobs": {**pm.base.values, "activation": "gelu"}}}
    )
    assert theory(other) is None


def test_the_map_says_what_each_point_is_and_what_mean_field_reads() -> None:
    """The map's text named no quantile, seeds or limits, and 'mean field' said not what it predicts
    (an audit). Oracle: the map's own run and limits, each active criterion with its bound, and the
    mean-field clause where theory() offers a column (a zoo MLP) and not where it does not."""
    limits = Limits(growth=10.0, grad_norm=None, divergence=None, vanishing=50.0)
    space = Space("mlp", Family("mlp").config(width=16, batch_size=4, seeds=3), small_space().axes)
    pm = phase_map("mlp", x="depth", y="init_scale", space=space, limits=limits)
    said = next(line for line in text(pm).splitlines() if line.startswith("each point:"))
    run = pm.base.run
    assert f"the q={run.quantile:g} verdict over up to {run.seeds} seeds" in said
    assert "nonfinite, growth > 10, vanishing < 0.02;" in said and "grad_norm" not in said
    assert "mean field: the first depth where" in said and "(vanishing: under 1 / its limit)" in said
    assert said in markdown(pm)
    other = PhaseMap.from_dict(
        {**pm.to_dict(), "base": {**pm.base.to_dict(), "knobs": {**pm.base.values, "activation": "gelu"}}}
    )
    assert theory(other) is None and "mean field" not in judged(other, theory(other))


def test_cli_map_writes_json_markdown_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = {k: tmp_path / f"map.{k}" for k in ("json", "md", "png")}
    argv = [
        "map",
        "mlp",
        "--x",
        "depth",
        "--y",
        "init_scale",
        "--knob",
        "depth=1:8",
        "--knob",
        "init_scale=2.0:4.0:1.0",
    ]
    argv += [
        "--knob",
        "width=16",
        "--seeds",
        "1",
        "--json",
        str(out["json"]),
        "--markdown",
        str(out["md"]),
        "--png",
        str(out["png"]),
    ]
    assert main(argv) == 0
    pm = PhaseMap.from_dict(json.loads(out["json"].read_text()))
    assert pm.grid == 24 and not pm.interrupted and all(e.how != "untraced" for e in pm.explode)
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| init_scale |" in out["md"].read_text()
    assert "explodes at depth" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["map", "mlp", "--x", "depth"], "--y"),
        (["map", "mlp", "--x", "depth", "--y", "norm"], "not a knob of mlp"),
        (["map", "mlp", "--x", "depth", "--y", "width"], "give its grid"),
        (["map", "mlp", "--x", "depth", "--y", "activation"], "axes are numeric knobs, and activation is"),
        (["map", "mlp", "--x", "depth", "--y", "depth"], "both 'depth'"),
        (["map", "mlp", "--x", "depth", "--y", "init_scale", "--loss", "last"], "no last-step loss"),
        (["map", "nosuch", "--x", "depth", "--y", "init_scale"], "not a zoo family"),
        (["map", "mlp", "--x", "depth", "--y", "init_scale", "--knob", "activation=nope"], "not allowed"),
        (
            ["map", "mlp", "--x", "depth", "--y", "init_scale", "--json", "/nonexistent/m.json"],
            "cannot write",
        ),
    ],
)
def test_cli_map_bad_input_is_one_line_and_exit_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "flags",
    [
        ["--vanishing-limit", "0.5"],  # the map took it: every point growing under 2 read 'vanishes'
        ["--lr", "inf"],
        ["--growth-limit", "0.5"],
        ["--seeds", "0"],
        ["--quantile", "1.5"],
    ],
)
def test_the_map_refuses_what_the_search_refuses(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The map's run options are the search's, parsed alike: each value the search refuses, the map
    refuses with the same line (its own copy of them took --vanishing-limit 0.5)."""
    assert main(["mlp", *flags]) == 2
    search_said = capsys.readouterr().err.split(": error: ", 1)[1]
    assert main(["map", "mlp", "--x", "depth", "--y", "init_scale", *flags]) == 2
    err = capsys.readouterr().err
    mapped = search_said.replace("stabilitycheck --help", "stabilitycheck map --help")  # its own help
    assert err == f"stabilitycheck map: error: {mapped}" and err.count("\n") == 1


def test_map_of_the_transformer_example_runs_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.json"
    argv = ["map", str(EXAMPLES / "transformer.py"), "--x", "num_layers", "--y", "init_scale"]
    argv += [
        "--knob",
        "num_layers=1:6",
        "--knob",
        "init_scale=0.5:4.0:0.5",
        "--knob",
        "seq_len=8",
        "--seeds",
        "1",
        "--json",
        str(path),
    ]
    assert main(argv) == 0
    pm = PhaseMap.from_dict(json.loads(path.read_text()))
    assert (pm.x.name, pm.y.name) == ("num_layers", "init_scale") and len(pm.explode) == 8
    assert all(e.how in ("walk", "bisection") for e in pm.explode)
    for e in pm.explode:  # every frontier drawn is a measured pair
        if e.x is not None:
            assert pm.point(e.x, e.y).exploded and (e.x == 0 or not pm.point(e.x - 1, e.y).exploded)
    assert theory(pm) is None


GATED = """
import time
from pathlib import Path

from torch import nn

SPACE = {{"depth": (1, 64)}}


def build(depth=4, init_scale=1.0, width=16):
    if Path({json!r}).exists():  # a verdict is written: the next one waits for the signal
        Path({blocked!r}).touch()
        time.sleep(600)
    layers = [nn.Linear(width, width, bias=False) for _ in range(depth)]
    for layer in layers:
        nn.init.normal_(layer.weight, std=init_scale / width**0.5)
    return nn.Sequential(*[nn.Sequential(layer, nn.Tanh()) for layer in layers])
"""
"""A tanh MLP whose builds, once the map's JSON exists, wait (for the signal) after touching `blocked`."""


@pytest.mark.slow
def test_sigterm_writes_what_was_traced_and_exits_143(tmp_path: Path) -> None:
    """The signal is sent while a verdict is under way, after one was written: the whole map takes
    1.5 s, so a signal sent once the JSON appeared could come after the map had finished on a loaded
    machine (exit 1, not interrupted). The model holds the second verdict until the signal comes."""
    path, blocked, model = tmp_path / "m.json", tmp_path / "blocked", tmp_path / "gated.py"
    model.write_text(GATED.format(json=str(path), blocked=str(blocked)))
    argv = ["map", str(model), "--x", "depth", "--y", "init_scale", "--knob", "depth=1:64"]
    argv += ["--knob", "init_scale=1.0:4.0:0.125", "--knob", "width=16", "--seeds", "1", "--json", str(path)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "stabilitycheck.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = stopped_when_marked(proc, blocked)
    assert proc.returncode == 143, err[-2000:]
    pm = PhaseMap.from_dict(json.loads(path.read_text()))
    assert pm.interrupted and 0 < pm.verdicts < pm.grid
    assert b"not traced" in out


def test_cli_map_exit_code_is_the_searchs_1_when_a_point_fires(capsys: pytest.CaptureFixture[str]) -> None:
    """Oracle: the map's own points. Exit 1 when any measured point fired a criterion, 0 when none did
    (the exit codes the README gives for the whole CLI)."""
    argv = ["map", "mlp", "--x", "depth", "--y", "init_scale", "--knob", "depth=1:8"]
    argv += ["--knob", "init_scale=2.0:4.0:1.0", "--knob", "width=16", "--seeds", "1", "--quiet"]
    for limit, code in (("2", 1), ("100", 0)):
        assert main([*argv, "--growth-limit", limit]) == code
        assert ("X" in capsys.readouterr().out.split("\n")[1]) == (code == 1)  # the top row


def test_a_non_monotone_rows_note_names_the_knob_values() -> None:
    """The note says which knob values broke monotonicity (depth=5 fires, depth=6 does not), not grid
    indices, when the tracer is given the axes' names, as the phase map gives them."""
    row = [False] * 4 + [True, False] + [True] * 4
    edges: list[Edge] = []
    notes: list[str] = []
    depth, scale = Axis.range("depth", 1, 10), Axis("init_scale", (2.5,))
    names = (lambda i: f"depth={depth.values[i]}", lambda j: f"init_scale={scale.values[j]}")
    trace(lambda x, y: row[x], 10, 1, edges, notes, names)
    assert notes and notes[0].startswith("init_scale=2.5: depth=5 fires but depth=6 does not")
    assert notes[0].endswith("lowest transition: depth=5") and edges[0].x == 4


def test_the_theory_of_a_long_row_costs_one_pass_over_its_depths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row of the map reads the growth at one depth after another; each read copied the chain up to
    it (quadratic: a depth axis of 300,000 kept `map` busy for minutes after SIGTERM). Oracle: the
    chain itself (log_growths) at each depth, and no prediction past MAX_DEPTH. The cost is counted,
    not timed: a row of 20,000 depths computes each block of the chain at most once, and a read
    copies none of it. (A CPU-time budget of 5 s was flaky, the one pass taking 2 s on an idle
    machine, and could not fail: the copies cost another 1 s at this size.)"""
    knobs = {"activation": "tanh", "init_scale": 2.0}
    chain = meanfield.log_growths(2.0, "tanh", 40)
    for depth in (1, 7, 40):
        got = meanfield.zoo_growth("mlp", {**knobs, "depth": depth})
        assert got == pytest.approx(math.exp(chain[depth - 1]), rel=1e-12)
    assert meanfield.zoo_growth("mlp", {**knobs, "depth": meanfield.MAX_DEPTH + 1}) is None
    row, real, steps = range(1, 20_001), meanfield.step, [0]

    def counted(sigma: float, activation: str, q: float) -> tuple[float, float]:
        steps[0] += 1
        if steps[0] > len(row):  # a second pass over the chain: fail now, not minutes later
            raise AssertionError("the chain is computed more than once along the row")
        return real(sigma, activation, q)

    monkeypatch.setattr(meanfield, "step", counted)
    for depth in row:  # the blocks the cache does not hold yet (other tests may have made some)
        meanfield.zoo_growth("mlp", {**knobs, "depth": depth})
    tracemalloc.start()
    try:
        for depth in row:  # every block cached now: a read is one lookup
            meanfield.zoo_growth("mlp", {**knobs, "depth": depth})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16_000, peak  # a copy of the chain up to depth 20,000 is 160,000 bytes of pointers


RAISES_AT = """
import torch
from torch import nn

SPACE = {"depth": (1, 12)}


class Net(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.depth = depth
        self.layers = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(depth))

    def forward(self, x):
        if self.depth >= 9:
            raise ValueError(f"depth {self.depth} not supported")
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def build(depth=2):
    return Net(depth)
"""


def test_a_model_raising_at_a_point_stops_the_map_with_what_was_traced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain ValueError from the model's forward at one point was an internal error (exit 3, no
    map, `stopped` empty; found by a user's trial), where the search skips such a point: the map is
    printed, `stopped` says what raised and where, exit 2, as the README says."""
    model = tmp_path / "raises.py"
    model.write_text(RAISES_AT)
    out = tmp_path / "m.json"
    argv = ["map", str(model), "--x", "depth", "--y", "init_scale", "--knob", "init_scale=0.5:1.5:0.5"]
    assert main([*argv, "--seeds", "1", "--json", str(out), "--quiet"]) == 2
    pm = PhaseMap.from_dict(json.loads(out.read_text()))
    assert re.match(r"the model raised ValueError: depth (9|1[0-2]) not supported at ", pm.stopped)
    assert f"{model}:16 in forward" in pm.stopped
    captured = capsys.readouterr()
    assert "not traced" in captured.out and "internal error" not in captured.err


GRAD_AND_VANISH = Limits(grad_norm=0.5, vanishing=10.0)  # an audit's limits: both fire near one point


def full_rule(config: Any, limits: Limits) -> tuple[bool, bool]:
    """Brute force: every seed of the budget probed, each criterion judged on its quantile; whether
    a criterion other than vanishing fires, and whether vanishing does."""
    from stabilitycheck.configprobe import probe
    from stabilitycheck.seeds import seed_of
    from stabilitycheck.spread import quantile
    from stabilitycheck.verdicts import CRITERIA, judge, values

    run = config.run
    per_seed = [values(probe(config.with_run(seed=seed_of(run.seed, k)))) for k in range(run.seeds)]
    names = judge({c: quantile([v[c] for v in per_seed], run.quantile) for c in CRITERIA}, limits).names
    return any(n != "vanishing" for n in names), "vanishing" in names


@pytest.mark.parametrize("depth", [25, 37])
def test_a_map_point_decides_whether_it_explodes_and_whether_it_vanishes(depth: int) -> None:
    """A map's point stopped spending seeds at the first criterion known to fire: at depth 37 (tanh,
    width 16, sigma 1) grad_norm was, after 4 seeds, vanishing still open: read 'not vanishing', the
    row's vanishing frontier none where the 5-seed median growth is 0.076 < 1/10; at 25 the other way.
    Oracle: the full rule on all 5 seeds."""
    config = Config.of("mlp", depth=depth, init_scale=1.0, width=16, batch_size=8)
    got = assess(config, limits=GRAD_AND_VANISH, every=False, apart=True)
    names = got.verdict.names
    assert (any(n != "vanishing" for n in names), "vanishing" in names) == full_rule(config, GRAD_AND_VANISH)


def test_a_row_is_checked_on_the_points_the_other_trace_measured() -> None:
    """The vanishing trace measured depth 1 exploding (grad_norm) in rows whose explosion frontier had
    read none, with no note; and the band's 'all seeds' end counted seeds that fired on vanishing
    alone. Oracle: the full rule at the frontier points, and each seed's own verdict."""
    from stabilitycheck.configprobe import probe
    from stabilitycheck.seeds import seed_of
    from stabilitycheck.verdicts import judge, values

    pm = phase_map(
        "mlp",
        x=Axis.range("depth", 1, 30),
        y=Axis("init_scale", (0.25, 0.5)),
        space=Family("mlp").space(width=16, batch_size=8),
        limits=GRAD_AND_VANISH,
    )
    for edge in pm.explode:
        assert (
            edge.x == 0
            and full_rule(pm.base.with_knobs(depth=1, init_scale=pm.y.values[edge.y]), GRAD_AND_VANISH)[0]
        )
    assert sum("below the frontier traced" in n for n in pm.violations) == 2
    for p in pm.points:
        config = pm.base.with_knobs(depth=pm.x.values[p.x], init_scale=pm.y.values[p.y])
        spent = [values(probe(config.with_run(seed=seed_of(0, k)))) for k in range(p.seeds)]
        assert p.fired_seeds == sum(
            any(n != "vanishing" for n in judge(v, GRAD_AND_VANISH).names) for v in spent
        )


def test_a_frontier_point_names_every_criterion_it_fires_on() -> None:
    """The map's 'fired on' named what fired first: 'grad_norm' at a point whose growth over 4 seeds
    was 215, the README's sign that the frontier is not the growth's. Oracle: assess's every verdict."""
    pm = phase_map(
        "mlp",
        x=Axis.range("depth", 1, 40),
        y=Axis("init_scale", (2.875, 3.125)),
        space=Family("mlp").space(width=16, batch_size=8),
        limits=Limits(grad_norm=60.0),
    )
    for edge in pm.explode:
        assert edge.x is not None
        point = pm.point(edge.x, edge.y)
        assert point is not None
        config = pm.base.with_knobs(depth=pm.x.values[edge.x], init_scale=pm.y.values[edge.y])
        assert point.criteria == assess(config, limits=Limits(grad_norm=60.0)).verdict.names
    assert any(len(pm.point(e.x, e.y).criteria) > 1 for e in pm.explode if e.x is not None)  # type: ignore[union-attr]


def test_theorys_frontier_is_strictly_above_the_limit_like_the_verdict() -> None:
    """P3: the growth criterion fires on growth > limit (verdicts._above); a linear RNN's last-step growth
    is exactly sigma^(T-1) = 10^2 = 100 at T = 3, on the limit: not past it. The frontier is T = 4."""
    from stabilitycheck.phasemap import theory
    from stabilitycheck.space import Axis
    from stabilitycheck.verdicts import Limits

    base = SimpleNamespace(family="rnn", subject="rnn", values={"activation": "linear", "init_scale": 10.0})
    pm = SimpleNamespace(
        limits=Limits(growth=100.0),
        base=base,
        loss="last",
        x=Axis("seq_len", (1, 2, 3, 4, 5)),
        y=Axis("init_scale", (10.0,)),
    )
    assert theory(pm) == (3,)  # index of T = 4


def test_a_row_breaking_monotonicity_is_bisected_below_its_lowest_firing_point() -> None:
    """ST5: a row whose measured points break monotonicity (x = 2 fires, x = 3 does not) is bisected
    again below its lowest firing point for its lowest transition: here the frontier is x = 0, the
    brute-force smallest x that fires in that row; a bisection up to the quiet point instead keeps
    x = 2, above a firing point it measured."""
    from stabilitycheck.staircase import trace

    rows = [(False, False, False, False), (True, False, True, False)]
    edges: list[Any] = []
    notes: list[str] = []

    def fires(x: int, y: int) -> bool:
        return rows[y][x]

    trace(fires, 4, 2, edges, notes)
    assert [e.x for e in edges] == [None, min(x for x in range(4) if rows[1][x])]
    assert edges[1].how == "bisection" and len(notes) == 1 and notes[0].startswith("row 1: x index 2 fires")


def _trace_rows(rows: list[list[bool]]) -> tuple[list[object], list[str], dict[int, set[int]]]:
    from stabilitycheck.staircase import trace

    edges: list[object] = []
    notes: list[str] = []
    asked: dict[int, set[int]] = {}

    def fires(x: int, y: int) -> bool:
        asked.setdefault(y, set()).add(x)
        return rows[y][x]

    trace(fires, len(rows[0]), len(rows), edges, notes)
    return edges, notes, asked


def test_the_frontier_is_confirmed_by_a_second_quiet_point_below_it() -> None:
    """Module docstring: both sides of a frontier are confirmed by one more point, two quiet below
    it; a firing point two below the first-found frontier breaks monotonicity there, and the row is
    bisected below it for its lowest transition. Oracle: brute force (the smallest firing x of a row
    whose firing points are 2 and 4..7; the bisection on x = 7, 3, 5, 4 alone finds 4)."""
    row = [x == 2 or x >= 4 for x in range(8)]
    edges, notes, asked = _trace_rows([row])
    assert {3, 2} <= asked[0]  # f - 1 and f - 2 of the first frontier (4)
    assert edges[0].x == min(x for x in range(8) if row[x]) == 2  # type: ignore[attr-defined]
    assert len(notes) == 1 and "x index 2 fires but x index 3 does not" in notes[0]


def test_the_frontier_is_confirmed_by_a_second_firing_point_above_it() -> None:
    """Module docstring: two firing points above the frontier; a quiet point right above the
    first-found frontier breaks monotonicity and is said. Oracle: brute force on a row firing at 3
    and 5..7 (the bisection on x = 7, 3, 1, 2 alone finds 3, never asking 4)."""
    row = [x == 3 or x >= 5 for x in range(8)]
    edges, notes, asked = _trace_rows([row])
    assert 4 in asked[0]
    assert edges[0].x == min(x for x in range(8) if row[x]) == 3  # type: ignore[attr-defined]
    assert len(notes) == 1 and "x index 3 fires but x index 4 does not" in notes[0]


def test_a_walked_row_is_bisected_below_its_lowest_measured_firing_point() -> None:
    """Module docstring: a row whose measured points break monotonicity is bisected again below its
    LOWEST firing point. Oracle: brute force over every row firing set of 6 points where the trace
    says it broke monotonicity: the frontier then is a measured transition (x fires, x - 1 quiet or
    x = 0) at or below every firing point the row measured."""
    import itertools

    for bits in itertools.product([False, True], repeat=6):
        rows = [[x >= 3 for x in range(6)], list(bits)]
        edges, _, asked = _trace_rows(rows)
        f = edges[1].x  # type: ignore[attr-defined]
        firing_asked = [x for x in asked[1] if rows[1][x]]
        if f is None:
            assert not firing_asked
            continue
        assert rows[1][f] and (f == 0 or (f - 1 in asked[1] and not rows[1][f - 1]))
        assert f <= min(firing_asked)


def test_a_rows_vanishing_band_ends_where_every_seed_fell_below_one_over_the_limit() -> None:
    """PhaseMap.band(vanishing=True): the smallest measured x where one of the seeds fell below
    1/limit (the lowest seed's growth), and where all of them did (the highest seed's growth below
    it), not where the quantile did. Oracle: that docstring, by hand on the seeds' ranges."""
    from stabilitycheck.phasemap import Point
    from stabilitycheck.space import Axis
    from stabilitycheck.spread import Spread

    rows = [Spread(0.5, 1.0, 2.0), Spread(0.001, 0.005, 0.05), Spread(0.001, 0.002, 0.005)]
    points = tuple(Point(x, 0, False, g.mid < 0.01, (), g, 5, 0) for x, g in enumerate(rows))
    pm = _map(
        Config.of("mlp"),
        Axis("depth", (1, 2, 3)),
        Axis("init_scale", (1.0,)),
        Limits(vanishing=100.0),
        points,
    )
    some = min(x for x, g in enumerate(rows) if g.low < 1 / 100.0)
    every = min(x for x, g in enumerate(rows) if g.high < 1 / 100.0)
    assert pm.band(0, vanishing=True) == (some, every) == (1, 2)


def test_a_point_where_growth_and_vanishing_both_fired_is_both_exploded_and_vanished() -> None:
    """phasemap.Point.of: `exploded` where a criterion other than vanishing fired, `vanished` where
    vanishing fired, alone or not (an encoder growing beside a decoder vanishing fires both). Oracle:
    the field comments, on a verdict naming both."""
    import dataclasses

    from closed_form import ScaledIdentity

    from stabilitycheck.phasemap import Point
    from stabilitycheck.seeds import assess
    from stabilitycheck.verdicts import Criterion, Verdict

    subject = ScaledIdentity()
    base = assess(subject.config().with_run(seeds=1), subject, Limits())  # type: ignore[arg-type]
    both = Verdict(True, (Criterion("growth", 1e3, 1e2), Criterion("vanishing", 1e-3, 1e-2)))
    p = Point.of(0, 0, dataclasses.replace(base, verdict=both, exploded_seeds=1), Limits())
    assert p.exploded and p.vanished and p.criteria == ("growth", "vanishing")
    alone = Point.of(
        0,
        0,
        dataclasses.replace(base, verdict=Verdict(True, (Criterion("vanishing", 1e-3, 1e-2),))),
        Limits(),
    )
    assert alone.vanished and not alone.exploded


def _map(
    base: Config, x: object, y: object, limits: Limits, points: tuple[object, ...] = (), loss: str = "default"
):  # type: ignore[no-untyped-def]
    from stabilitycheck.phasemap import PhaseMap

    return PhaseMap(
        label="t",
        base=base,
        x=x,
        y=y,
        limits=limits,
        loss=loss,
        init_knob="init_scale",  # type: ignore[arg-type]
        points=points,
        explode=(),
        vanish=None,
        violations=(),
        elapsed=0.0,
        interrupted=False,  # type: ignore[arg-type]
    )


def test_the_theory_frontier_is_where_the_growth_passes_the_limit_strictly() -> None:
    """phasemap.theory: per row the smallest x whose mean-field growth passes the limit, as the
    verdict's growth criterion does: strictly above it (verdicts: value > limit). A linear RNN on its
    last step grows exactly sigma^(T - 1): at sigma = 10 and limit 100, T = 3 gives 100.0 exactly
    (not past it), T = 4 gives 1000. Oracle: that closed form and the strict comparison."""
    from stabilitycheck.phasemap import theory
    from stabilitycheck.space import Axis

    base = Config.of("rnn", activation="linear", init_scale=10.0, seq_len=2)
    pm = _map(
        base,
        Axis("seq_len", (1, 2, 3, 4, 5)),
        Axis("init_scale", (2.0, 10.0)),
        Limits(growth=100.0),
        loss="last",
    )
    want = tuple(
        next((i for i, t in enumerate((1, 2, 3, 4, 5)) if s ** (t - 1) > 100.0), None) for s in (2.0, 10.0)
    )
    assert want == (None, 3)
    assert theory(pm) == want


def test_a_maps_probes_are_every_seed_its_points_spent() -> None:
    """PhaseMap.probes: the seeds probed in all, the sum over its points of the seeds each verdict
    spent (fired or not). Oracle: that sum by hand."""
    from stabilitycheck.phasemap import Point
    from stabilitycheck.space import Axis
    from stabilitycheck.spread import Spread

    s = Spread(1.0, 1.0, 1.0)
    points = (Point(0, 0, False, False, (), s, 3, 0), Point(1, 0, True, False, ("growth",), s, 5, 2))
    pm = _map(Config.of("mlp"), Axis("depth", (1, 2)), Axis("init_scale", (1.0,)), Limits(), points)
    assert pm.probes == 3 + 5 and pm.verdicts == 2
    assert pm.to_dict()["probes"] == 8
