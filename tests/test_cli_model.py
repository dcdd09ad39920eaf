"""`stabilitycheck MODEL.py`: every example end to end, every model-file mistake a one-line exit 2."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stabilitycheck.cli import main
from stabilitycheck.reporttable import headers

ROOT = Path(__file__).resolve().parent.parent
FILES = "tests/modelfiles"
FAST = ["--database", "none", "--max-examples", "20"]
LIMIT = 100.0  # the CLI's default --growth-limit


@pytest.fixture(autouse=True)
def _one_thread_at_the_root(monkeypatch: pytest.MonkeyPatch) -> object:
    """Run from the repository root (labels are the relative paths users type) on one torch thread:
    two intra-op threads on 2 busy cores made a 32-layer Transformer probe 20-70x slower."""
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def columns(line: str) -> list[str]:
    """A table row split into its 10 columns (tabulate separates them by two or more spaces)."""
    cells = [c.strip() for c in line.split("  ") if c.strip()]
    assert len(cells) == len(headers(0.5)), (line, cells)
    return cells


def knob_values(cell: str) -> dict[str, float]:
    """'depth=19 width=8 init_scale=3.0' -> {'depth': 19.0, ...}."""
    return {k: float(v) for k, v in (kv.split("=") for kv in cell.split())}


def assert_header(out: str) -> list[str]:
    """The table's header is the report's, and the rows follow the dashed rule; returns the rows."""
    lines = out.splitlines()
    assert lines[0].split() == " ".join(headers(0.5)).split(), lines[0]
    assert lines[0].startswith("target") and "smallest exploding" in lines[0] and "fixed by" in lines[0]
    assert set(lines[1]) == {"-", " "}
    rows = lines[2:]
    return rows[: rows.index("")] if "" in rows else rows  # the table ends at the first blank line


# --- the examples, end to end --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "knobs", "culprits"),
    [
        # tanh MLP: above the critical init_scale 1.0, gradients grow ~ (gain)^depth towards the input
        ("mlp", {"depth", "width", "init_scale"}, None),
        # tanh RNN with its weights scaled up (init_scale is in SPACE): gradients grow through time
        ("rnn_lm", {"width", "num_layers", "seq_len", "init_scale"}, {"embed", "rnn", "head"}),
    ],
)
def test_exploding_example_exits_1_with_its_row(
    capsys: pytest.CaptureFixture[str], name: str, knobs: set[str], culprits: set[str] | None
) -> None:
    code, out, err = run(capsys, f"examples/{name}.py", *FAST)
    assert code == 1, err
    (row,) = assert_header(out)
    target, device, precision, smallest, criterion, spread, kind, culprit, fixed, probes = columns(row)
    assert (target, device, precision) == (f"examples/{name}.py", "cpu", "float32")  # as typed
    values = knob_values(smallest)
    assert set(values) == knobs
    assert values["init_scale"] > 1.0  # at or below the critical scale these models do not explode
    fired, number, op, limit = criterion.split()
    assert fired == "growth" and op == ">" and float(number) > float(limit) == LIMIT
    if culprits is None:  # every tanh layer amplifies alike: one layer, or the uniform per-block gain
        uniform = re.fullmatch(r"uniform, median gain x(\S+)", culprit)
        assert culprit.startswith("layers.") or float(uniform[1]) > 1  # type: ignore[index]
        assert kind.startswith("exponential")  # gain^depth: geometric in the block index
    else:
        assert culprit in culprits
    growth, seeds = re.fullmatch(r"(\S+) \(\S+-\S+\), (\d+) \(\d+ exploded\)", spread).groups()
    assert float(growth) == float(number) and 1 <= int(seeds) <= 5  # the median over up to --seeds 5
    assert "critical-init" in fixed.split(", ")  # re-probed at init_scale 1.0: stable
    assert int(probes) >= int(seeds)
    assert f"searching examples/{name}.py on cpu" in err and "explodes at" in err
    subject = f"{ROOT / 'examples' / name}.py:build"  # a Config names its model file by absolute path
    assert f"reproduce python -c \"import stabilitycheck as sc; c = sc.Config.of('{subject}'" in out


@pytest.mark.parametrize(
    ("name", "attr", "tried"),
    [
        # a ReLU MLP only 4 layers deep: even init_scale 4 (2.8x the critical sqrt 2) stays below growth 100
        ("fixed_model", "model", {"init_scale"}),
        # post-norm and pre-norm encoders at init: LayerNorm keeps the backward signal bounded
        ("transformer", "build", {"num_layers", "norm_first", "seq_len"}),
    ],
)
def test_stable_example_exits_0_with_the_largest_config_tried(
    capsys: pytest.CaptureFixture[str], name: str, attr: str, tried: set[str]
) -> None:
    code, out, err = run(capsys, f"examples/{name}.py", *FAST)
    assert code == 0, err
    (row,) = assert_header(out)
    target, device, precision, smallest, criterion, spread, _kind, culprit, fixed, probes = columns(row)
    assert (target, device, precision) == (f"examples/{name}.py", "cpu", "float32")
    assert spread.endswith(" (0 exploded)")  # the largest Config tried: no seed exploded
    assert smallest.startswith("stable (tried up to ") and smallest.endswith(")")
    assert set(knob_values(smallest[len("stable (tried up to ") : -1])) == tried
    assert (criterion, culprit, fixed) == ("-", "-", "-")
    # 20 Hypothesis examples, plus the top corner when none exploded; each verdict up to --seeds 5
    assert 1 <= int(probes) <= 21 * 5
    assert "reproduce" not in out and "stable" in err
    # below the table, the largest point tried as it was measured: the blocks, the growth over seeds
    stable_at = f"stable at {smallest[len('stable (tried up to ') : -1]}, the largest point tried"
    assert stable_at in out
    assert re.search(r"\n  kind      .*; blocks: ", out) and f"growth {spread.split(',')[0]} over" in out
    # and how much of the grid that is: the file's SPACE (or init knob's x0.5..x4, 16 values), by hand
    from stabilitycheck.subjects import resolve

    size = math.prod(len(a.values) for a in resolve(f"examples/{name}.py").space().axes)
    judged = re.search(rf"\n  searched  (\d+) of the grid's {size} points judged: stable on those", out)
    assert judged is not None and 1 <= int(judged.group(1)) <= min(size, 21)


RAISES_PAST_10 = """
from torch import nn

SPACE = {"depth": (1, 20)}


class M(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.depth, self.layers = depth, nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))

    def forward(self, x):
        if self.depth > 10:
            raise RuntimeError("too deep")
        for layer in self.layers:
            x = layer(x)
        return x


def build(depth=4):
    return M(depth)
"""


def test_points_skipped_are_not_counted_as_judged_stable(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A model that raises past depth 10 of a 20-point grid: at most the 10 points where it runs are
    judged. The stable row's 'searched' line read '19 of the grid's 20 points judged: stable on those'
    where 9 of them had raised (found by a new user's trial)."""
    (tmp_path / "deep.py").write_text(RAISES_PAST_10)
    js = tmp_path / "deep.json"
    code, out, _ = run(capsys, str(tmp_path / "deep.py"), *FAST, "--json", str(js))
    assert code == 0
    (entry,) = json.loads(js.read_text())
    skipped = len(entry["skipped"])
    assert skipped >= 1 and all("too deep" in s["reason"] for s in entry["skipped"])
    judged = entry["points"] - skipped
    assert 1 <= judged <= 10
    assert f"searched  {judged} of the grid's 20 points judged ({skipped} more skipped): stable" in out


def test_a_stable_rows_judgement_is_in_the_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The largest point tried of a stable row: its judgement (seeds, growth spread, measurement with
    the blocks it was read over), as the table row shows it."""
    js = tmp_path / "fixed.json"
    code, out, _ = run(capsys, "examples/fixed_model.py", *FAST, "--json", str(js))
    assert code == 0
    (entry,) = json.loads(js.read_text())
    judged = entry["largest_stable_judgement"]
    assert entry["counterexample"] is None and not judged["verdict"]["exploded"]
    assert judged["measurement"]["blocks_note"].startswith("blocks: ")
    (row,) = assert_header(out)
    assert columns(row)[5].startswith(f"{judged['growth']['mid']:.3g} (")


def test_fixed_model_searches_init_scale_up_to_4(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "examples/fixed_model.py", *FAST)
    assert "stable (tried up to init_scale=4.0)" in out


def test_console_script_matches_the_in_process_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = Path(sys.executable).with_name("stabilitycheck")
    assert script.exists(), f"console script not installed next to {sys.executable}"
    js = tmp_path / "mlp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(script), "examples/mlp.py", *FAST, "--json", str(js)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    code, out, _ = run(capsys, "examples/mlp.py", *FAST)
    assert code == 1
    assert proc.stdout.splitlines()[:3] == out.splitlines()[:3]  # same seed, same table
    (entry,) = json.loads(js.read_text())
    assert entry["counterexample"]["config"]["subject"] == f"{ROOT / 'examples' / 'mlp.py'}:build"


def test_replay_of_a_model_file_prints_the_same_row(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    js = tmp_path / "rnn.json"
    code, out, _ = run(capsys, "examples/rnn_lm.py", *FAST, "--json", str(js))
    assert code == 1
    (row,) = assert_header(out)
    code2, out2, _ = run(capsys, "examples/rnn_lm.py", "--replay", str(js), *FAST)
    assert code2 == 1
    (row2,) = assert_header(out2)
    assert columns(row2)[:-1] == columns(row)[:-1]  # everything but the probe count
    seeds = re.fullmatch(r".*, (\d+) \(\d+ exploded\)", columns(row)[5])[1]
    assert columns(row2)[-1] == seeds  # one verdict re-judged over the same seeds, no search


GAINED = """
import torch
from torch import nn

SPACE = {"depth": (1, 24)}


def build(depth=4, gain=1.0):
    layers = [nn.Sequential(nn.Linear(16, 16, bias=False), nn.Tanh()) for _ in range(depth)]
    with torch.no_grad():
        for layer in layers:
            layer[0].weight.mul_(gain * 3**0.5)  # sigma_w = gain
    return nn.Sequential(*layers)
"""


def test_replay_names_a_knob_searched_that_the_files_space_lacks(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A knob searched with --knob that the file's SPACE lacks was left out of the replayed row's
    'smallest exploding' (its axes came from the file's SPACE alone), which then read as if the
    default of that knob explodes (found by a new user's trial); the JSON stores the knobs searched."""
    (tmp_path / "gained.py").write_text(GAINED)
    js, name = tmp_path / "gained.json", str(tmp_path / "gained.py")
    knobs = ["--knob", "depth=1:24", "--knob", "gain=1.0:4.0"]  # the knobs given are the space
    code, out, _ = run(capsys, name, *FAST, *knobs, "--json", str(js))
    assert code == 1
    (row,) = assert_header(out)
    (entry,) = json.loads(js.read_text())
    searched = entry["searched"]
    assert searched == ["depth", "gain"]
    assert set(knob_values(columns(row)[3])) == set(searched)
    code2, out2, _ = run(capsys, name, "--replay", str(js), *FAST)
    assert code2 == 1
    (row2,) = assert_header(out2)
    assert columns(row2)[3] == columns(row)[3]


# --- findings: NaN and Inf -----------------------------------------------------------------------


# inf_model's block 1, an nn.Sequential child: quoted, '1' (bare, it read as a count: a user's trial)
@pytest.mark.parametrize(("name", "culprit"), [("nan_model", "(after the last block)"), ("inf_model", "'1'")])
def test_nonfinite_model_is_a_finding(capsys: pytest.CaptureFixture[str], name: str, culprit: str) -> None:
    code, out, err = run(capsys, f"{FILES}/{name}.py", *FAST)
    assert code == 1, err
    (row,) = assert_header(out)
    cells = columns(row)
    assert cells[0] == f"{FILES}/{name}.py"
    assert cells[4] == "nonfinite" and cells[7] == culprit  # inf_model: block 1 overflows
    assert "Traceback" not in err and "error" not in err
    # the text says where and when, not the culprit alone: at init (step 0), which tensor, which block
    assert re.search(
        rf"\n  nonfinite step 0: \w+ of {re.escape(culprit)}, .*(nan|inf), in the profile's seed\n", out
    )


def test_a_backward_nan_says_whose_backward_made_it(capsys: pytest.CaptureFixture[str]) -> None:
    """The nonfinite line named layers.1's output gradient, the culprit column layers.2, with nothing
    linking them (found by a user's trial): it says the backward that made it, as watch() does."""
    code, out, _ = run(capsys, f"{FILES}/backward_nan.py", *FAST)
    assert code == 1
    (row,) = assert_header(out)
    assert columns(row)[7] == "layers.2"
    assert (
        "\n  nonfinite step 0: activation_grad of layers.1, L2 norm nan (made by the backward of layers.2), "
        "in the profile's seed\n" in out
    )


def test_seeds_going_non_finite_too_few_to_fire_are_said(capsys: pytest.CaptureFixture[str]) -> None:
    """A NaN weight in some initialisations, too few to fire at the median: the row read stable, exit
    0, with no word of them (found by a user's trial). A `!` line says how many, and the quantile that
    judges them, which then fires. Oracle: each seed's own probe at the largest point tried."""
    from stabilitycheck.config import Config
    from stabilitycheck.configprobe import probe
    from stabilitycheck.seeds import seed_of

    path = f"{FILES}/nan_some_seeds.py"
    code, out, _ = run(capsys, path, *FAST)
    assert code == 0
    (row,) = assert_header(out)
    top = f"{ROOT / path}:build"
    broken = sum(
        probe(Config.of(top, init_scale=4.0, seed=seed_of(0, k), seeds=1)).first_nonfinite is not None
        for k in range(5)
    )
    assert 0 < broken < 3 and columns(row)[3] == "stable (tried up to init_scale=4.0)"
    q = (5 - broken + 1) / 5
    said = f"! {path}: {broken} of the 5 seeds spent went non-finite (NaN or Inf) at init_scale=4.0, too few"
    assert said in out and f"(--quantile {q:.2g} judges them)" in out
    code, out, _ = run(capsys, path, *FAST, "--quantile", f"{q:.2g}")
    assert code == 1 and re.search(r"\n\S+  +cpu  +float32  +init_scale=0.5  +nonfinite  ", out)


def test_a_stable_row_is_judged_on_every_seed_where_the_top_corner_is_skipped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The model rejects widths above 20 (its top corner is skipped) and makes NaN in most seeds but
    the first: the first seed alone read stable everywhere, and the row said 'stable (tried up to
    width=20)' on that one seed, exit 0. Oracle: assess at width 20 over the seeds, nonfinite."""
    from stabilitycheck.config import Config
    from stabilitycheck.seeds import assess

    path = f"{FILES}/nan_some_seeds_top_rejected.py"
    oracle = assess(Config.of(f"{ROOT / path}:build", width=20))
    assert oracle.exploded and "nonfinite" in oracle.verdict.names
    code, out, err = run(capsys, path, *FAST)
    assert code == 1, err
    (row,) = assert_header(out)
    assert columns(row)[4] == "nonfinite" and not columns(row)[3].startswith("stable")


# --- model-file errors: exit 2, one line on stderr, no traceback ---------------------------------


ERRORS = [
    ("missing", ["{tmp}/nope.py"], ["nope.py: no such file", "e.g. `stabilitycheck examples/mlp.py`"]),
    ("not_py", ["{tmp}/model.txt"], ["model.txt: not a .py file"]),
    ("empty_factory", [f"{FILES}/no_factory.py:"], ["no_factory.py:: no factory name after ':'"]),
    ("syntax", ["{tmp}/syntax.py"], ["syntax.py:3: syntax error"]),
    (
        "raises_on_import",
        [f"{FILES}/raises_on_import.py"],
        ["raises_on_import.py:6:", "RuntimeError: cannot find the dataset"],
    ),
    ("exits_on_import", [f"{FILES}/exits_on_import.py"], ["sys.exit(3)"]),
    (
        "no_factory",
        [f"{FILES}/no_factory.py"],
        ["no top-level `build`", "found top-level names ['WIDTH', 'make_net']"],
    ),
    ("instance_only", [f"{FILES}/only_a_layer.py"], ["found top-level names ['layer']"]),
    ("named_factory", ["examples/mlp.py:make"], ["no top-level `make`", "['SPACE', 'MLP', 'build']"]),
    (
        "no_default",
        [f"{FILES}/no_default.py"],
        ["parameter 'depth' has no default", "SPACE = {'depth': (1, 64)}"],
    ),
    ("knob_reversed", ["examples/mlp.py", "--knob", "depth=5:1"], ["depth=5:1 is empty", "depth=1:5"]),
    ("knob_malformed", ["examples/mlp.py", "--knob", "depth=a:b"], ["--knob 'depth=a:b' is malformed"]),
    ("space_reversed", [f"{FILES}/space_reversed.py"], ["SPACE['depth']=(5, 1) is empty (lo > hi)"]),
    ("space_malformed", [f"{FILES}/space_malformed.py"], ["SPACE['depth']=8 is malformed"]),
    ("space_unknown", [f"{FILES}/space_unknown.py"], ["SPACE names 'detph'"]),
    ("run_named_knob", [f"{FILES}/run_named_knob.py"], ["parameter 'steps' has the name of a run setting"]),
    ("returns_int", [f"{FILES}/returns_int.py"], ["build(width=8) returned an int, not an nn.Module"]),
    (
        "batch_not_tensors",
        [f"{FILES}/batch_not_tensors.py"],
        ["batch(model, batch_size=2) is a list", "not tensors"],
    ),
    (
        "loss_vector",
        [f"{FILES}/loss_vector.py"],
        ["loss_vector.py: loss(output, inputs) (line", "shape (16,), not a scalar"],
    ),
    ("loss_detached", [f"{FILES}/loss_detached.py"], ["the loss does not require grad"]),
    ("no_parameters", [f"{FILES}/no_parameters.py"], ["no parameters that require grad"]),
    ("frozen", [f"{FILES}/frozen.py"], ["error: the model has no parameters that require grad"]),
    ("model_not_module", [f"{FILES}/model_not_module.py"], ["`model` is a str, not an nn.Module"]),
    ("scripted", [f"{FILES}/scripted.py"], ["the model is a TorchScript module", "torch.jit.script(Net())"]),
    ("scripted_block", [f"{FILES}/scripted_block.py"], ["0 is a TorchScript module", "eager nn.Module"]),
    # torch's Adam raises on sparse gradients (test_sparse_gradients_break_torchs_adam): the
    # optimiser is named, not the knobs
    (
        "sparse_adam",
        [f"{FILES}/sparse_embedding.py", "--steps", "2", "--optimizer", "adam"],
        ["--optimizer adam cannot step the sparse gradients of emb", "--optimizer sgd"],
    ),
]


def test_a_model_running_inside_the_space_alone_is_searched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Knobs that go together at neither corner (3 heads divide neither width 64 nor 128, but 96): the
    pre-flight tried the two corners only and exited 2, where the search skips the points that fail
    with the reason and judges the others. Oracle: which widths divide by 3."""
    model = tmp_path / "heads.py"
    model.write_text(
        "from torch import nn\n"
        "SPACE = {'width': (64, 128, 32)}\n"
        "def build(width=96, heads=3):\n"
        "    if width % heads:\n"
        "        raise ValueError(f'width {width} is not divisible by {heads} heads')\n"
        "    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))\n"
    )
    code, out, err = run(capsys, str(model), *FAST)
    assert code == 0, err
    assert "stable (tried up to width=96)" in out
    assert "2 configuration(s) skipped, e.g. width=" in out and "not divisible by 3 heads" in out


def test_sparse_gradients_break_torchs_adam() -> None:
    """The oracle of the sparse_adam error: torch's own Adam raises at the first step on this model,
    and SGD steps it (so the search with --optimizer sgd runs)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("sparse_embedding", f"{FILES}/sparse_embedding.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, ok in (("adam", False), ("sgd", True)):
        model = module.build()
        opt = (torch.optim.Adam if name == "adam" else torch.optim.SGD)(model.parameters(), lr=1e-3)
        model(module.batch(model)).sum().backward()
        if ok:
            opt.step()
        else:
            with pytest.raises(RuntimeError, match="sparse"):
                opt.step()


UNKNOWN_KNOBS = [
    # a typo: the message lists the file's knobs
    ("typo", ["examples/mlp.py", "--knob", "detph=1:4"], ["'detph'", "['depth', 'init_scale', 'width']"]),
    # a Config field the model file never reads: an error, not a silent search of nothing
    (
        "config_field",
        ["examples/transformer.py", "--knob", "depth=1:8"],
        ["'depth'", "['batch_size', 'init_scale', 'norm_first', 'num_layers', 'seq_len']"],
    ),
    ("fixed_model", ["examples/fixed_model.py", "--knob", "width=1:8"], ["'width'", "['init_scale']"]),
]


def error_argv(argv: list[str], tmp_path: Path) -> list[str]:
    (tmp_path / "model.txt").write_text("x = 1\n")
    (tmp_path / "syntax.py").write_text("import torch\n\ndef build(depth=4:\n    pass\n")
    return [a.replace("{tmp}", str(tmp_path)) for a in argv]


def assert_one_line_error(code: int, out: str, err: str, fragments: list[str]) -> None:
    assert code == 2, err
    assert out == ""
    assert err.startswith("stabilitycheck: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


TORCHSCRIPT = pytest.mark.filterwarnings("ignore::DeprecationWarning")
"""The scripted* model files build TorchScript modules on purpose (to check they are refused); torch
2.13 deprecates torch.jit.script with a DeprecationWarning, which is no error of theirs. (By category,
not by torch's wording; only these parameters carry the mark.)"""


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [pytest.param(*e[1:], id=e[0], marks=TORCHSCRIPT if e[0].startswith("scripted") else ()) for e in ERRORS],
)
def test_model_file_error_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], fragments: list[str]
) -> None:
    code, out, err = run(capsys, *error_argv(argv, tmp_path), *FAST)
    assert_one_line_error(code, out, err, fragments)


@pytest.mark.parametrize(
    ("argv", "fragments"), [e[1:] for e in UNKNOWN_KNOBS], ids=[e[0] for e in UNKNOWN_KNOBS]
)
def test_unknown_knob_names_the_files_knobs(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragments: list[str]
) -> None:
    code, out, err = run(capsys, *argv, *FAST)
    assert_one_line_error(code, out, err, fragments)


def test_debug_shows_the_traceback_through_the_models_own_code(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A model that raises at every point is one line naming the line of its code; --debug showed only
    this package's frames, none of the model's, nothing chained (a new user's trial)."""
    path = tmp_path / "nested.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n\ndef helper(x):\n    return x @ torch.ones(3, 3)\n\n\n"
        "def build(depth=3):\n    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(depth)])\n\n\n"
        "class Loss:\n    def __call__(self, output, inputs):\n        return helper(output).sum()\n\n\n"
        "loss = Loss()\n\n\ndef batch(model, batch_size=4):\n    return torch.randn(batch_size, 8)\n"
    )
    code, _, err = run(capsys, str(path), "--debug", *FAST)
    assert code == 2 and "nested.py:6 in helper" in err.splitlines()[-1]
    assert f'"{path}", line 6, in helper' in err and "direct cause" in err


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, f"{FILES}/no_factory.py", "--debug", *FAST)
    assert code == 2 and out == ""
    assert err.startswith("Traceback (most recent call last):")
    assert "ModelFileError" in err
    assert err.splitlines()[-1].startswith("stabilitycheck: error: ") and "no top-level `build`" in err


def test_a_models_warnings_before_its_error_are_not_printed() -> None:
    """`--knob width=0`: torch warns about zero-element tensors on the way to the model's own error,
    and the warning's two lines came before the one-line error (a subprocess: pytest records warnings
    in process)."""
    argv = ["examples/mlp.py", "--knob", "width=0", "--database", "none"]
    proc = subprocess.run(
        [sys.executable, "-m", "stabilitycheck", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("stabilitycheck: error: ") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize("how", ["script", "module"])
def test_console_script_error_is_one_line(tmp_path: Path, how: str) -> None:
    """The console script and `python -m stabilitycheck` (which would not run) alike."""
    script = Path(sys.executable).with_name("stabilitycheck")
    command = [str(script)] if how == "script" else [sys.executable, "-m", "stabilitycheck"]
    proc = subprocess.run(
        [*command, str(tmp_path / "nope.py")], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("stabilitycheck: error: ") and proc.stderr.count("\n") == 1


ZERO_HEAD = """
import torch
from torch import nn


class ZeroHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 4)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build() -> nn.Module:
    return ZeroHead()


example_input = torch.randn(4, 8)
"""


def _notes(capsys: pytest.CaptureFixture[str], path: Path, source: str) -> list[str]:
    """The `!` lines under the report of a search of the model file `source`, written at `path`."""
    path.write_text(source)
    code, out, _ = run(capsys, str(path), *FAST)
    assert code == 0
    return [line for line in out.splitlines() if line.startswith("! ")]


ATTN_FIRST = """
import torch
from torch import nn


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h):
        y = torch.tanh(self.lin(h))
        return torch.softmax(y[:, :4], -1), y


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            _, x = layer(x)
        return x


def build() -> nn.Module:
    return Net()


example_input = torch.randn(4, 8)
"""


def test_blocks_returning_their_chain_second_are_named_as_a_cause(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Layers returning (attn, h) are read on attn, which the loss does not reach: the note blamed a
    zero-initialised head or a loss not depending on the blocks alone (an audit's case)."""
    (note,) = _notes(capsys, tmp_path / "attn_first.py", ATTN_FIRST)
    assert "growth not measured" in note and "(attn, h), read on the first: return h first" in note


def test_a_zero_initialised_head_is_said_unmeasured_and_read_after_one_step(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """torchvision's VisionTransformer and timm's MLP-Mixer start with a zero head: at step 0 no
    gradient reaches a block, every gain is 0 / 0, and a stable row said only that nothing grew, with
    no word of it (found by a trial on third-party models). The report says the growth was not
    measured; with --steps 1 the profile is read after the update and the note goes."""
    path = tmp_path / "zero_head.py"
    (note,) = _notes(capsys, path, ZERO_HEAD)
    assert "growth not measured: no gradient reached any block output at step 0" in note
    assert "--steps 1" in note
    code, out, _ = run(capsys, str(path), *FAST, "--steps", "1")
    assert code == 0 and "growth not measured" not in out
    assert "nan" not in columns(out.splitlines()[2])[5]


def _written(path: Path, source: str) -> Any:
    """The model file `source`, written at `path` and imported (for torch's own oracle on it)."""
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OVERFLOWING = """
import torch
from torch import nn

SPACE = {"depth": (1, 4)}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16, bias=False)
        nn.init.orthogonal_(self.fc.weight)

    def forward(self, x):
        return self.fc(x) * 100.0


class Net(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x / x.detach().abs().amax())


def build(depth=2):
    return Net(depth)


def batch(model, batch_size=8):
    return torch.randn(batch_size, 16)


def loss(out, inputs):
    return out.sum()
"""


def test_a_forward_that_overflowed_is_not_also_said_unmeasured(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A float16 forward overflows (x100 a block, Inf at depth 3) and the head divides by its Inf largest
    entry: no gradient reaches a block, and under the nonfinite finding the report also said 'growth
    not measured ... initialise the head', advice that does not apply (found by an audit of faulty
    models). Oracle: torch, the float16 forward's last block output holds Inf and every dL/d output
    is 0 (growth judged off: at x100 a block it fires first)."""
    path = tmp_path / "overflowing.py"
    module = _written(path, OVERFLOWING)
    net = module.build(3).half()
    outs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: object, out: torch.Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    for layer in net.layers:
        layer.register_forward_hook(keep)
    net(torch.randn(8, 16, dtype=torch.float16)).sum().backward()
    assert torch.isinf(outs[-1]).any() and all(not bool(o.grad.any()) for o in outs)
    code, out, _ = run(capsys, str(path), *FAST, "--dtype", "float16", "--growth-limit", "off")
    assert code == 1 and "nonfinite step 0: activation of layers.2" in out
    assert "growth not measured" not in out


CELL_PATH = """
import math

import torch
from torch import nn

SPACE = {"seq_len": (3, 16)}


class Loop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(6, 6)
        with torch.no_grad():
            for p in self.cell.parameters():
                p.zero_()
            self.cell.bias_ih[6:12] = math.log(0.999 / 0.001)  # forget gate 0.999, no recurrent weight

    def stability_blocks(self):
        return [("cell", self.cell)]

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], 6)
        outs = []
        for x_t in x.unbind(1):
            h, c = self.cell(x_t, (h, c))
            outs.append(h)
        return torch.stack(outs, 1)


def build():
    return Loop()


def batch(model, seq_len=8, batch_size=3):
    return torch.ones(batch_size, seq_len, 6)


def loss(output, inputs):
    return output[:, -1].sum()
"""


def test_an_lstm_cell_is_read_on_its_whole_state_h_and_c(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An nn.LSTMCell's next call takes (h, c): its chain is both. With no recurrent weight, dL/dh of
    every step but the last is 0 while the cell state carries the gradient back (x0.999 a step): read
    on h alone, this was growth 0, a dead layer, vanishing (found by a theory audit of gated cells).
    Oracle: torch's dL/dh_t and dL/dc_t of the unrolled cell at the largest point, c_t's through the
    next step alone (an alias of it is what the next step takes), their joint norm at the first step
    over the last's."""
    path = tmp_path / "cell_path.py"
    module = _written(path, CELL_PATH)
    model = module.build()
    x = module.batch(model, seq_len=16)
    h = c = x.new_zeros(x.shape[0], 6)
    hs, cs = [], []
    for x_t in x.unbind(1):
        h, c = model.cell(x_t, (h, c))
        c = c.view_as(c)
        hs.append(h)
        cs.append(c)
    grads = torch.autograd.grad(module.loss(torch.stack(hs, 1), x), hs + cs, allow_unused=True)
    dh, dc = grads[:16], [torch.zeros(()) if g is None else g for g in grads[16:]]
    assert not bool(dh[0].any()) and bool(dc[0].any())  # the gradient goes back through c alone
    joint = [math.hypot(a.norm().item(), b.norm().item()) for a, b in zip(dh, dc, strict=True)]
    js = tmp_path / "cell.json"
    code, out, _ = run(capsys, str(path), *FAST, "--vanishing-limit", "100", "--json", str(js))
    assert code == 0 and "passes no gradient" not in out
    (entry,) = json.loads(js.read_text())
    judged = entry["largest_stable_judgement"]
    assert entry["largest_stable"]["knobs"]["seq_len"] == 16
    assert judged["growth"]["mid"] == pytest.approx(joint[0] / joint[-1], rel=1e-5)


AMPLIFIED = """
import torch
from torch import nn

SPACE = {"depth": (2, 4)}


class Amplified(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(depth))
        for layer in self.layers:
            nn.init.orthogonal_(layer.weight)

    def forward(self, x):
        for layer in self.layers:
            x = 50.0 * layer(x)
        return x


def build(depth: int = 2) -> nn.Module:
    return Amplified(depth)


example_input = torch.randn(4, 8)
"""


def test_a_model_exploding_at_the_lowest_corner_is_said_to(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Each layer's output is multiplied by 50 before the next (orthogonal W): the gradient's norm is
    past 1e3 from the smallest depth in SPACE on, so the point reported is the lowest corner, which the
    report now says, with what to do (a trial's ResNet-18, exploding at its own init, read
    init_scale=0.5, the lowest value tried, as if a crossing had been found there)."""
    path = tmp_path / "amplified.py"
    path.write_text(AMPLIFIED)
    code, out, _ = run(capsys, str(path), *FAST)
    assert code == 1
    assert columns(out.splitlines()[2])[3] == "depth=2"
    (note,) = [line for line in out.splitlines() if "lowest corner" in line]
    assert "every knob is at its smallest value" in note and "--knob" in note
    code, out, _ = run(capsys, str(path), "--knob", "depth=3", *FAST)  # no axis searched: no corner
    assert code == 1 and "lowest corner" not in out  # it read 'lowest corner of the space searched ()'


def test_a_non_finite_input_is_said_to_be_the_inputs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A NaN in example_input explodes every point, and the lowest corner's note said to lower the
    ranges to find where it stops (found by a user's trial): no knob changes the input. The note says
    it is the input. Oracle: the input is NaN by construction."""
    path = tmp_path / "nan_input.py"
    path.write_text(
        "import math\nimport torch\nfrom torch import nn\n"
        "model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))\n"
        "example_input = torch.full((4, 8), math.nan)\n"
    )
    code, out, _ = run(capsys, str(path), *FAST)
    assert code == 1
    (note,) = [line for line in out.splitlines() if "note" in line and "input" in line]
    assert "the model's input is non-finite" in note and "--knob" not in note


ZERO_TOWER = """
import torch
from torch import nn


class Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.b = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.gate = nn.Parameter(torch.zeros(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h, g = x, x
        for block in self.a:
            h = block(h)
        for block in self.b:
            g = block(g)
        return self.head(g + self.gate * h)


model, example_input = Towers(), torch.randn(4, 8)
"""


DEAD_LAYER = """
import torch
from torch import nn


class Dead(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(depth))
        nn.init.constant_(self.blocks[2][0].bias, -100.0)  # every input of its ReLU negative
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


model, example_input = Dead(5), torch.randn(4, 8)
"""


def test_a_dead_layer_is_said_to_pass_no_gradient(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A ReLU whose inputs are all negative passes no gradient back: growth exactly 0, a stable row
    with no word of it (found by a user's trial). Oracle: torch's gradients, 0 at blocks.1's output and
    before it, nonzero at blocks.2's."""
    namespace: dict[str, object] = {}
    exec(DEAD_LAYER, namespace)  # the model file's own text, for the oracle
    model, x = namespace["model"], namespace["example_input"]
    assert isinstance(model, nn.Module) and isinstance(x, torch.Tensor)
    outs: list[torch.Tensor] = []
    h = x
    for block in model.blocks:  # type: ignore[union-attr]
        h = block(h)
        h.retain_grad()
        outs.append(h)
    model.head(h).square().sum().backward()  # type: ignore[operator]
    assert [bool(o.grad.abs().sum() > 0) for o in outs] == [False, False, True, True, True]  # type: ignore[union-attr]
    (note,) = _notes(capsys, tmp_path / "dead.py", DEAD_LAYER)
    assert "growth 0: the backward of blocks.2 passes no gradient" in note and "at blocks.1" in note


UNDERFLOW = """
import torch
from torch import nn

SPACE = {"seq_len": (150, 200, 50)}


class Loop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.RNNCell(8, 32), nn.Linear(32, 5)
        with torch.no_grad():
            w = torch.randn(32, 32)
            self.cell.weight_hh.copy_(w * (0.9 / torch.linalg.matrix_norm(w, ord=2)))

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 32)
        for x_t in x.unbind(1):
            h = self.cell(x_t, h)
        return self.head(h)


def build():
    return Loop()


def batch(model, seq_len=50, batch_size=8):
    return torch.randn(batch_size, seq_len, 8)
"""


def test_a_gradient_that_underflowed_to_0_is_said_so_not_a_dead_layer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A tanh RNN cell with largest singular value 0.9 over 200 steps, loss on the last: in float32
    dL/dh_t underflows to exactly 0 at the early steps, and the note named a dead layer, a ReLU or a
    zero weight (a theory audit). Oracle: torch's own gradients of the same model and inputs, exactly
    0 at step 0 in float32, not in float64, and the last nonzero one below float32's smallest normal."""
    path = tmp_path / "underflow.py"
    module = _written(path, UNDERFLOW)
    torch.manual_seed(0)
    model, x = module.build(), module.batch(None, seq_len=200)
    for dtype, zero in ((torch.float64, False), (torch.float32, True)):
        m = model.to(dtype)
        h, hs = x.new_zeros(8, 32, dtype=dtype), []
        for x_t in x.to(dtype).unbind(1):
            h = m.cell(x_t, h)
            hs.append(h)
        grads = [g.double().norm().item() for g in torch.autograd.grad(m.head(h).sum(), hs)]
        assert (grads[0] == 0) == zero
    assert 0 < next(g for g in grads if g > 0) < torch.finfo(torch.float32).tiny
    (note,) = _notes(capsys, path, UNDERFLOW)
    assert "growth 0: the gradient underflowed to 0 in float32" in note and "dead layer" not in note


def test_a_dead_relu_in_float16_is_no_underflow(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """float16's smallest normal number, 6.1e-5, is an ordinary gradient norm: a ReLU dead in every
    precision (bias -100), its loss weighted 1e-3, read 'underflowed to 0 in float16' (a review).
    Oracle: float64 reads growth 0 too, exactly."""
    path = tmp_path / "dead16.py"
    source = (
        "import torch\nfrom torch import nn\n\nSPACE = {'depth': (4, 5)}\n\n\ndef build(depth=4):\n"
        "    layers = []\n    for i in range(depth):\n        lin = nn.Linear(32, 32)\n        if i == 1:\n"
        "            nn.init.constant_(lin.bias, -100.0)\n        layers += [lin, nn.ReLU()]\n"
        "    return nn.Sequential(*layers, nn.Linear(32, 1))\n\n\ndef batch(model):\n"
        "    return torch.randn(8, 32)\n\n\ndef loss(output, inputs):\n    return 1e-3 * output.mean()\n"
    )
    path.write_text(source)
    code, out, _ = run(capsys, str(path), "--dtype", "float64", *FAST)
    assert code == 0 and "growth 0 (0-0)" in out
    code, out, _ = run(capsys, str(path), "--dtype", "float16", *FAST)
    (note,) = [line for line in out.splitlines() if line.startswith("! ") and "growth 0" in line]
    assert "passes no gradient" in note and "underflowed to 0 in float16" not in note


def test_a_float16_gradient_below_its_smallest_normal_names_underflow_beside_a_dead_layer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A bias-free linear stack at sigma_w 0.25 in float16 (no dead layer): float64 reads growth 0.25^14
    or so, float16 reads 0, its last nonzero gradient norm below float16's smallest normal number. The
    note named a dead layer alone (a theory audit); it offers the underflow too, the two readings a
    norm that small has in float16. Oracle: float64's growth is not 0."""
    path = tmp_path / "linear16.py"
    source = (
        "import torch\nfrom torch import nn\n\nSPACE = {'depth': (14, 14)}\n\n\ndef build(depth=14):\n"
        "    layers = [nn.Linear(64, 64, bias=False) for _ in range(depth)]\n    for lin in layers:\n"
        "        nn.init.normal_(lin.weight, std=0.25 / 8)\n    return nn.Sequential(*layers)\n\n\n"
        "def batch(model):\n    return torch.randn(4, 64)\n"
    )
    path.write_text(source)
    code, out, _ = run(capsys, str(path), "--dtype", "float64", *FAST)
    assert code == 0 and "growth 0 " not in out
    code, out, _ = run(capsys, str(path), "--dtype", "float16", *FAST)
    (note,) = [line for line in out.splitlines() if line.startswith("! ") and "growth 0" in line]
    assert "passes no gradient" in note and "or an underflow to 0 in float16" in note, note


def test_a_chain_no_gradient_reaches_is_said_unread(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A tower behind a zero-initialised gate: every dL/d output of its chain is exactly 0 (torch's
    gradients through a zero scale), its growth 0 / 0, and the model's NaN; a stable row said nothing
    of it (timm's RegNet, found in an audit). The report says the growth was not read."""
    (note,) = _notes(capsys, tmp_path / "zero_tower.py", ZERO_TOWER)
    assert "growth not read: every dL/d output of a chain of its blocks is 0" in note


DEAD = """
import torch
from torch import nn

SPACE = {"depth": (2, 8)}


def build(depth=4):
    layers = [nn.Linear(8, 8, bias=False) for _ in range(depth)]
    for layer in layers[:-1]:
        nn.init.zeros_(layer.weight)
    return nn.Sequential(*layers)
"""


def test_a_model_vanishing_at_the_lowest_corner_is_said_to_vanish(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Zero weights before the last layer: no gradient reaches the first block's output at any
    depth (growth 0), so with --vanishing-limit the lowest corner vanishes; the note said the model
    'explodes there already'."""
    path = tmp_path / "dead.py"
    path.write_text(DEAD)
    code, out, _ = run(capsys, str(path), "--vanishing-limit", "100", *FAST)
    assert code == 1
    (note,) = [line for line in out.splitlines() if "lowest corner" in line]
    assert "the model vanishes there already" in note and "explodes" not in note


TANH_STACK = """
import torch
from torch import nn

SPACE = {"depth": (1, 40)}
@EXTRA@

class Net(nn.Module):
    def __init__(self, depth):
        super().__init__()
        blocks = [nn.Sequential(nn.Linear(32, 32, bias=False), nn.Tanh()) for _ in range(depth)]
        self.layers = nn.ModuleList(blocks)
        for blk in self.layers:
            nn.init.normal_(blk[0].weight, std=2.5 / 32**0.5)

    def forward(self, x):
@FORWARD@
        for blk in self.layers:
            x = blk(x@NOISE@)
        return x

    def stability_blocks(self):
        return [(f"layers.{i}", m) for i, m in enumerate(self.layers)]


def build(depth=4):
    return Net(depth)


def batch(model):
    return torch.randn(16, 32)


def loss(output, inputs):
    return (output * torch.randn(output.shape, generator=torch.Generator().manual_seed(1234))).sum()
"""


def _stack(extra: str = "", forward: str = "", noise: str = "") -> str:
    return TANH_STACK.replace("@EXTRA@", extra).replace("@FORWARD@", forward).replace("@NOISE@", noise)


def test_a_stable_rows_bracket_says_where_the_limit_lies_inside_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A tanh stack at sigma_w 2.5 at depth 21, where the median growth sits near 100 (98 over 1500
    seeds, found in an audit): stable on seeds 0.., its bracket around the limit. An exploding row
    says the limit lies inside its bracket; a stable one did not (it was given no limits). Oracle:
    the line's own bracket against the limit 100. (Searched over depth 1-21, depth 20 explodes on
    these seeds: the median is no monotone function of depth this near the limit.)"""
    path = tmp_path / "stack.py"
    path.write_text(_stack())
    code, out, _ = run(capsys, str(path), "--knob", "depth=21", "--grad-norm-limit", "off", *FAST)
    (line,) = [x for x in out.splitlines() if x.strip().startswith("bracket") and " growth " in x]
    low, high = map(float, re.search(r"lies in ([0-9.e+]+)-([0-9.e+]+)", line).groups())  # type: ignore[union-attr]
    assert code == 0 and low < 100 < high, line
    assert "the limit 100 lies inside it" in line


def test_an_interrupted_rows_note_does_not_call_it_1_minimal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The model raises KeyboardInterrupt (as Ctrl-C) on its 40th forward (past an exploding verdict
    on all seeds, before the descent's end): the row says it was not verified minimal, and the note
    under it said 'the point reported is 1-minimal' (an audit)."""
    path = tmp_path / "stopped.py"
    forward = "        global CALLS\n        CALLS += 1\n        if CALLS == 40:\n"
    forward += "            raise KeyboardInterrupt"
    path.write_text(_stack(extra="CALLS = 0", forward=forward))
    code, out, _ = run(capsys, str(path), "--knob", "depth=1:40", "--grad-norm-limit", "off", *FAST)
    assert code == 130 and "not verified minimal" in out, out
    notes = [x for x in out.splitlines() if x.strip().startswith("note")]
    assert not any("is 1-minimal" in x for x in notes), notes


def test_a_forward_drawing_from_numpy_reads_the_same_numbers_whatever_numpy_stood_at(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A forward scaling each block's input by np.random.uniform(0.8, 1.2): the same seed read other
    growths in every process (numpy's global generator was seeded for build() and batch() only; found
    in an audit). Oracle: two runs from two numpy states give the same JSON values."""
    import numpy as np

    path = tmp_path / "noisy.py"
    path.write_text(_stack(extra="import numpy as np", noise=" * float(np.random.uniform(0.8, 1.2))"))
    got = []
    for state in (1, 2):
        np.random.seed(state)
        code, _, _ = run(
            capsys, str(path), "--knob", "depth=1:30", "--json", str(tmp_path / f"{state}.json"), *FAST
        )
        assert code in (0, 1)
        got.append(json.loads((tmp_path / f"{state}.json").read_text()))
    assert _without_times(got[0]) == _without_times(got[1])


def _without_times(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("elapsed_s",)} for r in results]
