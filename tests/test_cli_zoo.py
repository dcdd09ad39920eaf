"""`stabilitycheck zoo`: exit codes, the table, JSON, Markdown and --replay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stabilitycheck.cli import main

FAST = ["--database", "none", "--max-examples", "20"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_exploding_family_exits_1_with_its_row(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    code, out, err = run(capsys, "zoo", "--family", "mlp", *FAST, "--json", str(js), "--markdown", str(md))
    assert code == 1
    header, _, row = out.splitlines()[:3]
    assert header.split()[:4] == ["target", "device", "precision", "smallest"]
    assert row.split()[:3] == ["mlp", "cpu", "float32"] and "growth" in row
    assert "reproduce python -c" in out
    assert "searching mlp on cpu" in err
    data = json.loads(js.read_text())
    assert data[0]["counterexample"]["config"]["subject"] == "mlp"
    assert md.read_text().startswith("## stabilitycheck") and "```bash" in md.read_text()
    # --replay re-probes the stored Config and prints the same row
    code2, out2, _ = run(capsys, "zoo", "--replay", str(js), *FAST)
    assert code2 == 1
    assert out2.splitlines()[2].split()[:6] == row.split()[:6]


def test_replay_judges_each_counterexample_on_the_limits_it_was_found_under(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A counterexample found under --growth-limit 50 read stable on replay, judged on the default
    100, exit 0 (a new user's trial: a CI job replaying it passed). Its stored limits judge it now;
    one the command line sets overrides that one alone. Oracle: assess() of the stored Config on each
    Limits."""
    from stabilitycheck.config import Config
    from stabilitycheck.seeds import assess
    from stabilitycheck.verdicts import Limits

    js = tmp_path / "r.json"
    knobs = ["--knob", "depth=1:20", "--knob", "init_scale=2.5"]
    code, out, _ = run(
        capsys, "zoo", "--family", "mlp", *knobs, "--growth-limit", "50", *FAST, "--json", str(js)
    )
    assert code == 1
    config = Config.from_dict(json.loads(js.read_text())[0]["counterexample"]["config"])
    assert assess(config, limits=Limits(growth=50)).exploded and not assess(config).exploded
    code, out, _ = run(capsys, "zoo", "--replay", str(js), *FAST)
    assert code == 1 and "> 50" in out.splitlines()[2]
    code, out, _ = run(capsys, "zoo", "--replay", str(js), "--growth-limit", "100", *FAST)
    assert code == 0


def test_a_replay_refuses_the_options_it_does_not_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--replay re-judges each stored counterexample as found: --dtype float64 --seeds 1 --steps 5
    were ignored in silence (float32, 3 seeds, 'clip: n/a (no optimiser steps: --steps N)'), and a
    target naming none of the file's rows replayed those rows (a new user's trial). Each is now one
    line, exit 2, naming what has no effect; the search's budget (--max-examples, --database) and the
    limits are still taken."""
    js = tmp_path / "r.json"
    assert run(capsys, "zoo", "--family", "mlp", *FAST, "--json", str(js))[0] == 1
    for extra, said in (
        (["--dtype", "float64", "--seeds", "1", "--steps", "5"], "--seeds, --steps, --dtype have no effect"),
        (["--family", "rnn"], "--family has no effect"),
        (["--knob", "depth=1:3"], "--knob has no effect"),
        (["--seeds", "5", "--seed", "0"], "--seed, --seeds have no effect"),  # at their defaults: a review
    ):
        code, out, err = run(capsys, "zoo", "--replay", str(js), *extra)
        assert code == 2 and said in err and err.count("\n") == 1 and not out, err
    code, out, err = run(capsys, "rnn", "--replay", str(js))
    assert code == 2 and "holds no counterexample of rnn (its rows are of mlp)" in err
    assert run(capsys, "mlp", "--replay", str(js), *FAST, "--growth-limit", "100")[0] == 1


def test_a_target_named_beside_replay_replays_its_own_rows_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlp --replay zoo.json` replayed every family's rows; and a target naming none of them was
    refused only after every row had been judged (a review). Oracle: the rows judged, counted."""
    from stabilitycheck import seeds

    js = tmp_path / "r.json"
    assert run(capsys, "zoo", "--family", "mlp,rnn", *FAST, "--json", str(js))[0] == 1
    judged: list[str] = []
    real = seeds.assess
    monkeypatch.setattr(seeds, "assess", lambda c, *a, **k: judged.append(c.subject) or real(c, *a, **k))
    code, out, _ = run(capsys, "mlp", "--replay", str(js))
    assert code == 1 and judged == ["mlp"] and len(out.split("\n\n")[0].splitlines()) == 3
    assert run(capsys, "gru", "--replay", str(js))[0] == 2 and judged == ["mlp"]


def test_a_replay_file_whose_limits_are_not_numbers_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    js = tmp_path / "r.json"
    assert run(capsys, "zoo", "--family", "mlp", *FAST, "--json", str(js))[0] == 1
    data = json.loads(js.read_text())
    data[0]["counterexample"]["limits"]["growth"] = "100"
    js.write_text(json.dumps(data))
    code, _, err = run(capsys, "zoo", "--replay", str(js), *FAST)
    assert code == 2 and "limit growth='100' must be a number > 0 or null" in err and err.count("\n") == 1


def test_stable_family_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "zoo", "--family", "lstm", "--knob", "seq_len=1:16", "--knob", "init_scale=1.0", *FAST
    )
    assert code == 0
    assert "stable (tried up to seq_len=" in out


def test_same_seed_same_output(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["zoo", "--family", "rnn", "--knob", "seq_len=1:64", "--seed", "5", *FAST]
    assert run(capsys, *args)[:2] == run(capsys, *args)[:2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["zoo", "--family", "mpl"], "--family 'mpl' is not a zoo target"),
        (["zoo", "--knob", "depth=5:1"], "depth=5:1 is empty"),
        (["zoo", "--knob", "depth"], "--knob 'depth' is malformed"),
        (["zoo", "--knob", "dept=1:4"], "'dept' is not a knob of mlp"),
        (["zoo", "--lr", "-1"], "argument --lr"),
        (["zoo", "--dtype", "fp8"], "argument --dtype: 'fp8' is not a dtype it probes"),
        (["zoo", "--dtype", "float32,flaot16"], "(did you mean 'float16'?)"),
        (["zoo", "--replay", "/nonexistent.json"], "no such file"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run(capsys, *argv, *FAST)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_console_script_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stabilitycheck.cli", "zoo", "--family", "nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("stabilitycheck: error:")


# init_scale 3 (above the critical 1.0): the tanh MLP explodes with depth, so a reproduction is shown
EXPLODING = ("zoo", "--family", "mlp", "--knob", "depth=1:24", "--knob", "init_scale=3.0")


def test_github_step_summary_is_appended(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    run(capsys, *EXPLODING, *FAST)
    text = summary.read_text()
    assert text.startswith("earlier step\n## stabilitycheck")
    assert "| mlp " in text and "```bash\npython -c" in text


@pytest.mark.parametrize("spelt", ["absolute", "relative"])
def test_markdown_given_the_step_summary_appends_to_it_once(
    spelt: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The CI recipe's --markdown "$GITHUB_STEP_SUMMARY" wrote over the step's earlier summary, and a
    path spelt otherwise than the variable wrote it twice (found by a user's trial)."""
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.chdir(tmp_path)
    given = str(summary) if spelt == "absolute" else "summary.md"
    run(capsys, *EXPLODING, "--markdown", given, *FAST)
    text = summary.read_text()
    assert text.startswith("earlier step\n## stabilitycheck") and text.count("## stabilitycheck") == 1


def test_ctrl_c_exits_130_and_still_prints_what_was_found(tmp_path: Path) -> None:
    import signal
    import time

    js = tmp_path / "partial.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stabilitycheck.cli", "zoo", "--database", "none", "--json", str(js)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until mlp is done and the next family has started
        if "probes in" in (proc.stderr.readline() if proc.stderr else ""):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert out.startswith("target") and "\nmlp " in out
    assert json.loads(js.read_text())[0]["label"] == "mlp"  # what was found so far is written


def test_the_table_and_details_name_the_quantile_judged_on(capsys: pytest.CaptureFixture[str]) -> None:
    """Under --quantile 0.8 the table's header names q=0.8 where the numbers are that quantile (the
    criterion, the growth, the kind's rate), and the details say which seed the profile is and that
    the kind's rate is the quantile of the seeds' fits."""
    code, out, _ = run(
        capsys, "mlp", "--knob", "depth=8:16", "--knob", "init_scale=3.5", "--quantile", "0.8", *FAST
    )
    assert code == 1
    header = out.splitlines()[0]
    for column in ("criterion (q=0.8)", "growth: q=0.8 (min-max), seeds", "kind (rate: q=0.8)"):
        assert column in header, header
    assert "q=0.8 over" in out and "seeds' fits)" in out
    assert "the q=0.8 growth of" in out


def test_a_stall_at_the_lowest_corner_is_said_to_stall(capsys: pytest.CaptureFixture[str]) -> None:
    """lr 1e-6 over 2 steps: the loss barely moves at every depth, so --stall-limit 0.95 fires at the
    lowest corner, and the note said the model 'explodes there already' (a new user's trial)."""
    knobs = ["--knob", "depth=1:3", "--knob", "init_scale=1.0", "--steps", "2", "--lr", "1e-6"]
    code, out, _ = run(capsys, "zoo", "--family", "mlp", *knobs, "--stall-limit", "0.95", *FAST)
    assert code == 1
    (note,) = [line for line in out.splitlines() if "lowest corner" in line]
    assert "the model stalls there already" in note and "explodes" not in note
