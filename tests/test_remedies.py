"""The remedies (remedies): which are offered where, how each is judged and round trips, and why one
does not apply. Oracles: the documented rules spelt out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stabilitycheck.config import Config
from stabilitycheck.verdicts import Limits


def test_a_warmup_is_offered_only_over_two_steps_or_more() -> None:
    """R2: a linear warmup over the probed steps runs step k (from 0) at lr x (k + 1) / steps, so over
    one step it is the plain lr: no remedy, not offered. Over two steps or more it is, over them all;
    never without steps, nor where a warmup is already set."""
    from stabilitycheck import remedies
    from stabilitycheck.config import Config

    c = Config.of("mlp")
    assert remedies.warmup(c.with_run(steps=0), None) is None  # type: ignore[arg-type]
    assert remedies.warmup(c.with_run(steps=1), None) is None  # type: ignore[arg-type]
    for steps in (2, 5):
        offered = remedies.warmup(c.with_run(steps=steps), None)  # type: ignore[arg-type]
        assert offered is not None and offered.run.warmup == steps
    assert remedies.warmup(c.with_run(steps=5, warmup=2), None) is None  # type: ignore[arg-type]


def test_the_critical_init_is_no_remedy_where_the_init_is_already_critical() -> None:
    """R4: the critical-init remedy sets the init knob to its critical value, and is none (not offered)
    where the knob already has it: mean-field theory puts a bias-free tanh MLP's chi_1 = 1 at sigma_w
    = 1 and a ReLU MLP's at sqrt(2) (chi_1 = sigma_w^2 / 2). Off it, the remedy moves the knob there."""
    from stabilitycheck.config import Config
    from stabilitycheck.remedies import critical_init
    from stabilitycheck.subjects import resolve

    mlp = resolve("mlp")
    assert critical_init(Config.of("mlp", init_scale=1.0), mlp) is None
    assert critical_init(Config.of("mlp", activation="relu", init_scale=math.sqrt(2)), mlp) is None
    fixed = critical_init(Config.of("mlp", init_scale=2.0), mlp)
    assert fixed is not None and fixed.knob("init_scale") == 1.0
    fixed = critical_init(Config.of("mlp", activation="relu", init_scale=1.0), mlp)
    assert fixed is not None and fixed.knob("init_scale") == math.sqrt(2)


def test_a_model_file_config_without_its_init_knob_reads_it_at_its_default(tmp_path: Path) -> None:
    """A Config naming some of a model file's knobs alone (as a user writes it for assert_stable) has
    the init knob at the file's default: the critical-init remedy said 'n/a (no init knob ...)' there,
    where the CLI, whose Configs name every knob, said the file's init_scale is at its critical value
    (a new user's trial). Oracle: the file's own defaults (init_scale 1.0, critical by INIT; 2.0 not)."""
    from stabilitycheck.config import Config
    from stabilitycheck.remedies import critical_init, why_not
    from stabilitycheck.subjects import resolve

    for default, fixed in ((1.0, False), (2.0, True)):
        path = tmp_path / f"init{int(default)}.py"
        path.write_text(
            "import torch\nfrom torch import nn\nINIT = ('init_scale', 1.0)\n"
            f"def build(depth=3, init_scale={default}):\n"
            "    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(depth)))\n"
            "def batch(model, batch_size=4):\n    return torch.randn(batch_size, 8)\n"
        )
        subject = resolve(str(path))
        sparse = Config.of(str(path), depth=5)
        remedy = critical_init(sparse, subject)
        if fixed:
            assert remedy is not None and remedy.knob("init_scale") == 1.0 and remedy.knob("depth") == 5
        else:
            assert remedy is None
            reason = why_not("critical-init", sparse, subject)
            assert reason == "init_scale is at 1.0, its critical value (INIT)"


def test_a_model_files_own_init_is_not_called_a_known_critical_value(tmp_path: Path) -> None:
    """A file that declares no critical value (no INIT, or INIT naming the knob alone) has its own
    init taken as critical: its 'n/a' says so and how to name one, where it read 'init_scale is at
    its critical value, 1.0' of a factory hard-coding sigma_w = 2 (an audit); a declared value is
    called critical. Oracle: what each file declares."""
    from stabilitycheck.config import Config
    from stabilitycheck.remedies import why_not
    from stabilitycheck.subjects import resolve

    body = (
        "import torch\nfrom torch import nn\n{init}"
        "def build(depth=3, gain=1.0):\n"
        "    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(depth)))\n"
        "def batch(model, batch_size=4):\n    return torch.randn(batch_size, 8)\n"
    )
    said = {
        "": "init_scale is at 1.0, the model's own init, which critical-init takes as critical; "
        "INIT = ('init_scale', value) in the file names the critical value",
        "INIT = 'gain'\n": "gain is at 1.0, the model's own init, which critical-init takes as critical; "
        "INIT = ('gain', value) in the file names the critical value",
        "INIT = ('gain', 1.0)\n": "gain is at 1.0, its critical value (INIT)",
    }
    for i, (init, expected) in enumerate(said.items()):
        path = tmp_path / f"own{i}.py"
        path.write_text(body.format(init=init))
        subject = resolve(str(path))
        assert why_not("critical-init", Config.of(str(path)), subject) == expected


def test_clipping_is_offered_only_where_there_are_steps_to_clip() -> None:
    """remedies.clip: norm clipping at CLIP_NORM during the optimiser steps, only meaningful where
    there are steps (at steps=0 nothing is clipped: the re-judged Config would be the same point
    and its 'not fixed' a non-result); never where a clip is set already. Oracle: that docstring."""
    from stabilitycheck import remedies

    c = Config.of("mlp")
    assert remedies.clip(c.with_run(steps=0), None) is None  # type: ignore[arg-type]
    for steps in (1, 3):
        offered = remedies.clip(c.with_run(steps=steps), None)  # type: ignore[arg-type]
        assert offered is not None and offered.run.clip == remedies.CLIP_NORM == 1.0
        assert offered.with_run(clip=None) == c.with_run(steps=steps)  # nothing else changed
    assert remedies.clip(c.with_run(steps=3, clip=5.0), None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dtype", "amp"), [("float32", "bfloat16"), ("float32", "float16"), ("bfloat16", "none")]
)
def test_float32_is_offered_for_reduced_dtypes_and_for_autocast(dtype: str, amp: str) -> None:
    """remedies.float32: float32 in place of float16/bfloat16 OR autocast (a float32 model under
    autocast computes in the reduced type just the same). Oracle: that docstring; a float32 run
    without autocast has nothing to remedy."""
    from stabilitycheck import remedies

    c = Config.of("mlp").with_run(dtype=dtype, amp=amp)
    offered = remedies.float32(c, None)  # type: ignore[arg-type]
    assert offered is not None and (offered.run.dtype, offered.run.amp) == ("float32", "none")
    assert remedies.float32(Config.of("mlp").with_run(dtype="float32", amp="none"), None) is None  # type: ignore[arg-type]


def test_a_remedy_that_could_not_be_judged_round_trips_with_its_reason() -> None:
    """Remedy: `skipped` says why the remedied model could not be judged (fixed then None); a report
    read back from JSON says the same ('not judged (...)'), not 'not fixed ()'. Oracle: round-trip
    identity of the Remedy and of its describe() text."""
    from stabilitycheck.remedies import Remedy

    config = Config.of("mlp", depth=2)
    for r in (
        Remedy("critical-init", config, None, skipped="the model raised ValueError: bad init"),
        Remedy("clip", config, False, ("growth",), "36 (18-126)"),
        Remedy("float32", None, None),
    ):
        back = Remedy.from_dict(json.loads(json.dumps(r.to_dict())))
        assert back == r and back.describe() == r.describe()
    assert Remedy("w", config, None, skipped="x").describe() == "w: not judged (x)"


def test_a_remedy_measured_and_still_failing_reads_not_fixed_with_what_still_fires() -> None:
    """Remedy.describe: 'fixed' only where the re-judged Config stopped exploding (fixed True); one
    measured and still failing reads 'not fixed (criteria)' (README: 'says `not fixed (vanishing)`'),
    one that does not apply 'n/a'. Oracle: the README's texts."""
    from stabilitycheck.remedies import Remedy

    config = Config.of("mlp", depth=2)
    assert (
        Remedy("critical-init", config, False, ("vanishing",)).describe()
        == "critical-init: not fixed (vanishing)"
    )
    assert Remedy("clip", config, True).describe() == "clip: fixed"
    assert Remedy("float32", None, None).describe() == "float32: n/a"
    # with the growth it was judged on, quantile (min-max) over seeds: a fix near the limit shows
    assert Remedy("float32", config, True, (), "98.4 (53.1-166)").describe() == (
        "float32: fixed at growth 98.4 (53.1-166)"
    )
    said = Remedy("lstm", config, False, ("vanishing",), "0.0017 (0.0013-0.002)", over="q=0.5 over 3 seeds")
    assert (
        said.describe() == "lstm: not fixed (vanishing) at growth 0.0017 (0.0013-0.002) (q=0.5 over 3 seeds)"
    )
    assert Remedy.from_dict(said.to_dict()) == said


def test_remedies_are_judged_on_vanishing_at_the_growth_limit_unless_one_is_set() -> None:
    """remedies.judged_on: the search's limits, with vanishing judged at the growth limit (growth
    below 1/100 by default) where no vanishing limit is set; a set one is kept. Oracle: that
    docstring (and README: 'remedies are judged on vanishing below 1/100 too')."""
    from stabilitycheck.remedies import judged_on

    assert judged_on(Limits()) == Limits(vanishing=100.0)
    custom = Limits(growth=7.0, grad_norm=50.0, divergence=None)
    assert judged_on(custom) == Limits(growth=7.0, grad_norm=50.0, divergence=None, vanishing=7.0)
    assert judged_on(Limits(vanishing=3.0)) == Limits(vanishing=3.0)


def test_a_remedy_that_does_not_apply_says_why() -> None:
    """'critical-init: n/a' alone could not tell an init at its critical value from a knob not found;
    each run remedy's reason follows the Config it was not made for."""
    from stabilitycheck.config import Config
    from stabilitycheck.remedies import Remedy, candidates, why_not
    from stabilitycheck.zoo import Family

    mlp = Family("mlp")
    at_critical = Config.of("mlp", init_scale=1.0, activation="tanh")
    assert candidates(at_critical, mlp)["critical-init"] is None
    said = "init_scale is at 1.0, its activation's mean-field critical value"
    assert why_not("critical-init", at_critical, mlp) == said
    assert why_not("clip", at_critical, mlp) == "no optimiser steps: --steps N"
    assert why_not("warmup", at_critical.with_run(steps=1), mlp) == "fewer than 2 optimiser steps: --steps N"
    assert why_not("float32", at_critical.with_run(dtype="float64"), mlp) == "float64 already, no autocast"
    shown = Remedy("critical-init", None, None, why="x").describe()
    assert (
        shown == "critical-init: n/a (x)"
        and Remedy.from_dict(Remedy("w", None, None, why="y").to_dict()).why == "y"
    )


def test_a_remedy_reads_the_counterexamples_own_criterion_beside_the_growth() -> None:
    """A stall 'fixed by warmup' was shown 'at growth 0.705 (0.554-1.16)', the growth at init, which
    says nothing of the stall (found by a new user's trial). The counterexample's criterion, where it
    is not the growth, is read under each remedy too. Oracle: assess of each remedied Config on the
    remedies' limits, that criterion's quantile (min-max) over its seeds."""
    from stabilitycheck.remedies import Remedy, judged_on
    from stabilitycheck.searching import try_remedies
    from stabilitycheck.seeds import assess
    from stabilitycheck.spread import Spread
    from stabilitycheck.subjects import resolve

    c = Config.of("mlp", depth=3, width=8, batch_size=4, steps=4, lr=0.5, optimizer="sgd", seeds=3)
    subject, limits = resolve("mlp"), Limits(divergence=1.5)
    measured = [r for r in try_remedies(c, subject, limits, fired=("divergence",)) if r.config is not None]
    assert measured and all(r.measured.startswith("divergence ") for r in measured)
    for r in measured:
        assert r.config is not None
        j = assess(r.config, subject, judged_on(limits))
        assert r.measured == f"divergence {Spread.of([v['divergence'] for v in j.values], 0.5).describe()}"
        n = len(j.seeds)
        over = f"(q=0.5 over {n} seed{'s' * (n != 1)})"
        assert r.describe().endswith(f" at {r.measured}, growth {j.growth.describe()} {over}")
        assert Remedy.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    growth_only = [r for r in try_remedies(c, subject, limits, fired=("growth",)) if r.config is not None]
    assert all(not r.measured and " at growth " in r.describe() for r in growth_only)
