"""The report (report): sparklines and profiles, the reproduction line, and the notes a row reads
(stable on one seed so far, not judged, no growth read, one-sided targets)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from closed_form import ScaledIdentity

from stabilitycheck.counterexample import Counterexample
from stabilitycheck.space import Axis, Space
from stabilitycheck.verdicts import Limits

GROWTH_LIMIT = 100.0


def test_a_sparkline_of_more_values_than_its_width_keeps_a_lone_spike() -> None:
    """Two values per character: each character shows its bucket's largest, so one spike among 127
    ones is the top level; the bucket's first value alone showed a flat line."""
    from stabilitycheck.report import SPARKS, sparkline

    values = [1.0] * 128
    values[77] = 1e6
    line = sparkline(values, width=64)
    assert len(line) == 64 and line[77 // 2] == SPARKS[-1] and line.count(SPARKS[-1]) == 1


def test_a_flat_profile_is_drawn_flat_and_a_factor_of_two_spans_the_levels() -> None:
    """Levels span at least a factor 2: values 0.009% apart drew the full ramp (found by a user's
    trial); a profile falling by exactly 2x still reaches the top level, a 1.41x one halfway.
    Oracle: log10 of the values over log10 2, by hand."""
    from stabilitycheck.report import SPARKS, sparkline

    assert sparkline([1.03e-5 * (1 + 2e-5 * k) for k in range(5)]) == SPARKS[0] * 5
    assert sparkline([2.0, 1.0]) == SPARKS[-1] + SPARKS[0]
    assert sparkline([2**0.5, 1.0]) == SPARKS[round(0.5 * (len(SPARKS) - 1))] + SPARKS[0]


def test_the_reproduction_line_passes_the_limits_that_differ_from_the_defaults() -> None:
    """The line re-judges on the limits the search used: the changed one is in it, the defaults not."""
    from stabilitycheck.config import Config
    from stabilitycheck.report import reproduction

    line = reproduction(Config.of("mlp", depth=4), Limits(growth=10.0))
    assert "sc.Limits(growth=10.0)" in line


def _judged(depth: int, scale: float, seeds: int = 1) -> tuple[object, object]:
    subject = ScaledIdentity()
    config = subject.config(depth=depth, init_scale=scale).with_run(seeds=seeds)
    from stabilitycheck.seeds import assess

    return config, assess(config, subject, Limits(growth=GROWTH_LIMIT, grad_norm=None, divergence=None))  # type: ignore[arg-type]


def test_an_interrupted_stable_row_of_a_one_seed_run_is_not_stable_on_one_seed_so_far() -> None:
    """'stable on one seed so far' says the full rule over seeds was not reached; where the run has
    one seed (seeds=1), its one seed is the full rule: the row says plainly 'stable'."""
    from stabilitycheck.counterexample import SearchResult
    from stabilitycheck.reporttable import no_explosion

    config, judged = _judged(2, 1.5)
    space = Space("cf", config, (Axis.range("depth", 1, 2),))  # type: ignore[arg-type]
    result = SearchResult(space, None, 1, 1, 0.0, config, judged, interrupted=True)  # type: ignore[arg-type]
    assert no_explosion(result) == "interrupted, stable (tried up to depth=2)"


def test_a_row_whose_only_remedy_could_not_be_judged_says_not_judged() -> None:
    """'fixed by': a remedy whose model raised is 'not judged: NAME', never 'none of NAME' (which says
    it was measured and did not fix it)."""
    from stabilitycheck.counterexample import SearchResult
    from stabilitycheck.remedies import Remedy
    from stabilitycheck.reporttable import row

    config, judged = _judged(5, 3.0)
    space = Space("cf", config, (Axis.range("depth", 1, 5),))  # type: ignore[arg-type]
    remedy = Remedy("critical init", config, None, skipped="the model raised ValueError: x")  # type: ignore[arg-type]
    cx = Counterexample("cf", config, judged, Limits(), (remedy,))  # type: ignore[arg-type]
    cells = row(SearchResult(space, cx, 1, 1, 0.0, None))
    assert cells[8] == "not judged: critical init"


def test_a_nan_growth_from_an_overflow_is_no_growth_not_read_note() -> None:
    """'growth not read' is for a chain whose every dL/d output is 0 (0 / 0); a NaN growth from a
    value that overflowed (first_nonfinite set, reported on its own line) is not that."""
    from stabilitycheck.counterexample import SearchResult
    from stabilitycheck.reportnotes import unmeasured

    config, judged = _judged(3, 1e30)  # float32: the output overflows to inf, its gradient NaN
    m = judged.measurement  # type: ignore[attr-defined]
    assert math.isnan(m.growth) and m.first_nonfinite is not None
    space = Space("cf", config, (Axis.range("depth", 1, 3),))  # type: ignore[arg-type]
    cx = Counterexample("cf", config, judged, Limits(), ())  # type: ignore[arg-type]
    assert unmeasured([SearchResult(space, cx, 1, 1, 0.0, None)]) == []


def test_a_target_exploding_on_every_device_and_precision_is_not_one_sided() -> None:
    """one_sided names a target that explodes on some devices or precisions and not on others; one
    that explodes on all it ran on (here its one row) gets no line."""
    from stabilitycheck.counterexample import SearchResult
    from stabilitycheck.reportnotes import one_sided

    config, judged = _judged(5, 3.0)
    space = Space("cf", config, (Axis.range("depth", 1, 5),))  # type: ignore[arg-type]
    cx = Counterexample("cf", config, judged, Limits(), ())  # type: ignore[arg-type]
    exploding = SearchResult(space, cx, 1, 1, 0.0, None)
    stable = SearchResult(space.with_run(dtype="float64"), None, 1, 1, 0.0, config, judged)  # type: ignore[arg-type]
    assert one_sided([exploding]) == []
    assert one_sided([exploding, stable]) == ["! cf explodes only on cpu/float32 (stable on cpu/float64)"]
    # a row where every point was skipped, or one interrupted, tested nothing to the end: never 'stable'
    untested = SearchResult(space.with_run(dtype="float64"), None, 0, 3, 0.0, None)
    assert one_sided([exploding, untested]) == ["! cf explodes on cpu/float32 (not judged on cpu/float64)"]
    cut = SearchResult(space.with_run(dtype="bfloat16"), None, 1, 1, 0.0, config, judged, interrupted=True)  # type: ignore[arg-type]
    assert one_sided([exploding, stable, cut]) == [
        "! cf explodes on cpu/float32 (stable on cpu/float64; not judged on cpu/bfloat16)"
    ]


def test_a_rows_skipped_steps_say_whose_and_over_how_many_seeds() -> None:
    """', 4 skipped steps' beside the criterion said neither who skipped them nor over what (a new
    user's trial: the GradScaler's overflow at step 0 of each of 4 seeds). Oracle: the judgement's
    own sum and seed count."""
    from dataclasses import replace

    from stabilitycheck.counterexample import SearchResult
    from stabilitycheck.reporttable import row

    config, judged = _judged(5, 3.0, seeds=3)
    judged = replace(judged, skipped_steps=4)  # type: ignore[type-var]
    space = Space("cf", config, (Axis.range("depth", 1, 5),))  # type: ignore[arg-type]
    cx = Counterexample("cf", config, judged, Limits(), ())  # type: ignore[arg-type]
    cells = row(SearchResult(space, cx, 1, 1, 0.0, None))
    seeds = len(judged.seeds)  # type: ignore[attr-defined]
    assert f", the GradScaler skipped 4 steps over {seeds} seeds" in cells[4] and seeds > 1
    one = replace(judged, skipped_steps=1, seeds=judged.seeds[:1])  # type: ignore[attr-defined]
    cx = Counterexample("cf", config, one, Limits(), ())  # type: ignore[arg-type]
    assert ", the GradScaler skipped 1 step over 1 seed" in row(SearchResult(space, cx, 1, 1, 0.0, None))[4]


SEQ2SEQ = """
import torch
from torch import nn

class Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec, self.head = nn.RNN(8, 8), nn.RNN(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        _, h = self.enc(x[:6])
        y, _ = self.dec(x[6:], h)
        return self.head(y)

    def stability_blocks(self):
        return [("enc", self.enc), ("dec", self.dec)]

def build():
    return Seq2Seq()

def batch(model, batch_size=4):
    return torch.randn(9, batch_size, 8)
"""


def test_a_chain_ending_in_an_output_no_gradient_reached_is_said(tmp_path: Path) -> None:
    """An encoder nn.RNN handing its final state to a decoder is read on its output sequence, which
    the loss does not use: dL/d out is exactly 0 there, the decoder starts a chain of its own, and the
    growth read 1 with no word of it (found by an audit). Oracle: torch's gradient of the encoder's
    output sequence is exactly 0 and its final state's is not."""
    from stabilitycheck.config import Config
    from stabilitycheck.counterexample import SearchResult
    from stabilitycheck.reportnotes import unreached
    from stabilitycheck.seeds import assess
    from stabilitycheck.subjects import resolve

    path = tmp_path / "seq2seq.py"
    path.write_text(SEQ2SEQ)
    config = Config.of(f"{path}:build", seeds=1)
    judged = assess(config, limits=Limits(grad_norm=None))
    built = resolve(config.subject).build(config)
    out, h = built.model.enc(built.inputs[:6])
    y, _ = built.model.dec(built.inputs[6:], h)
    g_out, g_h = torch.autograd.grad(
        built.loss_fn(built.model.head(y), built.inputs), [out, h], allow_unused=True
    )
    assert (g_out is None or not g_out.any()) and bool(g_h.any())
    space = Space(str(path), config, ())
    notes = unreached([SearchResult(space, None, 1, 1, 0.0, config, judged)])
    assert len(notes) == 1 and "no gradient reaches enc's output (exactly 0)" in notes[0]


STAGES_WITH_CLS = """
import torch
from torch import nn

class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(16, 16)

    def forward(self, x, cls):  # the tokens and the class token mixed, then split (PiT's stages)
        joint = torch.tanh(2.0 * self.mix(torch.cat([x, cls], -1)))
        return joint[:, :8], joint[:, 8:]

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList(Stage() for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        cls = torch.zeros_like(x)
        for stage in self.stages:
            x, cls = stage(x, cls)
        return self.head(cls)

def build():
    return Model()

def batch(model, batch_size=4):
    return torch.randn(batch_size, 8)
"""


def test_a_last_block_whose_first_output_the_loss_does_not_take_is_said(tmp_path: Path) -> None:
    """Stages returning (x, cls), the head reading the last stage's cls (timm's PiT): the probe reads
    each stage on x, whose gradient at the last stage is exactly 0, and the growth covered one stage
    of three with no word of it (an audit). Oracle: torch's gradient of the last stage's x is exactly
    0 (or None), its weights' is not."""
    from stabilitycheck.config import Config
    from stabilitycheck.counterexample import SearchResult
    from stabilitycheck.reportnotes import unreached
    from stabilitycheck.seeds import assess
    from stabilitycheck.subjects import resolve

    path = tmp_path / "stages.py"
    path.write_text(STAGES_WITH_CLS)
    config = Config.of(f"{path}:build", seeds=1)
    judged = assess(config, limits=Limits(grad_norm=None))
    model = resolve(config.subject).build(config).model
    outs: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.stages[-1].register_forward_hook(lambda _m, _a, o: outs.append(o))
    x = torch.randn(4, 8)
    loss = model(x).pow(2).sum()
    g_x, g_w = torch.autograd.grad(loss, [outs[0][0], model.stages[-1].mix.weight], allow_unused=True)
    assert (g_x is None or not g_x.any()) and bool(g_w.any())
    space = Space(str(path), config, ())
    notes = unreached([SearchResult(space, None, 1, 1, 0.0, config, judged)])
    assert len(notes) == 1 and "no gradient reaches stages.2's output (exactly 0)" in notes[0], notes
