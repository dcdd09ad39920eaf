"""--plot: a valid PNG of sensible size for a known counterexample; a clear error without matplotlib."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from stabilitycheck.cli import main
from stabilitycheck.config import Config
from stabilitycheck.errors import UsageError
from stabilitycheck.searching import search
from stabilitycheck.space import Axis, Space

# a tanh MLP at init_scale 3 (above the critical 1.0): its gradients grow ~ gain^depth and explode
KNOWN = Space(
    "mlp",
    Config.of("mlp", width=16, batch_size=4, init_scale=3.0, steps=2, seeds=1),
    (Axis.range("depth", 1, 30),),
)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_renders_a_png_of_a_counterexample(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from stabilitycheck.plot import plot

    result = search(KNOWN, max_examples=20)
    assert result.counterexample is not None
    out = tmp_path / "cx.png"
    assert plot([result], out) == 1
    width, height = png_size(out)
    assert 600 <= width <= 2000 and 200 <= height <= 2000
    assert out.stat().st_size > 10_000  # a drawn figure, not an empty canvas


def test_cli_plot_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "zoo.png"
    code = main(
        [
            "zoo",
            "--family",
            "mlp",
            "--knob",
            "depth=1:24",
            "--knob",
            "init_scale=3.0",  # above the critical 1.0: with any --knob, only the named knobs move
            "--seeds",
            "1",
            "--max-examples",
            "10",
            "--database",
            "none",
            "--plot",
            str(out),
        ]
    )
    assert code == 1 and png_size(out)[0] > 0


def test_missing_matplotlib_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from stabilitycheck.plot import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(UsageError, match=r"pip install 'stabilitycheck\[plot\]'"):
        plot([], tmp_path / "x.png")


def test_a_long_title_stays_inside_the_figure_and_the_limit_line_says_where_it_is() -> None:
    """A model path of 150 characters: its title line ran past the panel and was cut off on the left.
    Oracle: matplotlib's own rendered extents (every title line inside the figure). The dashed line is
    drawn at limit x the last block's |dL/d out|, and its label says so."""
    pytest.importorskip("matplotlib")
    import dataclasses

    from stabilitycheck.plot import figure

    result = search(KNOWN, max_examples=5)
    cx = result.counterexample
    assert cx is not None
    long = "/" + "/".join(["a-rather-long-folder-name"] * 6) + "/model.py:build"
    result = dataclasses.replace(
        result, counterexample=dataclasses.replace(cx, config=dataclasses.replace(cx.config, subject=long))
    )
    fig, rows = figure([result])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    left = fig.axes[0]
    title = left.title.get_window_extent(renderer)
    assert long[:40] in left.get_title().replace("\n", "")
    assert box.x0 <= title.x0 and title.x1 <= box.x1, (title, box)
    (line,) = [ln for ln in left.get_lines() if ln.get_linestyle() == "--"]
    last = cx.judgement.measurement.activation_grad_norms[-1]
    assert line.get_ydata()[0] == pytest.approx(last * cx.limits.growth)  # type: ignore[index, operator]
    assert "x the last block's |dL/d out|" in str(line.get_label())
    assert rows == 1
    # the curves are the measurement's: the profile (KNOWN explodes finite: every value drawn) on the
    # left, the total grad norm and the loss per step on the right (KNOWN takes 2 steps)
    m = cx.judgement.measurement
    profile = left.get_lines()[0]
    assert list(profile.get_ydata()) == list(m.activation_grad_norms)  # type: ignore[arg-type]
    curves = {str(ln.get_label()): list(ln.get_ydata()) for ln in fig.axes[1].get_lines()}  # type: ignore[arg-type]
    assert curves["total grad norm"] == list(m.grad_norm) and curves["loss"] == list(m.loss)
    assert len(m.loss) == 3
    # both panels name the seed they show, the one whose growth is the verdict's quantile (a new
    # user's trial: the right panel named none)
    seed = f"seed {cx.judgement.measured_seed}: the q=0.5 growth's"
    assert seed in left.get_ylabel() and seed in fig.axes[1].get_title() + fig.axes[1].get_xlabel()


def test_a_non_finite_profile_is_marked_not_left_out() -> None:
    """A counterexample whose profile is Inf/NaN drew two empty panels (a log axis cannot draw them;
    found by a user's trial): each non-finite block call is a red line at its index, the x range
    spans every call. Oracle: the measurement's own non-finite entries."""
    pytest.importorskip("matplotlib")
    import math

    from stabilitycheck.plot import figure

    space = Space(
        "mlp",
        Config.of("mlp", width=8, batch_size=4, init_scale=1e30, activation="relu", seeds=1),
        (Axis.range("depth", 2, 4),),
    )
    result = search(space, max_examples=5)
    assert result.counterexample is not None
    values = result.counterexample.judgement.measurement.activation_grad_norms
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    assert bad  # the case: a NaN profile
    fig, _ = figure([result])
    left = fig.axes[0]
    marked = [
        ln.get_xdata()[0]
        for ln in left.get_lines()
        if ln.get_color() == "tab:red" and ln.get_linewidth() == 3
    ]
    assert marked == bad and left.get_xlim() == (-0.5, len(values) - 0.5)
    assert "non-finite (Inf/NaN)" in [t.get_text() for t in left.get_legend().get_texts()]


def test_a_recurrent_cell_s_weight_panel_names_its_block_and_keeps_its_title_inside() -> None:
    """A recurrent subject is one block (its cell): the weight-gradient panel drew one dot over an axis
    of -0.4..0.4 and its title ran past the figure (a new user's trial). Oracle: the measurement's
    block names as the tick labels, the point at the measured norm, and matplotlib's own extents."""
    pytest.importorskip("matplotlib")
    from stabilitycheck.plot import figure

    space = Space(
        "rnn",
        Config.of("rnn", width=8, batch_size=2, init_scale=4.0, seeds=1),
        (Axis.range("seq_len", 2, 40),),
    )
    result = search(space, max_examples=5)
    fig, _ = figure([result])
    fig.canvas.draw()
    right = fig.axes[1]
    m = result.shown.measurement  # type: ignore[union-attr]
    assert [t.get_text() for t in right.get_xticklabels()] == list(m.layer_names) == ["cell"]
    assert list(right.get_lines()[0].get_ydata()) == list(m.layer_grad_norms)  # type: ignore[arg-type]
    title = right.title.get_window_extent(fig.canvas.get_renderer())
    assert fig.bbox.x0 <= title.x0 and title.x1 <= fig.bbox.x1, (title, fig.bbox)


def test_every_limit_line_lies_below_its_legend() -> None:
    """A stable LSTM's growth limit line, drawn across the panel, lay under the legend at the top
    (listed there, never seen: a new user's trial). Oracle: matplotlib's own rendered extents: on every
    panel, each dashed limit line lies below the legend's box; the stable LSTM (its limit line above a
    profile that rises to the right) and a counterexample with steps (the grad-norm limit too)."""
    pytest.importorskip("matplotlib")
    from stabilitycheck import zoo
    from stabilitycheck.plot import figure

    lstm = zoo.targets()["lstm"]
    small = Space("lstm", lstm.base.with_knobs(width=8, batch_size=2), (Axis("seq_len", (64,)),))
    results = [search(small, max_examples=1), search(KNOWN, max_examples=5)]
    fig, _ = figure(results)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    checked = 0
    for ax in fig.axes:
        legend = ax.get_legend()
        for line in (ln for ln in ax.get_lines() if ln.get_linestyle() == "--"):
            y = ax.transData.transform((0, line.get_ydata()[0]))[1]  # type: ignore[index]
            assert ax.bbox.y0 <= y < legend.get_window_extent(renderer).y0, (ax.get_title(), line.get_label())
            checked += 1
    assert checked == 3  # the LSTM's growth limit, KNOWN's growth and grad-norm limits


def test_room_above_a_line_near_the_top_of_the_float_range_keeps_the_axis() -> None:
    """Raising the axis over a limit line at 1e300 overflowed (10 ** 430) and lost the whole PNG, as
    did a line at inf (a review). Oracle: the axis as it was, no exception; a line in range still
    lies at most LEGEND_ROOM up its raised axis."""
    pytest.importorskip("matplotlib")
    import math

    from stabilitycheck.plot import LEGEND_ROOM, _room_above, pyplot

    fig, ax = pyplot().subplots()
    ax.semilogy([1e200, 1e300])
    before = ax.get_ylim()
    for y in (1e300, math.inf):
        _room_above(ax, y)
        assert ax.get_ylim() == before
    _room_above(ax, 1e250)  # in range, half way up 1e200..1e300 once matplotlib's margins are taken
    bottom, top = (math.log10(v) for v in ax.get_ylim())
    assert (250 - bottom) / (top - bottom) <= LEGEND_ROOM + 1e-9
    pyplot().close(fig)
