"""Rules of searching, counterexample, space, subject, loops, report, findings, replay, losses,
watchcapture, hf, strategies and _validation that mutation testing changed without any other test
failing: each test pins one (a wrong bound, a dropped condition, the first for the largest).
Every expected value comes from an independent oracle (a closed form, decimal arithmetic, PyTorch's own
functions, a hand count), never from what the code printed."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from closed_form import ScaledIdentity
from torch import nn
from torch.nn import functional as F

from stabilitycheck.config import Config
from stabilitycheck.counterexample import Counterexample
from stabilitycheck.searching import search
from stabilitycheck.space import Axis, Space
from stabilitycheck.subject import Built
from stabilitycheck.verdicts import Limits

GROWTH_LIMIT = 100.0


def _explodes(config: object) -> bool:
    """The closed form: init_scale ** depth over the growth limit (gain 1 on every seed)."""
    return float(config.knob("init_scale")) ** int(config.knob("depth")) > GROWTH_LIMIT  # type: ignore[attr-defined]


def test_an_interrupted_search_keeps_the_smallest_exploding_point_it_judged() -> None:
    """Ctrl-C before the descent ends: the rough counterexample is the exploding point judged with the
    smallest grid indices (sum, then lexicographic), found here by hand from the Configs built; the
    largest one (a max for the min) reported a far larger point as the smallest exploding one."""
    subject = ScaledIdentity()
    depths, scales = Axis.range("depth", 1, 12), Axis("init_scale", (1.5, 2.0, 3.0))
    space = Space("cf", subject.config().with_run(seeds=1), (depths, scales))
    limits = Limits(growth=GROWTH_LIMIT, grad_norm=None, divergence=None)

    def index(config: object) -> tuple[int, int]:
        return (
            list(depths.values).index(config.knob("depth")),  # type: ignore[attr-defined]
            list(scales.values).index(config.knob("init_scale")),  # type: ignore[attr-defined]
        )

    exploding: set[tuple[int, int]] = set()

    def progress(_: str) -> None:
        exploding.update(index(c) for c in subject.builds if _explodes(c))
        if len(exploding) >= 3:
            raise KeyboardInterrupt

    result = search(space, subject=subject, limits=limits, progress=progress, max_examples=60)
    assert result.interrupted and not result.minimal and result.counterexample is not None
    want = min(exploding, key=lambda i: (sum(i), i))
    assert index(result.counterexample.config) == want


# ---------------------------------------------------------------------------------------- space.py


def test_a_float_knob_range_keeps_its_upper_end_when_the_step_divides_it_in_decimal() -> None:
    """0.1:0.7 step 0.1 is the seven points 0.1, 0.2, ..., 0.7 (decimal arithmetic: 0.6 / 0.1 = 6);
    float division gives 5.999999999999999, whose floor dropped 0.7 from the grid."""
    axis = Axis.range("init_scale", 0.1, 0.7, 0.1)
    assert list(axis.values) == [k / 10 for k in range(1, 8)]


def test_a_float_knob_range_without_a_step_has_16_points_from_lo_to_hi() -> None:
    """Axis.range's documented default: 16 points, lo and hi included (15 steps of (hi - lo) / 15)."""
    values = list(Axis.range("init_scale", 0.5, 2.0).values)
    assert len(values) == 16 and values[0] == 0.5 and values[-1] == 2.0
    assert all(math.isclose(b - a, 0.1) for a, b in itertools.pairwise(values))


def test_a_knob_grid_with_a_repeated_value_is_refused() -> None:
    """A grid must be strictly ascending: a repeated value is a ConfigError, not a second probe of
    one point (the descent's one-step-lower neighbour would be the point itself)."""
    from stabilitycheck.errors import ConfigError

    with pytest.raises(ConfigError, match="strictly ascending"):
        Axis("depth", (1, 2, 2, 3))


def test_a_knob_range_of_one_value_is_that_value() -> None:
    """LO == HI is a valid range of one point (a knob pinned on the command line), int or float."""
    assert list(Axis.range("depth", 4, 4).values) == [4]
    assert list(Axis.range("init_scale", 1.5, 1.5).values) == [1.5]


# --------------------------------------------------------------------------------------- report.py


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


# ------------------------------------------------------------------------------------- findings.py


def _counterexample(remedies: tuple[object, ...]) -> object:
    from stabilitycheck.config import Config
    from stabilitycheck.counterexample import Counterexample
    from stabilitycheck.seeds import assess

    config = Config.of("mlp", depth=2, width=4, batch_size=1).with_run(seeds=1)
    return Counterexample("mlp", config, assess(config), Limits(), remedies)  # type: ignore[arg-type]


def test_a_remedy_judged_not_fixed_is_not_in_fixed_by() -> None:
    """'fixed by' names the remedies whose re-judged Config stopped exploding (fixed True) alone; a
    remedy measured and still exploding (fixed False) leaves it 'none'."""
    from stabilitycheck.config import Config
    from stabilitycheck.findings import finding
    from stabilitycheck.remedies import Remedy

    changed = Config.of("mlp", depth=1)
    cx = _counterexample((Remedy("critical init", changed, False, ("growth",)),))
    got = finding(cx, "t::test")  # type: ignore[arg-type]
    assert got is not None and got.fixed_by == "none"


# --------------------------------------------------------------------------------------- replay.py


def test_a_bundle_of_the_first_step_has_a_valid_step() -> None:
    """Step 0 (a model exploding on its first step) is a step a bundle is written for."""
    from stabilitycheck.replay import _check_meta

    meta = {"step": 0, "blocks": ["0"], "values": [1.0, None], "import_roots": ["/tmp"]}
    _check_meta(Path("b"), meta)  # no UsageError


# ----------------------------------------------------------------------------------- _validation.py


def _outer() -> None:
    _inner()


def _inner() -> None:
    raise ValueError("bad shape")


def test_raised_at_names_the_innermost_frame_of_the_users_code() -> None:
    """' at FILE:LINE in FUNC' is where the exception was raised (the innermost frame outside torch
    and stabilitycheck), not the outermost caller."""
    from stabilitycheck._validation import raised_at

    try:
        _outer()
    except ValueError as exc:
        where = raised_at(exc)
    assert where.endswith(" in _inner") and __file__ in where


def test_a_directory_is_not_a_writable_output_file(tmp_path: Path) -> None:
    """An existing directory given as the log or heatmap path cannot be written as a file."""
    from stabilitycheck._validation import writable

    assert writable(tmp_path / "log.jsonl")
    assert not writable(tmp_path)


# --------------------------------------------------------------------------------------- losses.py


def test_the_default_loss_of_two_outputs_is_cross_entropy_of_a_readout() -> None:
    """The last dimension has >= 2 entries: cross-entropy of a readout N(0, 1/2) to NUM_CLASSES
    classes (torch.randn on generator(seed + 1)) against labels drawn from the seed (torch.randint on
    generator(seed)), as F.cross_entropy computes it."""
    from stabilitycheck.losses import NUM_CLASSES, DefaultLoss

    out = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1]], dtype=torch.float64)
    readout = torch.randn(NUM_CLASSES, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (3,), generator=torch.Generator().manual_seed(7))
    expected = F.cross_entropy(out @ (readout / 2**0.5).T, labels)
    assert torch.allclose(DefaultLoss(7)(out), expected, rtol=1e-15)


def test_a_float64_output_keeps_float64_for_its_loss() -> None:
    from stabilitycheck.losses import accumulate

    x = torch.tensor([1.0 + 2.0**-40], dtype=torch.float64)
    assert accumulate(x).dtype == torch.float64 and accumulate(x).item() == 1.0 + 2.0**-40
    assert accumulate(x.half()).dtype == torch.float32


# ----------------------------------------------------------------------------------- strategies.py


def test_a_learning_rate_of_zero_is_an_invalid_argument() -> None:
    """lrs must be finite numbers > 0: lr=0 trains nothing, every divergence verdict vacuous."""
    from hypothesis.errors import InvalidArgument

    from stabilitycheck.strategies import configs

    with pytest.raises(InvalidArgument, match="finite number > 0"):
        configs(lrs=(0.0,)).validate()


# ------------------------------------------------------------------------------------ searching.py


class _VectorLoss(ScaledIdentity):
    """ScaledIdentity whose loss is the output itself, (1, 2): no scalar loss at any point."""

    def build(self, config: object) -> object:  # type: ignore[override]
        built = super().build(config)  # type: ignore[arg-type]
        return type(built)(built.model, built.inputs, lambda out, _: out, built.blocks)


def test_a_search_whose_loss_is_not_a_scalar_is_a_usage_error_not_skipped_points() -> None:
    """Bad input (a loss of shape (1, 2)) raises the one-line UsageError out of search(), as the CLI's
    exit 2; taken as a point's failure, every point was 'skipped' and the row said nothing tested."""
    from stabilitycheck.errors import UsageError

    subject = _VectorLoss()
    space = Space("cf", subject.config().with_run(seeds=1), (Axis.range("depth", 1, 3),))
    with pytest.raises(UsageError, match="scalar float tensor"):
        search(space, subject=subject, limits=Limits(growth=GROWTH_LIMIT), max_examples=5)  # type: ignore[arg-type]


class _RaisesAt(ScaledIdentity):
    """ScaledIdentity whose build raises ValueError at the depths in `bad` (the model's own failure)."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.bad = bad

    def build(self, config: object) -> object:  # type: ignore[override]
        depth = int(config.knob("depth"))  # type: ignore[attr-defined]
        if depth in self.bad:
            raise ValueError(f"no model at depth {depth}")
        return super().build(config)  # type: ignore[arg-type]


def test_a_model_raising_at_some_points_has_them_skipped_with_the_reason() -> None:
    """An exception from the subject's own code at depth 4 is that point's failure (skipped, reason
    'the model raised ValueError: ...', and the 1-minimality claim says it is unverified there), not
    an internal error of the package stopping the search."""
    subject = _RaisesAt({4})
    space = Space("cf", subject.config(init_scale=3.0).with_run(seeds=1), (Axis.range("depth", 1, 6),))
    limits = Limits(growth=GROWTH_LIMIT, grad_norm=None, divergence=None)
    result = search(space, subject=subject, limits=limits)  # type: ignore[arg-type]
    reasons = {int(c.knob("depth")): why for c, why in result.skipped}
    assert set(reasons) == {4} and reasons[4].startswith("the model raised ValueError: no model at depth 4")
    # 3.0 ** 5 = 243 > 100: depth 5 explodes, its one lower neighbour (4) could not be judged
    assert result.counterexample is not None and result.counterexample.config.knob("depth") == 5
    assert [int(c.knob("depth")) for c, _ in result.unjudged] == [4]


def test_check_names_the_first_configuration_tried_where_every_one_fails() -> None:
    """check(subject, config, *others): where the model fails at all of them, the UsageError names
    `config`, the one the user asked about, and its failure (not the last one tried)."""
    from stabilitycheck.errors import UsageError
    from stabilitycheck.searching import check

    subject = _RaisesAt({1, 2, 3})
    first, other = subject.config(depth=1), subject.config(depth=3)
    with pytest.raises(UsageError) as caught:
        check(subject, first, other)  # type: ignore[arg-type]
    message = str(caught.value)
    assert f"with {first.describe()} raised ValueError: no model at depth 1" in message
    assert "depth 3" not in message


def test_an_interrupted_search_does_not_call_a_top_corner_screened_on_one_seed_stable() -> None:
    """top_stable says the top corner was judged stable on the full rule over seeds (the space is not
    monotone); interrupted while only one seed had judged it (the search judges it first, on the full
    rule: interrupted at its second seed here), no such claim is made."""
    space = Space("cf", ScaledIdentity().config().with_run(seeds=3), (Axis.range("depth", 1, 2),))
    top = space.config(space.top())

    class InterruptedAtTop(ScaledIdentity):
        def build(self, config: Config) -> Built:
            if config.with_run(seed=top.run.seed) == top and config.run.seed != top.run.seed:
                raise KeyboardInterrupt
            return super().build(config)

    subject = InterruptedAtTop()
    result = search(space, subject=subject, limits=Limits(growth=GROWTH_LIMIT))  # type: ignore[arg-type]
    assert result.interrupted and result.counterexample is None and not result.top_stable
    assert subject.builds == {top: 1}  # the top corner's first seed alone was probed


def test_a_results_shown_judgement_is_its_counterexamples() -> None:
    """SearchResult.shown (what the row and its notes read): the counterexample's judgement where
    there is one, even beside a largest stable point's."""
    from stabilitycheck.counterexample import SearchResult
    from stabilitycheck.seeds import assess

    subject = ScaledIdentity()
    space = Space("cf", subject.config(init_scale=3.0).with_run(seeds=1), (Axis.range("depth", 4, 5),))
    limits = Limits(growth=GROWTH_LIMIT, grad_norm=None, divergence=None)
    stable, bad = (assess(space.config((i,)), subject, limits) for i in (0, 1))  # type: ignore[arg-type]
    assert bad.exploded and not stable.exploded  # 3 ** 5 = 243 > 100 > 3 ** 4 = 81
    cx = Counterexample("cf", space.config((1,)), bad, limits, ())
    result = SearchResult(space, cx, 2, 2, 0.0, space.config((0,)), stable)
    assert result.shown is bad


# ---------------------------------------------------------------------------------------- loops.py


class _EncoderThenHeads(nn.Module):
    """Three chained encoder blocks, then three heads each reading the encoder's output (the calls of
    the two stacks follow each other, never interleave)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.enc:
            x = block(x)
        return torch.stack([head(x) for head in self.heads]).sum(0)


def test_stacks_called_one_after_the_other_keep_find_blocks_choice() -> None:
    """looped_blocks drops a stack whose calls do not chain only where another's calls fall between
    them; an encoder's calls, then its heads' (no call between two of another stack's), keep both."""
    from stabilitycheck.loops import looped_blocks
    from stabilitycheck.subject import find_blocks

    model = _EncoderThenHeads()
    blocks, note = find_blocks(model)
    assert [name for name, _ in blocks] == [f"enc.{i}" for i in range(3)] + [f"heads.{i}" for i in range(3)]
    assert looped_blocks(model, torch.randn(2, 4), blocks, note) == (blocks, note)


# --------------------------------------------------------------------------------- report.py (rows)


def _judged(depth: int, scale: float, seeds: int = 1) -> tuple[object, object]:
    subject = ScaledIdentity()
    config = subject.config(depth=depth, init_scale=scale).with_run(seeds=seeds)
    from stabilitycheck.seeds import assess

    return config, assess(config, subject, Limits(growth=GROWTH_LIMIT, grad_norm=None, divergence=None))  # type: ignore[arg-type]


def test_an_interrupted_stable_row_of_a_one_seed_run_is_not_stable_on_one_seed_so_far() -> None:
    """'stable on one seed so far' says the full rule over seeds was not reached; where the run has
    one seed (seeds=1), its one seed is the full rule: the row says plainly 'stable'."""
    from stabilitycheck.counterexample import SearchResult
    from stabilitycheck.report import no_explosion

    config, judged = _judged(2, 1.5)
    space = Space("cf", config, (Axis.range("depth", 1, 2),))  # type: ignore[arg-type]
    result = SearchResult(space, None, 1, 1, 0.0, config, judged, interrupted=True)  # type: ignore[arg-type]
    assert no_explosion(result) == "interrupted, stable (tried up to depth=2)"


def test_a_row_whose_only_remedy_could_not_be_judged_says_not_judged() -> None:
    """'fixed by': a remedy whose model raised is 'not judged: NAME', never 'none of NAME' (which says
    it was measured and did not fix it)."""
    from stabilitycheck.counterexample import SearchResult
    from stabilitycheck.remedies import Remedy
    from stabilitycheck.report import row

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
    from stabilitycheck.report import unmeasured

    config, judged = _judged(3, 1e30)  # float32: the output overflows to inf, its gradient NaN
    m = judged.measurement  # type: ignore[attr-defined]
    assert math.isnan(m.growth) and m.first_nonfinite is not None
    space = Space("cf", config, (Axis.range("depth", 1, 3),))  # type: ignore[arg-type]
    cx = Counterexample("cf", config, judged, Limits(), ())  # type: ignore[arg-type]
    assert unmeasured([SearchResult(space, cx, 1, 1, 0.0, None)]) == []


# ----------------------------------------------------------------------------------- watchcapture.py


def test_a_no_grad_evaluation_pass_is_not_in_the_steps_block_output_norms() -> None:
    """A forward under torch.no_grad between training steps is no part of the step: each block's output
    norm is that of the training pass alone (torch.linalg.vector_norm of the outputs seen by a hook)."""
    from stabilitycheck.watching import watch

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen: list[float] = []
    model[1].register_forward_hook(
        lambda m, a, out: seen.append(float(torch.linalg.vector_norm(out.detach())))
    )
    x = torch.randn(8, 4)
    with watch(model, opt, report=None, flush_every=1) as w:
        loss = model(x).square().mean()
        loss.backward()
        with torch.no_grad():
            model(10 * x)  # an evaluation pass on other data
        opt.step()
    assert len(seen) == 2
    parts = w.layout.parts()["activation"]
    assert math.isclose(w.out.last_values[parts][1], seen[0], rel_tol=1e-5)


# ------------------------------------------------------------------------------------------ hf.py


def test_an_hf_sequence_as_long_as_the_models_positions_is_valid() -> None:
    """seq_len may equal the model's position count (positions 0 .. n-1 are n tokens); one past it is
    a UserCodeError naming the limit."""
    pytest.importorskip("transformers")
    from stabilitycheck.errors import UserCodeError
    from stabilitycheck.hf import HFModel

    model = HFModel("gpt2")
    values = model.values(model.config(n_positions=16, seq_len=16))
    assert model.hf_config(values).n_positions == 16
    with pytest.raises(UserCodeError, match="seq_len=17 exceeds the model's 16 positions"):
        model.hf_config({**values, "seq_len": 17})


# --------------------------------------------------------------------- report, pytest_plugin, strategies


def test_a_target_exploding_on_every_device_and_precision_is_not_one_sided() -> None:
    """one_sided names a target that explodes on some devices or precisions and not on others; one
    that explodes on all it ran on (here its one row) gets no line."""
    from stabilitycheck.counterexample import SearchResult
    from stabilitycheck.report import one_sided

    config, judged = _judged(5, 3.0)
    space = Space("cf", config, (Axis.range("depth", 1, 5),))  # type: ignore[arg-type]
    cx = Counterexample("cf", config, judged, Limits(), ())  # type: ignore[arg-type]
    exploding = SearchResult(space, cx, 1, 1, 0.0, None)
    stable = SearchResult(space.with_run(dtype="float64"), None, 1, 1, 0.0, config, judged)  # type: ignore[arg-type]
    assert one_sided([exploding]) == []
    assert one_sided([exploding, stable]) == ["! cf explodes only on cpu/float32 (stable on cpu/float64)"]


def test_one_config_failing_in_two_tests_is_recorded_for_each() -> None:
    """The session's findings are deduplicated per (test, Config): the same Config failing two tests
    is two rows of the summary, one per test id."""
    from stabilitycheck.config import Config
    from stabilitycheck.findings import finding
    from stabilitycheck.pytest_plugin import _State

    state = _State(seed=0)
    config = Config.of("mlp", depth=3)
    assert state.add(finding(config, "test_a.py::test_one"))
    assert state.add(finding(config, "test_a.py::test_two"))
    assert not state.add(finding(config, "test_a.py::test_one"))
    assert [f.test for f in state.findings] == ["test_a.py::test_one", "test_a.py::test_two"]


def test_a_profile_given_by_its_registered_name_loads_it() -> None:
    """load_profile takes the user-facing name or the registered one ('stabilitycheck-ci', as
    HYPOTHESIS_PROFILE may hold it): both load the ci profile and return 'ci'."""
    from hypothesis import settings

    from stabilitycheck.strategies import load_profile

    before = settings._current_profile  # restored: the profile is global to the session
    try:
        assert load_profile("stabilitycheck-ci") == "ci"
        assert settings._current_profile == "stabilitycheck-ci"
        assert settings().max_examples == 50
    finally:
        settings.load_profile(before)


def test_a_watch_report_marks_a_cut_list_of_steps_only_where_it_cut_it() -> None:
    """Up to 10 steps are listed whole; ' ...' follows only where more were cut (11 here)."""
    from stabilitycheck.watchlog import Report

    ten = Report(steps=20, skipped_steps=list(range(10))).text()
    assert "  skipped steps: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9\n" in ten
    eleven = Report(steps=20, skipped_steps=list(range(11))).text()
    assert "  skipped steps: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 ...\n" in eleven


def test_a_message_of_exactly_the_kept_length_is_not_cut() -> None:
    """one_line keeps MAX_MESSAGE (300) characters whole; one more is cut to 297 and '...'."""
    from stabilitycheck._validation import MAX_MESSAGE, one_line

    assert one_line("x" * MAX_MESSAGE) == "x" * MAX_MESSAGE
    assert one_line("x" * (MAX_MESSAGE + 1)) == "x" * (MAX_MESSAGE - 3) + "..."
