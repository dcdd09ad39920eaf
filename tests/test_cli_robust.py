"""The CLI under bad input and bad luck: every bad flag value is one line and exit 2; nothing found is
lost on Ctrl-C, SIGTERM or a model failing at some knob values; replay is data, not code; the same
seed gives the same table whatever the example database holds."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from signalled import stopped_when_marked

from stabilitycheck import _command, cli

EXPLODING = """
import torch
from torch import nn

SPACE = {"depth": (1, 40)}
COUNT = {}

def build(depth=4, init_scale=3.0):
    {guard}
    layers = [nn.Linear(16, 16, bias=False) for _ in range(depth)]
    for layer in layers:
        nn.init.normal_(layer.weight, std=init_scale / 4)
    return nn.Sequential(*[nn.Sequential(l, nn.Tanh()) for l in layers])
"""


def _file(tmp_path: Path, guard: str = "pass", name: str = "model.py") -> Path:
    path = tmp_path / name
    path.write_text(EXPLODING.replace("{guard}", guard))
    return path


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


FUZZ = {
    "--max-examples": ["x", "-3", "0", "nan", ""],
    "--seed": ["x", "-1", "nan", "", str(2**40)],
    "--seeds": ["x", "-1", "0", "nan", ""],
    "--quantile": ["x", "-0.5", "0", "nan", "", "1.5"],
    "--steps": ["x", "-1", "nan", ""],
    "--lr": ["x", "-1", "0", "nan", "", "inf"],
    "--clip": ["x", "-1", "0", "nan", ""],
    "--growth-limit": ["x", "-1", "0", "nan", "", "0.5", "inf"],
    "--grad-norm-limit": ["x", "-1", "0", "nan", ""],
    "--divergence-limit": ["x", "-1", "0", "nan", "", "0.5"],
    "--vanishing-limit": ["x", "-1", "0", "nan", "", "0.5"],
    "--probe-timeout": ["x", "-1", "0", "nan", ""],
    "--optimizer": ["x", ""],
    "--amp": ["x"],
    "--dtype": ["fp8", ""],
    "--device": ["tpu", ""],
    "--knob": ["depth", "depth=a:b", "depth=nan:3", "=1:2", "depth=3:1", "nope=1:2"],
    "--family": ["mpl", ""],
    "--database": ["", " ", "/etc/hostname", "/proc/nowhere"],  # empty: Hypothesis filled the current
    # directory with hash folders; a file or an unwritable place was taken and nothing kept (a trial)
}


@pytest.mark.parametrize(("flag", "value"), [(f, v) for f, vs in FUZZ.items() for v in vs])
def test_every_bad_flag_value_is_one_line_and_exit_2(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(["zoo", "--database", "none", "--quiet", flag, value], capsys)
    assert code == cli.EXIT_USAGE, (flag, value, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stabilitycheck: error:"), err
    assert "Traceback" not in err and out == ""


def test_replay_never_imports_a_model_file_it_is_not_told_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "imported.txt"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + EXPLODING.replace("{guard}", "pass"))
    record = {"schema": 2, "subject": f"{evil}:build", "knobs": {"depth": 3, "init_scale": 3.0}, "run": {}}
    stored = tmp_path / "found.json"
    stored.write_text(json.dumps([{"label": "mlp", "counterexample": {"config": record}}]))
    for argv in (
        ["--replay", str(stored)],
        ["zoo", "--replay", str(stored)],
        ["mlp", "--replay", str(stored)],
    ):
        code, _, err = _run(argv, capsys)
        assert code == cli.EXIT_USAGE and str(evil) in err, err
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{", "JSON"),
        ('{"a": 1}', "expected the list"),
        ('[{"counterexample": {"x": 1}}]', "no 'config'"),
        ("[]", "holds no counterexample to replay"),  # printed a header-only table, exit 0
        ('[{"counterexample": null}]', "holds no counterexample to replay"),
        # a map's JSON read 'expected the list written by --json, got dict', though --json wrote it
        ('{"label": "mlp", "x": {}, "y": {}, "points": []}', "it is a phase map's JSON"),
    ],
)
def test_replay_json_of_the_wrong_shape_is_exit_2(
    tmp_path: Path, content: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = tmp_path / "bad.json"
    stored.write_text(content)
    code, _, err = _run(["--replay", str(stored)], capsys)
    assert code == cli.EXIT_USAGE and needle in err, err
    stored.write_bytes(b"\xff\xfe[")
    code, _, err = _run(["--replay", str(stored)], capsys)
    assert code == cli.EXIT_USAGE and "UTF-8" in err, err
    code, _, err = _run(["--replay", str(tmp_path / "missing.json")], capsys)
    assert code == cli.EXIT_USAGE and "missing.json: no such file; give the JSON file" in err, err


def test_ctrl_c_during_the_remedies_keeps_the_counterexample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from stabilitycheck import searching

    real = searching.try_remedies

    def interrupted(*args: object, **kwargs: object) -> object:
        for i, remedy in enumerate(real(*args, **kwargs)):  # type: ignore[arg-type]
            if i == 1:
                raise KeyboardInterrupt
            yield remedy

    monkeypatch.setattr(searching, "try_remedies", interrupted)
    out_json = tmp_path / "out.json"
    code, _, _ = _run(
        [str(_file(tmp_path)), "--database", "none", "--seeds", "1", "--quiet", "--json", str(out_json)],
        capsys,
    )
    assert code == cli.EXIT_INTERRUPTED
    data = json.loads(out_json.read_text())
    cx = data[0]["counterexample"]
    assert data[0]["interrupted"] and cx is not None and len(cx["remedies"]) == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_report_is_written_loses_none_of_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """A signal landing while a finished search's Markdown is built: the Markdown, the JSON and the
    report on stdout are all written, then the run stops with the signal's exit code (it exited 143
    with nothing on stdout and no Markdown)."""
    from stabilitycheck import report

    real = report.markdown

    def signalled(results: object, left: object = ()) -> str:
        signal.raise_signal(signum)
        return real(results, left)  # type: ignore[arg-type]

    monkeypatch.setattr(report, "markdown", signalled)
    out_json, out_md = tmp_path / "out.json", tmp_path / "out.md"
    argv = [str(_file(tmp_path)), "--database", "none", "--seeds", "1", "--quiet"]
    code, out, _ = _run([*argv, "--json", str(out_json), "--markdown", str(out_md)], capsys)
    assert code == (cli.EXIT_TERMINATED if signum == signal.SIGTERM else cli.EXIT_INTERRUPTED)
    assert "depth=" in out and "depth=" in out_md.read_text()
    assert json.loads(out_json.read_text())[0]["counterexample"] is not None


MAP_AXES = ["--x", "depth", "--y", "init_scale"]


def test_a_signal_while_a_map_is_written_loses_none_of_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for `map`: its JSON, Markdown and text are written, then exit 143."""
    from stabilitycheck import maptext

    real = maptext.markdown

    def signalled(pm: object) -> str:
        signal.raise_signal(signal.SIGTERM)
        return real(pm)  # type: ignore[arg-type]

    monkeypatch.setattr(maptext, "markdown", signalled)
    out_json, out_md = tmp_path / "map.json", tmp_path / "map.md"
    argv = ["map", "mlp", *MAP_AXES, "--knob", "depth=1:3", "--knob", "init_scale=1:2"]
    code, out, _ = _run(
        [*argv, "--seeds", "1", "--quiet", "--json", str(out_json), "--markdown", str(out_md)], capsys
    )
    assert code == cli.EXIT_TERMINATED
    assert out.strip() and out_md.read_text().strip() and json.loads(out_json.read_text())["points"]


def test_a_map_stopped_by_the_model_says_why_even_under_a_signal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map whose model fails at a point ends with a line saying why; a signal held while the map was
    written raised before that line was printed (a review): it is printed with the map."""
    from stabilitycheck import maptext

    real = maptext.markdown

    def signalled(pm: object) -> str:
        signal.raise_signal(signal.SIGTERM)
        return real(pm)  # type: ignore[arg-type]

    monkeypatch.setattr(maptext, "markdown", signalled)
    path = _file(tmp_path, "if depth >= 3: raise RuntimeError('cannot be this deep')")
    argv = ["map", str(path), *MAP_AXES, "--knob", "depth=1:4", "--knob", "init_scale=1:2"]
    code, _, err = _run([*argv, "--seeds", "1", "--quiet", "--markdown", str(tmp_path / "map.md")], capsys)
    assert code == cli.EXIT_TERMINATED and "cannot be this deep" in err


def test_a_model_failing_at_some_depths_keeps_the_findings_below(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path, "if depth >= 20: raise MemoryError('no room at depth %d' % depth)")
    out_json = tmp_path / "out.json"
    code, out, _ = _run(
        [str(path), "--database", "none", "--seeds", "1", "--quiet", "--json", str(out_json)], capsys
    )
    assert code == cli.EXIT_FOUND
    data = json.loads(out_json.read_text())[0]
    assert data["counterexample"]["config"]["knobs"]["depth"] < 20
    assert all(s["config"]["knobs"]["depth"] >= 20 for s in data["skipped"])
    assert "skipped" in out


def test_a_model_calling_sys_exit_is_not_reported_stable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path, "import sys; sys.exit(0)")
    code, _, err = _run([str(path), "--database", "none", "--quiet"], capsys)
    assert code == cli.EXIT_USAGE and "sys.exit(0)" in err


def test_the_memory_guard_skips_a_model_that_would_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Oracle: the meta-device estimate of the factory grows with width; a width whose parameters alone
    exceed the allowed budget is skipped, never built."""
    from stabilitycheck import searching

    monkeypatch.setattr(searching, "free_memory", lambda device: 2 * 4 * 4 * 64 * 64 * 2)
    path = tmp_path / "wide.py"
    path.write_text(
        "from torch import nn\nSPACE = {'width': (8, 4096, 8)}\n"
        "def build(width=8):\n    return nn.Sequential(nn.Linear(width, width), nn.Tanh())\n"
    )
    out_json = tmp_path / "out.json"
    _run([str(path), "--database", "none", "--seeds", "1", "--quiet", "--json", str(out_json)], capsys)
    data = json.loads(out_json.read_text())[0]
    widths = [s["config"]["knobs"]["width"] for s in data["skipped"]]
    assert widths and min(widths) > 64 and all("too large" in s["reason"] for s in data["skipped"])


def test_a_probe_over_its_time_budget_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A build that takes 5 s at depth > 30 is cut at the 0.5 s budget, the build for the memory estimate
    included: that one ran outside the budget, 5 s a point, 18 s in all. Oracle: the model file notes
    each slow build that ran to its end; none may. (The run was timed against 5 s + 0.5 s a slow point,
    which a loaded machine could reach: the search around the slow points took 2-4 s.)"""
    finished = tmp_path / "finished.txt"
    note = f"open({str(finished)!r}, 'a').write('x')"
    slow_build = f"import time\n    if depth > 30:\n        time.sleep(5)\n        {note}"
    path = _file(tmp_path, slow_build)
    out_json = tmp_path / "out.json"
    _run(
        [
            str(path),
            "--database",
            "none",
            "--seeds",
            "1",
            "--quiet",
            "--probe-timeout",
            "0.5",
            "--max-examples",
            "10",
            "--json",
            str(out_json),
        ],
        capsys,
    )
    data = json.loads(out_json.read_text())[0]
    slow = [s for s in data["skipped"] if "too slow" in s["reason"]]
    assert slow
    assert not finished.exists(), f"{len(finished.read_text())} slow build(s) ran past the budget"


def test_the_model_file_is_imported_once_per_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    counter = tmp_path / "imports.txt"
    path = tmp_path / "counted.py"
    count = f"with open({str(counter)!r}, 'a') as f:\n    f.write('x')\n"
    path.write_text(count + EXPLODING.replace("{guard}", "pass"))
    _run([str(path), "--database", "none", "--seeds", "1", "--quiet", "--max-examples", "5"], capsys)
    assert counter.read_text() == "x"


WORD_LM = """
import torch
from torch import nn

class WordLM(nn.Module):
    def __init__(self, vocab=50, width=16, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.LSTM(width, width, layers, batch_first=True)
        self.out = nn.Linear(width, vocab)
        self.layers, self.width = layers, width

    def init_hidden(self, bsz):
        return (torch.zeros(self.layers, bsz, self.width), torch.zeros(self.layers, bsz, self.width))

    def forward(self, tokens, hidden):
        out, _ = self.rnn(self.embed(tokens), hidden)
        return self.out(out)

def build(init_scale=1.0):
    return WordLM()

def batch(model, batch_size=4, seq_len=8):
    return torch.randint(0, 50, (batch_size, seq_len)), model.init_hidden(batch_size)
"""


def test_nested_inputs_of_a_word_language_model_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "word_lm.py"
    path.write_text(WORD_LM)
    code, out, err = _run(
        [str(path), "--database", "none", "--seeds", "1", "--quiet", "--max-examples", "5"], capsys
    )
    assert code in (cli.EXIT_OK, cli.EXIT_FOUND), err
    assert "word_lm.py" in out


def _cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "stabilitycheck.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


HOLD_THE_SECOND_SEARCH = """
import sys
import time
from pathlib import Path

from stabilitycheck import cli, searching

real, marker = searching.search, Path(sys.argv.pop(1))


def search(space, **kwargs):  # mlp's search runs; the next one waits for the signal at its first point
    if space.label == "mlp":
        return real(space, **kwargs)
    shown = kwargs["progress"]

    def progress(message):
        shown(message)
        marker.touch()
        time.sleep(600)

    return real(space, **{**kwargs, "progress": progress})


searching.search = search
sys.exit(cli.main())
"""


@pytest.mark.slow
def test_sigterm_mid_search_writes_what_was_found_and_progress_shows_off_a_tty(tmp_path: Path) -> None:
    """The signal lands in the second search, which waits for it at its first point: sent once the
    JSON held mlp's counterexample, it could come after the other two searches had finished (2 s on
    an idle machine), on a loaded one (exit 1, not terminated)."""
    out_json, script, marker = tmp_path / "out.json", tmp_path / "held.py", tmp_path / "waiting"
    script.write_text(HOLD_THE_SECOND_SEARCH)
    args = ["zoo", "--family", "mlp,rnn,gru", "--database", "none", "--json", str(out_json)]
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marker), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    _, err = stopped_when_marked(proc, marker)
    assert proc.returncode == cli.EXIT_TERMINATED, err
    data = json.loads(out_json.read_text())
    assert data[0]["label"] == "mlp" and data[0]["counterexample"] is not None
    assert any(": point " in line for line in err.splitlines())  # progress lines, stderr not a terminal


@pytest.mark.slow
def test_the_same_seed_gives_the_same_table_whatever_the_database_holds(tmp_path: Path) -> None:
    args = ["zoo", "--family", "mlp,rnn", "--seed", "0", "--quiet"]

    def table(proc: subprocess.Popen[str]) -> str:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == cli.EXIT_FOUND, err
        return out.split("\n\n")[0]

    none = table(_cli([*args, "--database", "none"], tmp_path))
    fresh = table(_cli([*args, "--database", str(tmp_path / "db")], tmp_path))
    reused = table(_cli([*args, "--database", str(tmp_path / "db")], tmp_path))
    shared = [_cli([*args, "--database", str(tmp_path / "db2")], tmp_path) for _ in range(2)]
    concurrent = [table(p) for p in shared]

    def strip_probes(t: str) -> list[str]:  # the probe count says how fast, not what
        return [line.rsplit(None, 1)[0] for line in t.splitlines()]

    assert strip_probes(none) == strip_probes(fresh) == strip_probes(reused)
    assert all(strip_probes(c) == strip_probes(none) for c in concurrent)


def test_an_empty_batch_is_a_usage_error_not_a_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path)
    path.write_text(
        path.read_text() + "\ndef batch(model, batch_size=0):\n    return torch.randn(batch_size, 16)\n"
    )
    code, _, err = _run([str(path), "--database", "none", "--quiet"], capsys)
    assert code == cli.EXIT_USAGE and "empty tensor" in err, err


def test_sparse_embedding_gradients_are_measured_like_dense_ones() -> None:
    """Oracle: the same model with a dense embedding; torch's own get_total_norm of its gradients."""
    import torch
    from torch import nn

    from stabilitycheck.probing import probe_module

    torch.manual_seed(0)
    sparse = nn.Sequential(nn.Embedding(20, 8, sparse=True), nn.Linear(8, 5))
    dense = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 5))
    dense.load_state_dict(sparse.state_dict())
    x, y = torch.randint(0, 20, (4, 6)), torch.randint(0, 5, (4, 6))

    def loss(out: torch.Tensor, _: object) -> torch.Tensor:
        return nn.functional.cross_entropy(out.reshape(-1, 5), y.reshape(-1))

    m = probe_module(sparse, x, loss)
    loss(dense(x), None).backward()
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in dense.parameters()]))
    assert m.first_nonfinite is None
    assert m.grad_norm[0] == pytest.approx(expected, rel=1e-6)


def test_a_search_that_tested_nothing_is_exit_2_with_what_it_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every configuration skipped (here: none fits the memory allowed) is not 'stable': one line, exit
    2, the skipped points still in the JSON."""
    from stabilitycheck import searching

    monkeypatch.setattr(searching, "free_memory", lambda device: 16)
    path = tmp_path / "wide.py"
    path.write_text(
        "from torch import nn\nSPACE = {'width': (8, 64, 8)}\n"
        "def build(width=8):\n    return nn.Sequential(nn.Linear(width, width), nn.Tanh())\n"
    )
    out_json = tmp_path / "out.json"
    code, out, err = _run(
        [str(path), "--database", "none", "--seeds", "1", "--quiet", "--json", str(out_json)], capsys
    )
    assert code == cli.EXIT_USAGE and err.count("\n") == 1 and "every configuration tried was skipped" in err
    data = json.loads(out_json.read_text())[0]
    assert data["skipped"] and data["minimal"] is None  # no counterexample: no claim of minimality
    assert "nothing tested (every configuration tried, 8, was skipped)" in out and "stable" not in out


def test_knob_ranges_are_checked_against_the_knobs_type_and_applied_before_the_first_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fractional range on a whole-number knob is a usage error up front; a model that cannot run at
    depth 1 is searched from the lower end the user gave (--knob), not from its SPACE's; from its
    SPACE's, it runs at the top corner, so it is searched too, depths 1-2 skipped with the reason."""
    path = _file(tmp_path, "if depth < 3: raise ValueError('needs depth >= 3')")
    code, _, err = _run([str(path), "--knob", "depth=1.5:4", "--quiet"], capsys)
    assert code == cli.EXIT_USAGE and "whole-number knob" in err and err.count("\n") == 1
    code, out, err = _run([str(path), "--database", "none", "--seeds", "1", "--quiet"], capsys)
    assert code == cli.EXIT_FOUND and "needs depth >= 3" in out, err
    assert f"at {path}:" in out  # the skip reason names the line that raised
    args = ["--knob", "depth=3:40", "--database", "none", "--seeds", "1", "--quiet"]
    code, out, _ = _run([str(path), *args], capsys)
    assert code == cli.EXIT_FOUND and "depth=" in out


def test_a_choice_knob_is_fixed_by_a_word_in_the_search_as_in_the_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--knob activation=linear fixes the knob (it was 'malformed' in the search, accepted by map): a
    linear RNN at g 1.5 then explodes, judged on the linear model; a misspelt word is a one-line
    usage error with a suggestion, and a word for a knob the family lacks says so."""
    args = ["rnn", "--knob", "seq_len=1:64", "--knob", "init_scale=1.5", "--seeds", "1", "--database", "none"]
    out_json = tmp_path / "out.json"
    code, _, err = _run([*args, "--knob", "activation=linear", "--quiet", "--json", str(out_json)], capsys)
    assert code == cli.EXIT_FOUND, err
    config = json.loads(out_json.read_text())[0]["counterexample"]["config"]
    assert config["knobs"]["activation"] == "linear"
    code, _, err = _run(["mlp", "--knob", "activation=rleu"], capsys)
    assert code == cli.EXIT_USAGE and "did you mean 'relu'" in err and err.count("\n") == 1
    code, _, err = _run(["mlp", "--knob", "norm=post"], capsys)
    assert code == cli.EXIT_USAGE and "'norm' is not a knob of mlp" in err and "--knob depth=1:8" in err


@pytest.mark.parametrize(
    ("knobs", "searched"),
    [
        (["depth=10"], ["init_scale"]),  # a fixed searched knob is no axis; the other axis still is
        (["depth=10", "init_scale=3.5"], []),  # every axis fixed: the one point is judged
        (["init_scale=1.0:2.0:0.5", "depth=10"], ["init_scale"]),
        (["activation=relu"], ["depth", "init_scale"]),
    ],
)
def test_a_fixed_knob_stays_fixed_whether_or_not_a_range_is_given(
    knobs: list[str], searched: list[str]
) -> None:
    """--knob NAME=VALUE on a knob the space searches fixes it (it fell back to the default axes,
    depth included, when no range was left): the searched axes are the ranges given, else the
    space's own axes less the fixed ones, and every fixed value is in the base."""
    from stabilitycheck._options import apply_knobs
    from stabilitycheck.subjects import resolve

    subject = resolve("mlp")
    space = apply_knobs(subject.space(), knobs)
    assert [a.name for a in space.axes] == searched
    for text in knobs:
        name, _, value = text.partition("=")
        if ":" not in value:
            assert str(space.base.values[name]) == value
            assert space.config(space.top()).values[name] == space.base.values[name]


def test_the_cli_judges_only_the_fixed_value_and_a_knob_given_twice_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mlp --knob depth=10` reported depth=13: every configuration judged (the counterexample, the
    largest stable one, the skipped) has depth 10. The same knob twice is one line and exit 2, in the
    search and in the map; the map's --x cannot be a fixed knob."""
    out_json = tmp_path / "out.json"
    args = ["mlp", "--knob", "depth=10", "--seeds", "1", "--max-examples", "5", "--database", "none"]
    code, _, err = _run([*args, "--quiet", "--json", str(out_json)], capsys)
    assert code in (cli.EXIT_OK, cli.EXIT_FOUND), err
    [row] = json.loads(out_json.read_text())
    found = [row["counterexample"]["config"]] if row["counterexample"] else []
    configs = found + [row["largest_stable"]] * bool(row["largest_stable"])
    configs += [s["config"] for s in row["skipped"]]
    assert configs and all(c["knobs"]["depth"] == 10 for c in configs)
    twice = ["--knob", "init_scale=0.1:0.5:0.1", "--knob", "init_scale=0.2"]
    for argv in (["mlp", *twice], ["map", "mlp", "--x", "depth", "--y", "init_scale", *twice]):
        code, _, err = _run(argv, capsys)
        assert code == cli.EXIT_USAGE and "init_scale is given twice" in err and err.count("\n") == 1
    code, _, err = _run(["map", "mlp", "--x", "depth", "--y", "init_scale", "--knob", "depth=10"], capsys)
    assert code == cli.EXIT_USAGE and "fixes it to one value" in err and err.count("\n") == 1
    code, out, err = _run(
        ["mlp", "--knob", "depth=2", "--knob", "init_scale=1.0", "--database", "none"], capsys
    )
    assert code == cli.EXIT_OK and "stable (its one configuration: every knob fixed)" in out, err
    assert "stable at its one configuration (every knob fixed) (q=0.5" in out  # it read "stable at , the"
    code, out, err = _run(  # exploding there: the cell was empty
        ["mlp", "--knob", "depth=30", "--knob", "init_scale=4.0", "--database", "none"], capsys
    )
    assert code == cli.EXIT_FOUND and "its one configuration (every knob fixed)" in out.splitlines()[2], err


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["--stall-limit", "0.95"], "--stall-limit"),
        (["--divergence-limit", "3"], "--divergence-limit"),
        (["--stall-limit", "0.9", "--steps", "0"], "--stall-limit"),
        (["--divergence-limit", "3", "--stall-limit", "0.9"], "--divergence-limit and --stall-limit"),
        (["--stall-limit", "0.95", "--steps", "5"], None),
        (["--stall-limit", "0.95", "--knob", "steps=1:5"], None),
        (["--divergence-limit", "off"], None),  # turning off what would not run is harmless
        (["--divergence-limit", "3", "--divergence-limit", "off"], None),  # the last one given counts
        ([], None),  # the default divergence limit is no request
    ],
)
def test_a_loss_limit_without_training_steps_is_a_usage_error(
    argv: list[str], refused: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """--stall-limit (and --divergence-limit) compare the loss after the steps with the initial loss;
    without steps they were accepted and never checked: now refused up front, one line, exit 2."""
    from stabilitycheck._options import parser, require_steps
    from stabilitycheck.errors import UsageError

    args = parser().parse_args(["mlp", *argv])
    if refused is None:
        require_steps(args)
        return
    with pytest.raises(UsageError, match=f"^{refused}: judged on the loss after training steps"):
        require_steps(args)
    code, out, err = _run(["mlp", "--quiet", "--database", "none", *argv], capsys)
    assert code == cli.EXIT_USAGE and err.count("\n") == 1 and refused in err and out == ""


def test_the_maps_divergence_limit_without_steps_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["map", "mlp", "--x", "depth", "--y", "init_scale", "--divergence-limit", "3"]
    code, _, err = _run(argv, capsys)
    assert code == cli.EXIT_USAGE and err.count("\n") == 1 and "--divergence-limit: judged on the loss" in err


def test_a_vanishing_counterexample_is_said_to_vanish_not_to_explode(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """tanh at sigma 0.5: every layer shrinks the gradient (mean field: x0.5), so with a vanishing limit
    the smallest failing depth fails on vanishing alone; the table and the progress say it vanishes."""
    args = ["mlp", "--knob", "depth=1:12", "--knob", "init_scale=0.5", "--knob", "width=32"]
    args += ["--vanishing-limit", "100", "--grad-norm-limit", "off", "--seeds", "1", "--database", "none"]
    code, out, err = _run(args, capsys)
    assert code == cli.EXIT_FOUND, err
    assert "(vanishes)" in out and "explodes at" not in err and "vanishes at" in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_the_process_ignores_stays_ignored(signum: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shell script's `stabilitycheck ... &` job starts with SIGINT ignored (as does a process its
    parent told to ignore SIGTERM); the CLI installed its own handler over that, so a Ctrl-C meant for
    the script stopped the search (found by an audit: `kill -INT` of such a job exited 130, where
    Python's own default leaves an ignored SIGINT ignored). Oracle: signal.getsignal inside the run."""
    seen: list[object] = []

    def run(argv: object) -> int:
        seen.append(signal.getsignal(signum))
        return cli.EXIT_OK

    monkeypatch.setattr(cli, "run", run)
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        assert cli.main(["mlp"]) == cli.EXIT_OK
        assert seen == [signal.SIG_IGN] and signal.getsignal(signum) is signal.SIG_IGN
    finally:
        signal.signal(signum, previous)
    seen.clear()
    assert cli.main(["mlp"]) == cli.EXIT_OK and seen == [_command._on_signal]  # one not ignored is handled
    assert signal.getsignal(signum) is previous


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_descent_keeps_the_failure_found(
    signum: int, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C and SIGTERM (a CI timeout) stop alike and keep the exploding point found so far, marked
    interrupted; only the exit code differs. SIGTERM raised its own exception, which the search's
    Ctrl-C handler did not catch: the table had only its header and the JSON was []."""
    from stabilitycheck import searching

    def stopped(*args: object, **kwargs: object) -> object:
        _command._on_signal(signum, None)  # what the handler does when the signal arrives here
        raise AssertionError("the handler raises")

    monkeypatch.setattr(searching, "canonical", stopped)
    out_json = tmp_path / "out.json"
    code, out, err = _run(
        [str(_file(tmp_path)), "--database", "none", "--seeds", "1", "--json", str(out_json)], capsys
    )
    assert code == (cli.EXIT_TERMINATED if signum == signal.SIGTERM else cli.EXIT_INTERRUPTED)
    data = json.loads(out_json.read_text())
    assert data[0]["interrupted"] and data[0]["counterexample"] is not None and not data[0]["minimal"]
    assert "depth=" in out.splitlines()[2]  # the table row shows the point
    summary = [line for line in err.splitlines() if " probes in " in line]  # it read as a verified claim
    assert len(summary) == 1 and summary[0].endswith("(interrupted: not verified minimal)")


@pytest.mark.parametrize(
    ("guard", "code"),
    [
        ("if depth == 1: raise ValueError('depth 1 is not supported')", cli.EXIT_FOUND),
        ("raise ValueError('never supported')", cli.EXIT_USAGE),
    ],
)
def test_a_model_raising_at_the_lowest_corner_alone_is_searched(
    guard: str, code: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model that raises at depth 1 only was refused whole (exit 2: 'could test no configuration'),
    though a configuration that raises is a skipped point; one raising everywhere still is exit 2,
    named at the lowest corner with file:line."""
    args = [str(_file(tmp_path, guard)), "--database", "none", "--seeds", "1", "--quiet"]
    got, out, err = _run(args, capsys)
    assert got == code, err
    if code == cli.EXIT_USAGE:
        assert "depth=1" in err and "model.py:" in err and err.count("\n") == 1
    else:
        assert "depth=" in out.splitlines()[2] and "depth=1 " not in out.splitlines()[2]


def test_an_interrupted_zoo_says_what_is_not_minimal_and_what_was_not_searched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the second target's descent: its row shows the smallest exploding point seen,
    marked not verified minimal, remedies 'not tried (interrupted)' (it read 'none applies'); the
    targets never started are named on stderr (they were missing without a word), and in the JSON and
    Markdown, where a CI summary read as if the zoo were those rows alone (a new user's trial)."""
    from stabilitycheck import searching

    real, calls = searching.canonical, []

    def descent(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(searching, "canonical", descent)
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    args = ["zoo", "--family", "mlp,rnn,gru", "--database", "none", "--seeds", "1", "--quiet"]
    code, out, err = _run([*args, "--json", str(js), "--markdown", str(md)], capsys)
    assert code == cli.EXIT_INTERRUPTED
    rows = out.splitlines()[2:4]
    assert "interrupted" not in rows[0] and "(interrupted: not verified minimal)" in rows[1]
    assert "not tried (interrupted)" in rows[1] and "none applies" not in rows[1]
    assert "not searched (interrupted first): gru [cpu, float32]" in err
    stored = json.loads(js.read_text())
    assert [e["label"] for e in stored] == ["mlp", "rnn", "gru"]
    assert stored[2] == {
        "label": "gru",
        "device": "cpu",
        "dtype": "float32",
        "not_searched": "interrupted first",
    }
    assert "Not searched (interrupted first): gru [cpu, float32]." in md.read_text()


@pytest.mark.parametrize("flags", [["--lr", "0.1"], ["--optimizer", "adam"], ["--clip", "1"]])
def test_a_training_setting_without_steps_is_a_usage_error(
    flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--lr 0.1 without --steps was accepted and changed nothing (the probe at step 0 does not train),
    as --divergence-limit was before it was refused; with --steps it runs."""
    code, _, err = _run([str(_file(tmp_path)), *flags, "--quiet"], capsys)
    assert code == cli.EXIT_USAGE and flags[0] in err and "--steps" in err and err.count("\n") == 1


def test_a_plot_format_matplotlib_cannot_write_is_refused_before_the_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--plot x.txt was refused only after the whole search ('Format txt is not supported', exit 1)."""
    code, out, err = _run([str(_file(tmp_path)), "--plot", str(tmp_path / "x.txt"), "--quiet"], capsys)
    assert code == cli.EXIT_USAGE and ".txt" in err and ".png" in err and err.count("\n") == 1 and not out


def _smallest(tmp_path: Path, args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, float]:
    """The knobs of the clean model's counterexample (nothing raising), from the JSON `args` write."""
    code, out, _ = _run([str(_file(tmp_path, name="clean.py")), *args], capsys)
    assert code == cli.EXIT_FOUND and "one step lower" not in out  # nothing skipped
    found = json.loads((tmp_path / "out.json").read_text())[0]
    knobs: dict[str, float] = found["counterexample"]["config"]["knobs"]
    return knobs


def test_a_skipped_neighbour_below_the_counterexample_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model explodes from depth D (seed 0 alone; the same model with no guard finds D) and raises
    at depth D - 1: depth D was reported 1-minimal with no word, though the point below it was never
    judged. A note says so, and the JSON lists it."""
    out_json = tmp_path / "out.json"
    args = ["--database", "none", "--seeds", "1", "--quiet", "--json", str(out_json)]
    depth = int(_smallest(tmp_path, args, capsys)["depth"])
    guard = f"if depth == {depth - 1}: raise ValueError('depth {depth - 1} is not supported')"
    code, out, err = _run([str(_file(tmp_path, guard)), *args], capsys)
    assert code == cli.EXIT_FOUND, err
    assert f"depth={depth}" in out.splitlines()[2]
    assert f"one step lower, depth={depth - 1} was skipped" in out and "a smaller one may explode" in out
    unjudged = json.loads(out_json.read_text())[0]["unjudged"]
    assert [u["config"]["knobs"]["depth"] for u in unjudged] == [depth - 1]


def test_a_skipped_neighbour_below_the_counterexample_on_the_second_axis_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two axes: the model explodes from depth D at init_scale 4 (seed 0 alone; the same model with
    no guard finds it) and raises at depth D, init_scale 3, the point one step lower on the second
    axis. Only the first axis's neighbour was looked at, no test told (found by mutation testing);
    and the critical-init remedy, init_scale 3 there, raised out of the search: exit 2, the
    counterexample lost. Oracle: the guard's own rule over both one-step-lower neighbours of the
    counterexample reported."""
    out_json = tmp_path / "out.json"
    args = ["--database", "none", "--seeds", "1", "--quiet", "--json", str(out_json)]
    args += ["--knob", "depth=1:40", "--knob", "init_scale=2:4:1"]
    clean = _smallest(tmp_path, args, capsys)
    assert clean["init_scale"] == 4.0
    depth = int(clean["depth"])
    guard = f"if depth == {depth} and init_scale == 3.0: raise ValueError('not at {depth} x 3')"
    code, out, err = _run([str(_file(tmp_path, guard)), *args], capsys)
    assert code == cli.EXIT_FOUND, err
    found = json.loads(out_json.read_text())[0]
    knobs = found["counterexample"]["config"]["knobs"]
    below = [(knobs["depth"] - 1, knobs["init_scale"]), (knobs["depth"], knobs["init_scale"] - 1.0)]
    raising = [point for point in below if point == (depth, 3.0)]
    assert raising == [(depth, 3.0)]  # the guard sits below the counterexample, as planned
    listed = [(u["config"]["knobs"]["depth"], u["config"]["knobs"]["init_scale"]) for u in found["unjudged"]]
    assert listed == raising and "one step lower" in out
    assert "critical-init: not judged (" in out and "not judged: critical-init" in out


def test_a_signal_inside_a_gc_callback_is_deferred_to_the_searchs_check() -> None:
    """Ctrl-C landing in a gc callback (Hypothesis registers one) printed 'Exception ignored in ...
    Traceback ... raise KeyboardInterrupt' (about 1 run in 13): there the handler only records the
    signal, and the check after the point raises it. Oracle: a callback of our own, run by gc."""
    import gc
    import sys

    outcomes: list[str] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        try:
            _command._on_signal(signal.SIGINT, sys._getframe())
            outcomes.append("deferred")
        except KeyboardInterrupt:
            outcomes.append("raised")

    _command._SIGNALLED.clear()
    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    try:
        assert outcomes and set(outcomes) == {"deferred"}
        with pytest.raises(KeyboardInterrupt):
            _command.stop_if_signalled()
        with pytest.raises(KeyboardInterrupt):  # outside a gc callback the handler raises at once
            _command._on_signal(signal.SIGINT, sys._getframe())
    finally:
        _command._SIGNALLED.clear()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped raises
def test_a_signal_deferred_in_a_gc_callback_is_delivered_again_soon() -> None:
    """A SIGTERM deferred in a gc callback waited for the command's next check: minutes while a
    100,000-layer model was built for its memory estimate, and a CI timeout then killed the run with
    nothing written (found by a user's trial). It is delivered again AGAIN_S later, from a thread, until
    a KeyboardInterrupt is seen (one raised in a weakref's callback is dropped too). Oracle: a
    KeyboardInterrupt in plain Python code, with no check, within a second."""
    import gc
    import sys
    import time

    from stabilitycheck import alarms

    def callback(phase: str, info: dict[str, int]) -> None:
        _command._on_signal(signal.SIGINT, sys._getframe())

    previous = signal.signal(signal.SIGINT, _command._on_signal)
    _command._SIGNALLED.clear()
    alarms.STOP.live, alarms.STOP.seen = True, False
    gc.callbacks.append(callback)
    caught = False
    try:
        gc.collect()
        gc.callbacks.remove(callback)
        start = time.perf_counter()
        try:
            while time.perf_counter() - start < 5.0:
                sum(range(100))  # plain bytecode: where Python runs a signal's handler
        except KeyboardInterrupt:
            alarms.stop_seen()  # as the search does where it catches it
            caught = True
        assert caught and time.perf_counter() - start < 1.0
    finally:
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)
        alarms.STOP.live = False
        alarms.STOP.run += 1  # a delivery still armed belongs to no run
        alarms.STOP.seen = False
        _command._SIGNALLED.clear()
        signal.signal(signal.SIGINT, previous)


def test_two_outputs_naming_one_file_are_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json F --markdown F ran the search, then the Markdown overwrote the JSON."""
    same = str(tmp_path / "same.json")
    code, out, err = _run([str(_file(tmp_path)), "--json", same, "--markdown", same, "--quiet"], capsys)
    assert code == cli.EXIT_USAGE and "--json and --markdown both name" in err and err.count("\n") == 1
    assert not out and not Path(same).exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where no file can be made")
def test_an_output_whose_folder_takes_no_new_file_is_refused_before_the_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Permission bits said /proc was writable (to root): the search ran, then each rewrite of the
    JSON failed and said so, 9 lines of the same error."""
    code, out, err = _run([str(_file(tmp_path)), "--json", "/proc/version", "--quiet"], capsys)
    assert code == cli.EXIT_USAGE and "--json /proc/version: cannot write there" in err
    assert err.count("\n") == 1 and not out


def test_an_output_that_is_a_directory_or_no_regular_file_is_refused_before_the_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The JSON is written through a temporary file renamed over the path: renamed over /dev/full (as
    root) it became a JSON file, over a named pipe a plain file its reader never saw; a directory
    read 'no such directory or no permission'. Each is one line, exit 2, the path as it was."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    dangling = tmp_path / "dangling.json"  # a link into a folder that is missing: the search ran, then
    dangling.symlink_to(tmp_path / "nowhere" / "x.json")  # the write failed, exit 0 (a review)
    for path, said in (
        (tmp_path, f"is a directory; give a file path, e.g. {tmp_path / 'results.json'}"),
        (pipe, "is no regular file"),
        (dangling, "cannot write there"),
    ):
        code, out, err = _run([str(_file(tmp_path)), "--json", str(path), "--quiet"], capsys)
        assert code == cli.EXIT_USAGE and f"--json {path}: {said}" in err
        assert err.count("\n") == 1 and not out
    assert pipe.is_fifo()


def test_a_pipe_in_a_folder_that_takes_no_new_file_is_still_an_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--markdown /dev/stdout was refused for a user who cannot make files in /dev (its folder was
    tried, not the device: a review). A device or pipe written into is tried itself; a file still
    needs a folder a file can be made in. Oracle: `writable` made to refuse every folder, as /dev does
    to a non-root user."""
    from stabilitycheck import _outputs

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    monkeypatch.setattr(_outputs, "writable", lambda path: False)
    _outputs.check_outputs((("--json", None), ("--markdown", pipe), ("--plot", None)))
    with pytest.raises(cli.UsageError, match="cannot write there"):
        _outputs.check_outputs((("--json", None), ("--markdown", tmp_path / "out.md"), ("--plot", None)))


def test_the_markdown_is_written_into_a_pipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Only --json is renamed over its path; --markdown /dev/stdout | cat printed the Markdown until
    the refusal of pipes and devices took every output (a review). Oracle: what a reader of the pipe
    gets is the Markdown the run writes."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(pipe.read_text()), daemon=True)
    reader.start()
    code, _, _ = _run([str(_file(tmp_path)), "--markdown", str(pipe), "--quiet", "--seeds", "1"], capsys)
    if not got and reader.is_alive():  # refused, nothing opened the pipe: end the reader's wait
        with contextlib.suppress(OSError):  # ENXIO: no reader left, it has closed the pipe with its text
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
    reader.join(timeout=60)
    assert code == cli.EXIT_FOUND and got and got[0].startswith("## stabilitycheck")


def test_the_json_through_a_link_is_written_into_the_file_it_points_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Renamed over the path, a link to the results file became a file of its own, and the file it
    pointed to kept its old text. Oracle: the link is still one, and its target holds the JSON."""
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old")
    link.symlink_to(real)
    code, _, _ = _run([str(_file(tmp_path)), "--json", str(link), "--quiet", "--max-examples", "5"], capsys)
    assert code in (cli.EXIT_OK, cli.EXIT_FOUND) and link.is_symlink()
    assert isinstance(json.loads(real.read_text()), list)


def test_the_table_is_printed_before_the_plot_is_drawn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second Ctrl-C while the plot drew (the slowest output) lost the table on stdout too."""
    from stabilitycheck import plot

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(plot, "plot", interrupted)
    args = [str(_file(tmp_path)), "--database", "none", "--seeds", "1", "--quiet"]
    code, out, _ = _run([*args, "--plot", str(tmp_path / "p.png")], capsys)
    assert code == cli.EXIT_INTERRUPTED and "depth=" in out


@pytest.mark.parametrize("target", ["zoo", "file"])
def test_a_stop_before_the_first_search_still_writes_the_json_and_names_what_was_not_searched(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the first seconds (importing torch, checking the model) left no JSON and named no
    target, where a CI job expects the artifact."""

    def stopped(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_spaces", stopped)
    out_json, out_md, summary = tmp_path / "out.json", tmp_path / "out.md", tmp_path / "summary.md"
    summary.write_text("earlier steps\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    name = "zoo" if target == "zoo" else str(_file(tmp_path))
    code, out, err = _run([name, "--json", str(out_json), "--markdown", str(out_md), "--quiet"], capsys)
    named = "every zoo target" if target == "zoo" else name
    # the JSON names them (it held [], which read as a run that found nothing to search: a review)
    assert code == cli.EXIT_INTERRUPTED and json.loads(out_json.read_text()) == [
        {"label": named, "device": None, "dtype": None, "not_searched": "interrupted first"}
    ]
    assert err == f"stabilitycheck: not searched (interrupted first): {named}\n" and not out
    # the Markdown and the CI step summary say so (they were left unwritten: an audit)
    said = f"Interrupted before any search: {named} not searched, nothing tested."
    assert said in out_md.read_text() and summary.read_text().startswith("earlier steps\n")
    assert said in summary.read_text()


def test_replay_takes_debug_as_documented_and_its_errors_point_to_its_own_help(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`replay DIR --debug` printed a traceback of 'unrecognized arguments: --debug', and an unknown
    flag pointed to `stabilitycheck --help`, which does not list replay's."""
    code, _, err = _run(["replay", str(tmp_path), "--bogus"], capsys)
    assert code == cli.EXIT_USAGE and err.count("\n") == 1 and "see stabilitycheck replay --help" in err
    code, _, err = _run(["replay", str(tmp_path), "--debug"], capsys)
    assert code == cli.EXIT_USAGE and "unrecognized" not in err and str(tmp_path) in err


def test_what_a_model_file_prints_goes_to_stderr_and_stdout_holds_the_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model file's print() went to stdout before the table (`> results.txt` got it too), in a
    search and in a map."""
    path = _file(tmp_path, guard="print('building', depth)")
    args = ["--database", "none", "--seeds", "1", "--quiet", "--max-examples", "5"]
    code, out, err = _run([str(path), *args], capsys)
    assert code == cli.EXIT_FOUND and "building" not in out and "building" in err
    assert out.splitlines()[0].split()[:2] == ["target", "device"]
    code, out, err = _run(
        [
            "map",
            str(path),
            "--x",
            "depth",
            "--y",
            "init_scale",
            "--knob",
            "depth=1:6",
            "--knob",
            "init_scale=1:3:1",
            "--seeds",
            "1",
            "--quiet",
        ],
        capsys,
    )
    assert code in (cli.EXIT_OK, cli.EXIT_FOUND) and "building" not in out and "building" in err


def test_a_file_that_failed_is_still_said_when_a_second_ctrl_c_stops_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failures were said after the plot, so a Ctrl-C while it drew left a --json that could not
    be written unreported (found in review)."""
    from stabilitycheck import _outputs, plot

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    def full_disk(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plot, "plot", interrupted)
    monkeypatch.setattr(_outputs, "atomic_write", full_disk)
    args = [str(_file(tmp_path)), "--database", "none", "--seeds", "1", "--quiet"]
    code, out, err = _run(
        [*args, "--json", str(tmp_path / "o.json"), "--plot", str(tmp_path / "p.png")], capsys
    )
    assert code == cli.EXIT_INTERRUPTED and "depth=" in out
    assert "--json: writing it failed: OSError" in err


def test_a_map_whose_model_raises_at_a_point_still_prints_and_writes_what_it_traced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model file raising at some grid points (init_scale 2): the map stopped with exit 2 and wrote
    neither the table nor the markdown, only the JSON of each point as it came (found by a trial as a
    new user). What was traced is printed and written, marked stopped, then the one-line reason."""
    path = _file(tmp_path, guard="if init_scale == 2.0: raise ValueError('too deep for me')")
    json_path, md_path = tmp_path / "map.json", tmp_path / "map.md"
    argv = ["map", str(path), "--x", "depth", "--y", "init_scale", "--knob", "depth=1:8"]
    argv += [
        "--knob",
        "init_scale=1:3:1",
        "--seeds",
        "1",
        "--json",
        str(json_path),
        "--markdown",
        str(md_path),
    ]
    code, out, err = _run(argv, capsys)
    assert code == cli.EXIT_USAGE
    assert "phase map of" in out and "depth" in md_path.read_text()
    saved = json.loads(json_path.read_text())
    assert saved["interrupted"] and "raised ValueError: too deep for me" in saved["stopped"]
    assert saved["verdicts"] >= 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("stabilitycheck map: error:") and "too deep for me" in last
    assert "stopped: what was traced so far" in err


def test_a_fixed_knob_too_large_for_memory_is_skipped_before_it_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--knob depth=100000000` fixed every point beyond the memory allowed, and the check before the
    search built it anyway (zoo.Stack allocating for minutes, found by a trial). The estimate comes
    first: skipped as too large, as the search skips such points, one line and exit 2, in seconds."""
    code, out, err = _run(["mlp", "--knob", "depth=100000000", "--knob", "init_scale=2", "--quiet"], capsys)
    assert code == cli.EXIT_USAGE and err.count("\n") == 1
    assert "every configuration tried was skipped" in err and "too large" in err
    assert "nothing tested" in out and "e.g. mlp depth=100000000" in out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs a directory no file can be made in: /proc")
def test_a_run_from_a_directory_it_cannot_write_to_is_not_refused_for_its_default_database(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The --database check ran on the default the user never gave: from a read-only directory every
    run was refused ('cannot write in .', found in review). Only a --database given is checked."""
    monkeypatch.chdir("/proc")
    code, _, err = _run(["mlp", "--max-examples", "2", "--seeds", "1", "--quiet"], capsys)
    assert code in (cli.EXIT_OK, cli.EXIT_FOUND), err


@pytest.mark.parametrize("knob", ["lr=0.1:10:0.1", "warmup=0:10", "clip=0.5:2.0:0.5"])
def test_a_training_setting_searched_without_steps_exits_2(
    capsys: pytest.CaptureFixture[str], knob: str
) -> None:
    """--lr without --steps was refused, --knob lr=0.1:10:0.1 searched 101 points along an axis where
    nothing could change, stable, exit 0 (a new user's trial). Refused alike, in one line."""
    code, _, err = _run(["mlp", "--knob", "depth=1:3", "--knob", knob, "--database", "none"], capsys)
    name = knob.partition("=")[0]
    assert code == cli.EXIT_USAGE and f"--knob {name}: settings of the training steps" in err
    assert err.count("\n") == 1
    code, _, err = _run(["mlp", "--knob", "depth=1:2", "--knob", knob, "--steps", "1", "--quiet"], capsys)
    assert code in (cli.EXIT_OK, cli.EXIT_FOUND), err


def test_a_map_range_on_a_third_knob_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """`map --x depth --y init_scale --knob width=1:3` ran at the factory's default width, the range
    dropped without a word (a new user's trial)."""
    argv = ["map", "mlp", "--x", "depth", "--y", "init_scale", "--knob", "width=8:16:8"]
    code, _, err = _run(argv, capsys)
    assert code == cli.EXIT_USAGE and "--knob width=8:16:8: a map has two axes" in err
    assert err.count("\n") == 1


def test_init_naming_an_int_knob_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """INIT = ("depth", 1.0) was accepted: the init grid, the default times 0.5 .. 4, was searched over
    depth, 7 points skipped as 'not an int', 'stable (tried up to depth=8.0)' (a new user's trial)."""
    path = tmp_path / "init_int.py"
    path.write_text(
        'from torch import nn\nINIT = ("depth", 1.0)\n\n\ndef build(depth=2):\n'
        "    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)])\n"
    )
    code, _, err = _run([str(path), "--database", "none"], capsys)
    assert code == cli.EXIT_USAGE and "names depth, whose default 2 is no float" in err
    assert err.count("\n") == 1


def test_two_blocks_of_one_name_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """stability_blocks() returning ("a", ...) twice was accepted, its profile read '(input) .. a'
    and a culprit 'a' named either (a new user's trial)."""
    path = tmp_path / "twice.py"
    path.write_text(
        "from torch import nn\n\n\nclass M(nn.Sequential):\n    def stability_blocks(self):\n"
        '        return [("a", self[0]), ("a", self[1])]\n\n\n'
        "def build():\n    return M(nn.Linear(4, 4), nn.Linear(4, 4))\n"
    )
    code, _, err = _run([str(path), "--database", "none"], capsys)
    assert code == cli.EXIT_USAGE and "two blocks are named 'a'" in err and err.count("\n") == 1


def test_a_dtype_or_device_given_twice_is_searched_once() -> None:
    """--dtype float32,float32 (or --device cpu --device cpu) searched the target twice and printed two
    identical rows (found by a new user's trial). Oracle: the spaces the CLI would search, one per
    distinct (device, dtype), in the order given."""
    from stabilitycheck import cli
    from stabilitycheck._options import parser

    args = parser().parse_args(
        ["mlp", "--dtype", "float32,float64,float32", "--device", "cpu", "--device", "cpu"]
    )
    spaces = cli._spaces(args)
    assert [(s.base.run.device, s.base.run.dtype) for _, s in spaces] == [
        ("cpu", "float32"),
        ("cpu", "float64"),
    ]


def test_a_zoo_family_given_twice_is_searched_once() -> None:
    """--family mlp,mlp searched mlp twice and printed two identical rows, where --dtype
    float32,float32 is searched once (a new user's trial). Oracle: the distinct families, in order."""
    from stabilitycheck._options import parser

    args = parser().parse_args(["zoo", "--family", "mlp,rnn,mlp", "--family", "rnn"])
    assert [s.label for _, s in cli._spaces(args)] == ["mlp", "rnn"]


def test_a_device_that_is_none_names_the_option_and_the_devices(capsys: pytest.CaptureFixture[str]) -> None:
    """--device tpu read "Run.device='tpu' is not allowed", an internal field's name, and left out
    'all' (a new user's trial); the map takes no 'all'."""
    assert cli.main(["zoo", "--device", "tpu", "--quiet"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        "stabilitycheck: error: --device 'tpu': expected cpu, cuda or cuda:N (or all)\n"
    )
    assert cli.main(["map", "mlp", "--x", "depth", "--y", "init_scale", "--device", "tpu"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.endswith("--device 'tpu': expected cpu, cuda or cuda:N\n")


def test_an_integer_option_s_bounds_are_printed_as_integers(capsys: pytest.CaptureFixture[str]) -> None:
    """--seed -1 said 'in [0, 4.29497e+09]', a bound no one can type back (found by a user's trial)."""
    assert cli.main(["mlp", "--seed", "-1"]) == cli.EXIT_USAGE
    assert "must be a finite number in [0, 4294967295], got -1" in capsys.readouterr().err
    assert cli.main(["mlp", "--quantile", "2"]) == cli.EXIT_USAGE
    assert "must be a finite number in (0, 1], got 2" in capsys.readouterr().err


def test_version_prints_the_package_s_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`stabilitycheck --version` (a new user's first command, 'unrecognized arguments' before): the
    version the package and its metadata give, exit 0. Oracle: importlib.metadata."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:  # argparse's, as for --help
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"stabilitycheck {version('stabilitycheck')}"


@pytest.mark.parametrize(
    ("knob", "values"),
    [
        ("init_scale=1:4", [1.0 + 0.2 * k for k in range(16)]),
        ("init_scale=1.0:4.0", [1.0 + 0.2 * k for k in range(16)]),
        ("init_scale=1:4:1", [1.0, 2.0, 3.0, 4.0]),
        ("depth=1:4", [1, 2, 3, 4]),
        ("clip=1:4", [1.0 + 0.2 * k for k in range(16)]),  # a run setting off by default (None): real
        ("steps=1:3", [1, 2, 3]),
    ],
)
def test_a_real_knob_given_whole_bounds_is_searched_on_its_real_grid(knob: str, values: list[float]) -> None:
    """`--knob init_scale=1:4` searched 1, 2, 3 and 4 alone (integers parsed as a whole-number range),
    where 1.0:4.0 searches 16 points: a new user's trial. A knob whose value is real gets the real grid
    however its bounds are written; a whole-number knob steps by 1. Oracle: the README's rule by hand."""
    from stabilitycheck._options import apply_knobs
    from stabilitycheck.zoo import Family

    (axis,) = apply_knobs(Family("mlp").space(), [knob]).axes
    assert list(axis.values) == pytest.approx(values, rel=1e-12)
    assert all(type(v) is type(values[0]) for v in axis.values)


def test_a_file_named_without_a_directory_is_read_as_a_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stabilitycheck notes.txt` in the file's own directory was told "'notes.txt' is not a zoo
    family", where `./notes.txt` was told it is no .py file (a new user's trial): a name with a dot is
    a path, no family's name has one."""
    (tmp_path / "notes.txt").write_text("hello\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(["notes.txt", "--quiet"], capsys)
    assert code == cli.EXIT_USAGE and err.count("\n") == 1
    assert "notes.txt: not a .py file" in err and "zoo family" not in err


def test_map_takes_a_dtype_said_as_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """`map --dtype float8` was told `Run.dtype='float8' is not allowed` (a review): its own --dtype
    is checked as the search's is, said as the flag with a did-you-mean."""
    code, _, err = _run(["map", "mlp", "--x", "depth", "--y", "init_scale", "--dtype", "float8"], capsys)
    assert code == cli.EXIT_USAGE and err.count("\n") == 1
    assert "argument --dtype: 'float8' is not a dtype it probes" in err and "did you mean 'float64'" in err


def test_a_replayed_row_found_stable_says_nothing_of_a_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stored counterexample judged again under a limit it passes is a stable row, which said
    'searched  1 of the grid's 960 points judged ... more --max-examples judges more' of a replay that
    searched nothing (a review). Oracle: the replay judges one point, by construction."""
    found = tmp_path / "found.json"
    args = ["mlp", "--knob", "depth=1:30", "--knob", "init_scale=3.0", "--seeds", "1", "--quiet"]
    code, _, _ = _run([*args, "--database", "none", "--json", str(found)], capsys)
    assert code == cli.EXIT_FOUND
    code, out, err = _run(["--replay", str(found), "--growth-limit", "1e30", "--quiet"], capsys)
    assert code == cli.EXIT_OK, err
    assert "stable at" in out and "searched" not in out


def test_a_stable_row_says_the_limits_it_was_judged_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stable verdict names its limits in the text and the JSON: with --growth-limit 500 it read
    the same as on the default 100, so a stored 'stable' could not say what it passed."""
    out_json = tmp_path / "out.json"
    argv = ["mlp", "--knob", "depth=1:2", "--knob", "init_scale=0.5", "--seeds", "1", "--database", "none"]
    code, out, _ = _run([*argv, "--growth-limit", "500", "--json", str(out_json)], capsys)
    assert code == cli.EXIT_OK
    # divergence is read after optimiser steps: none ran, so it was not judged, and is not named
    assert "limits nonfinite, grad_norm > 1000, growth > 500)" in out
    assert json.loads(out_json.read_text())[0]["limits"]["growth"] == 500.0


def test_the_markdown_says_the_limits_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_md = tmp_path / "out.md"
    argv = ["mlp", "--knob", "depth=1:2", "--knob", "init_scale=0.5", "--seeds", "1", "--database", "none"]
    code, _, _ = _run([*argv, "--steps", "1", "--growth-limit", "500", "--markdown", str(out_md)], capsys)
    assert code == cli.EXIT_OK
    said = "Judged on the limits nonfinite, grad_norm > 1000, growth > 500, divergence > 2."  # steps ran
    assert said in out_md.read_text()


def test_a_second_signal_while_writing_stops_at_once() -> None:
    """The first signal while a run writes is held for after the writing; a second one is raised at
    once: with every signal held, a write blocked on a FIFO no one read ignored SIGTERM and Ctrl-C
    alike, and only SIGKILL ended the run (a review)."""
    from stabilitycheck import _command

    steps: list[str] = []

    def run(argv: object) -> int:
        with _command.uninterrupted():
            signal.raise_signal(signal.SIGTERM)
            steps.append("held")
            signal.raise_signal(signal.SIGTERM)
            steps.append("not reached")
        return cli.EXIT_OK

    assert _command.run_command("t", run, []) == cli.EXIT_TERMINATED and steps == ["held"]


def test_a_held_signal_ends_a_write_still_blocked_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """One signal alone ends a write still under way WRITE_GRACE_S later (a CI timeout's single
    SIGTERM before its SIGKILL): here a 30 s sleep standing for the blocked write."""
    import time

    from stabilitycheck import _command

    monkeypatch.setattr(_command, "WRITE_GRACE_S", 0.2)
    steps: list[str] = []

    def run(argv: object) -> int:
        with _command.uninterrupted():
            signal.raise_signal(signal.SIGINT)
            time.sleep(30)
            steps.append("not reached")
        return cli.EXIT_OK

    start = time.monotonic()
    assert _command.run_command("t", run, []) == cli.EXIT_INTERRUPTED
    assert steps == [] and time.monotonic() - start < 10


def test_nested_writing_is_held_by_the_outer_block() -> None:
    from stabilitycheck import _command

    steps: list[str] = []

    def run(argv: object) -> int:
        with _command.uninterrupted():
            with _command.uninterrupted():
                signal.raise_signal(signal.SIGTERM)
                steps.append("inner")
            steps.append("outer")
        steps.append("not reached")
        return cli.EXIT_OK

    assert _command.run_command("t", run, []) == cli.EXIT_TERMINATED and steps == ["inner", "outer"]


def test_a_failed_write_is_said_even_when_a_signal_lands_during_an_early_stops_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped before its first search, a step summary that cannot be written (a directory) and
    a SIGTERM landing while the JSON is written: the failed write is still said (the held signal,
    raised at the block's end, skipped the line: a review)."""
    from stabilitycheck import _outputs

    def stopped(*_: object) -> None:
        raise KeyboardInterrupt

    real = _outputs.atomic_write

    def signalled(path: Path, text: str) -> None:
        signal.raise_signal(signal.SIGTERM)
        real(path, text)

    monkeypatch.setattr(cli, "_spaces", stopped)
    monkeypatch.setattr(_outputs, "atomic_write", signalled)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path))
    code, _, err = _run(["zoo", "--json", str(tmp_path / "out.json"), "--quiet"], capsys)
    assert code == cli.EXIT_TERMINATED and "GITHUB_STEP_SUMMARY: writing it failed" in err
