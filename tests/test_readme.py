"""The README's examples run, and the output it shows has the shape, and makes the claims, of what the
tool prints today (the numbers of one seeded run are not frozen: an oracle checks them instead)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from meanfield_oracle import tanh_chi1

from stabilitycheck import Config, Limits, assess
from stabilitycheck.reporttable import headers

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
    # a name no file has: named README.md, Hypothesis's inspect.getsource read the markdown as Python
    # at the block's line numbers, and prose elsewhere in the README broke its tokenizer
    exec(compile(source, "<README.md python block>", "exec"), namespace)
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
    assert header == shown_header == list(headers(0.5))
    assert row[0] == shown_row[0] == "model.py"  # the target as typed
    assert row[3] == shown_row[3] and re.fullmatch(r"depth=\d+", row[3])  # the canonical point
    assert criterion_fired(row[4]) and criterion_fired(shown_row[4])
    assert "reproduce python -c" in proc.stdout and "reproduce python -c" in shown
    # a flat Sequential's blocks are named by index: the profile says "block '62'", not a bare '62'
    # that read like a number, nor 'block 62', like a count beside '32 layers' (users' trials); 32
    # layers, the last one's Linear at 62
    last = 2 * (int(row[3].split("=")[1]) - 1)
    assert re.search(rf"\n  profile   \(input\) \S+ block '{last}'   \|dL/d \(input\)\|", proc.stdout)
    # oracle: the point is 1-minimal, re-judged over seeds here (sigma_w = 2 tanh: gain > 1 per layer,
    # so growth rises with depth); one layer less does not explode
    depth = int(row[3].split("=")[1])
    subject = f"{tmp_path / 'model.py'}:build"
    assert assess(Config.of(subject, depth=depth), limits=Limits()).exploded
    assert not assess(Config.of(subject, depth=depth - 1), limits=Limits()).exploded


def test_the_watch_example_prints_the_report_the_readme_shows(capsys: pytest.CaptureFixture[str]) -> None:
    """The report under the watch example is what it prints (to stderr), its decimals apart (the
    norms' last digits may differ between machines): it showed block 5 unquoted after messages had
    come to quote digit-start names, and no line naming the blocks watched."""
    (source,) = [s for s in PYTHON if "stabilitycheck.watch(model, opt, skip=True)" in s]
    after = README.index(source) + len(source)
    start = README.index("```text\n", after) + len("```text\n")
    shown = README[start : README.index("```", start)]
    exec(compile(source, "<README.md python block>", "exec"), {})
    printed = capsys.readouterr().err

    def masked(text: str) -> str:
        return re.sub(r"\d+\.\d+", "N", text).strip()

    assert masked(printed) == masked(shown)


def _zoo_config(label: str, knobs: str) -> Config:
    """The Config of a README zoo row: the target's base with the knobs the row shows."""
    from stabilitycheck.zoo import targets

    space = targets()[label]
    values = {k: float(v) if "." in v else int(v) for k, v in (kv.split("=") for kv in knobs.split())}
    return space.base.with_knobs(**values)


def _mean_field_depth(sigma: float, limit: float = 100.0) -> int:
    """Oracle: the depth at which a bias-free tanh MLP's mean-field growth sqrt(chi_1)^depth (from the input)
    first passes the limit (Poole et al. 2016), chi_1 at the fixed point (meanfield_oracle)."""
    return math.floor(math.log(limit) / math.log(math.sqrt(tanh_chi1(sigma)))) + 1


def test_the_zoo_table_shown_is_true_over_seeds() -> None:
    """Each exploding row of the README's zoo table is re-judged over seeds here: it explodes, and one
    grid step lower on each searched knob it does not (1-minimal in the median); each stable row is
    stable at the largest configuration it says it tried. The tanh MLP's depth is checked against
    mean-field theory. Not a re-run of the whole search, nor a comparison of bytes."""
    from stabilitycheck.zoo import targets

    ((_, shown),) = [o for o in OUTPUTS if o[0] == "stabilitycheck zoo"]
    header, rows = table(shown)
    assert header == list(headers(0.5))
    spaces = targets()
    assert [r[0] for r in rows] == list(spaces)  # every zoo target, in order
    for label, _, _, point, criterion, *_ in rows:
        space = spaces[label]
        if point.startswith("stable"):
            tried = point.removeprefix("stable (tried up to ").removesuffix(")")
            assert not assess(_zoo_config(label, tried)).exploded, label
            continue
        assert criterion_fired(criterion)
        config = _zoo_config(label, point)
        assert assess(config).exploded, label
        for axis in space.axes:
            i = list(axis.values).index(config.knob(axis.name))
            if i > 0:
                lower = config.with_knobs(**{axis.name: axis.values[i - 1]})
                assert not assess(lower).exploded, (label, axis.name)
    mlp = _zoo_config("mlp", next(r[3] for r in rows if r[0] == "mlp"))
    expected = _mean_field_depth(float(mlp.knob("init_scale")))
    assert abs(int(mlp.knob("depth")) - expected) <= 2, (mlp.knob("depth"), expected)


def test_the_spread_between_seeds_the_readme_states_is_measured() -> None:
    """The README's example of one draw being one draw: its min, median and max growth over the first
    20 seeds of a Config, re-measured here (rounded as shown), and a spread of 3-10x as it says."""
    from stabilitycheck import probe
    from stabilitycheck.seeds import seed_of
    from stabilitycheck.spread import quantile

    shown = re.search(
        r"width (\d+), σ_w ([\d.]+), depth (\d+), batch (\d+): growth ([\d.]+)-([\d.]+), median ([\d.]+), "
        r"over the first (\d+) seeds",
        README,
    )
    assert shown is not None
    width, sigma, depth, batch, low, high, mid, n = shown.groups()
    config = Config.of(
        "mlp", width=int(width), init_scale=float(sigma), depth=int(depth), batch_size=int(batch)
    )
    growth = [probe(config.with_run(seed=seed_of(0, i))).growth for i in range(int(n))]
    assert [f"{min(growth):.3g}", f"{max(growth):.3g}", f"{quantile(growth, 0.5):.3g}"] == [low, high, mid]
    assert 3 <= max(growth) / min(growth) <= 10
