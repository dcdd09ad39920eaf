"""Benchmarks of stabilitycheck: probe overhead, search vs exhaustive grid, the verdict over seeds vs
one seed, scaling, parallel tests.

Run `python ci/bench.py [--json FILE] [--quick] [--threads N] [--only SECTIONS]`. Every figure is
measured here, in this process (the parallel figure in subprocesses), as the median of several
interleaved repeats; nothing is hard-coded. `--quick` runs every section on tiny sizes (a smoke test,
not a measurement).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from stabilitycheck import zoo
from stabilitycheck.config import Config
from stabilitycheck.losses import call_model
from stabilitycheck.probing import probe_module
from stabilitycheck.searching import SearchResult, boundary, search, sweep
from stabilitycheck.space import INIT_SCALES, Axis, Space
from stabilitycheck.subject import Built, Subject
from stabilitycheck.subjects import resolve
from stabilitycheck.verdicts import Limits
from stabilitycheck.watching import FLUSH_EVERY as WATCH_STEPS  # a call holds one flush interval
from stabilitycheck.watching import Watcher

ROOT = Path(__file__).resolve().parent.parent
TARGETS_DENSE, TARGETS_RNN = 1.05, 1.15  # probe (steps=0 and 1) / bare, dense models and the RNN
SEARCH_TARGET = 0.10  # search cost as a fraction of the exhaustive sweep, on the 4-knob space
SEEDS_PROBES_TARGET = 3.0  # issue 14: probes of the verdict over seeds / probes of one seed, per target
SEEDS_COST_TARGET = 2.0  # issue 18: the same ratio of probes and of CPU time, per target
Row = dict[str, Any]
MALLOC = ["default"]  # what main() did to the allocator, for the machine table


@dataclass(frozen=True)
class Sizes:
    """Every size the bench uses; `quick` shrinks them all to a smoke run."""

    rounds: int  # interleaved repeats of the overhead and scaling measurements
    models: dict[str, Config]  # the overhead table's rows
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    seq_lens: tuple[int, ...]
    scaling_mlp: Config
    scaling_rnn: Config
    scaling_transformer: Config
    space2: Space
    space4: Space
    limits: Limits
    max_examples: int
    seeds_targets: dict[str, Space]  # the zoo's searches (run.seeds = the default budget)
    seeds_bases: tuple[int, ...]  # the verdicts' base seeds (run.seed) each target is searched at
    seeds_rounds: int  # interleaved repeats of each search of the seeds section
    seeds_max_examples: int  # Hypothesis examples of each of its searches
    pytest_target: tuple[str, ...]  # pytest's arguments: () runs the whole suite, as the README does
    pytest_timeout: float


def sizes(quick: bool) -> Sizes:
    """The full bench, or tiny sizes for `--quick`."""
    if quick:
        tiny = Config.of("mlp", depth=2, width=8, batch_size=4)
        return Sizes(
            rounds=3,
            models={
                "mlp (quick)": tiny,
                "transformer (quick)": Config.of(
                    "transformer", depth=1, width=8, seq_len=4, norm="pre", batch_size=2
                ),
                "rnn (quick)": Config.of("rnn", width=8, seq_len=8, batch_size=2),
            },
            depths=(2, 4),
            widths=(8, 16),
            seq_lens=(4, 8),
            scaling_mlp=tiny,
            scaling_rnn=Config.of("rnn", width=8, batch_size=2),
            scaling_transformer=Config.of("transformer", depth=1, width=8, norm="pre", batch_size=2),
            space2=Space("mlp 2-knob", tiny, (Axis.range("depth", 1, 4), Axis("init_scale", (1.0, 4.0)))),
            space4=Space(
                "mlp 4-knob",
                tiny,
                (
                    Axis.range("depth", 1, 4),
                    Axis("width", (4, 8)),
                    Axis("init_scale", (1.0, 4.0)),
                    Axis.range("steps", 0, 1),
                ),
            ),
            limits=Limits(growth=2.0),  # tiny models cannot pass the default growth limit
            max_examples=30,  # 20 missed the 4-knob grid's exploding points (its top corner is stable)
            seeds_targets={label: shrink(space) for label, space in zoo.targets().items()},
            seeds_bases=(0, 1),
            seeds_rounds=3,
            seeds_max_examples=5,
            pytest_target=("tests/test_config.py",),
            pytest_timeout=120.0,
        )
    base = Config.of("mlp", width=32, batch_size=8, activation="tanh")
    mlp = Config.of("mlp", depth=16, width=256, activation="tanh", lr=1e-4)
    return Sizes(
        rounds=21,
        models={
            "MLP 16x256, batch 64": mlp.with_knobs(batch_size=64),
            "MLP 16x256, batch 256": mlp.with_knobs(batch_size=256),
            "torch MLP 16x256 (nn.Linear, bias), batch 64": Config.of(
                str(ROOT / "ci" / "torch_mlp.py"), batch_size=64, lr=1e-4
            ),
            "pre-norm transformer 4x128, T 64": Config.of(
                "transformer",
                depth=4,
                width=128,
                seq_len=64,
                norm="pre",
                activation="gelu",
                batch_size=2,
                lr=1e-4,
            ),
            "RNN width 64, T 256": Config.of("rnn", width=64, seq_len=256, batch_size=16, lr=1e-4),
        },
        depths=(8, 16, 32, 64),
        widths=(64, 128, 256, 512, 1024),
        seq_lens=(16, 64, 256, 1024),
        scaling_mlp=Config.of("mlp", depth=8, width=256, batch_size=32),
        scaling_rnn=Config.of("rnn", width=64, batch_size=8),
        scaling_transformer=Config.of(
            "transformer", depth=2, width=64, norm="pre", activation="gelu", batch_size=2
        ),
        space2=Space("mlp 2-knob", base, (Axis.range("depth", 1, 64), Axis("init_scale", INIT_SCALES))),
        space4=Space(
            "mlp 4-knob",
            base,
            (
                Axis.range("depth", 1, 24),
                Axis("width", (8, 16, 32)),
                Axis("init_scale", INIT_SCALES),
                Axis.range("steps", 0, 2),
            ),
        ),
        limits=Limits(),
        max_examples=60,
        seeds_targets=zoo.targets(),
        seeds_bases=tuple(range(8)),  # one base's search is one draw of the path: 1.5x-6x on the RNN
        seeds_rounds=2,
        seeds_max_examples=100,  # what `stabilitycheck zoo` runs by default
        pytest_target=(),
        pytest_timeout=1800.0,
    )


def shrink(space: Space) -> Space:
    """A zoo target cut down for `--quick`: width 8, batch 4, sequences of 4, its first axis 1..4 and
    init_scale at 1, 2, 4; the same seeds budget and limits."""
    base = space.base.with_knobs(width=8, batch_size=4)
    if "seq_len" in base.values and space.axes[0].name != "seq_len":
        base = base.with_knobs(seq_len=4)
    first = Axis.range(space.axes[0].name, 1, 4)
    return Space(space.label, base, (first, Axis("init_scale", (1.0, 2.0, 4.0))))


def build(config: Config) -> Built:
    """The model, inputs, loss and blocks of `config`, built by the subject its name resolves to."""
    return resolve(config.subject).build(config)


# ---------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of one call: time.perf_counter and time.process_time of this process."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2) -> dict[str, list[Any]]:
    """Per name, (wall, CPU) of each round; every round runs each fn once, in a rotated order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    out: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(timed(fns[name]))
    return out


def med(samples: Sequence[tuple[float, float]], which: int) -> float:
    """Median of the wall (0) or CPU (1) times, in milliseconds."""
    return 1e3 * statistics.median(s[which] for s in samples)


def paired_ratio(num: Sequence[tuple[float, float]], den: Sequence[tuple[float, float]], which: int) -> float:
    """Median over rounds of num/den within the same round (drift in machine load cancels)."""
    return statistics.median(n[which] / d[which] for n, d in zip(num, den, strict=True))


# -------------------------------------------------------------------------------------------- overhead

Variant = Callable[[], Any]


def bare_steps(model: nn.Module, inputs: Any, loss_fn: Any, params: list[nn.Parameter], lr: float) -> Variant:
    """2 x (forward + backward) + 1 SGD step: the work probe_module(steps=1) does, without probing."""
    opt = torch.optim.SGD(params, lr=lr)

    def bare1() -> None:
        for i in range(2):
            opt.zero_grad(set_to_none=True)
            loss_fn(call_model(model, inputs), inputs).backward()
            if i == 0:
                opt.step()

    return bare1


def lightning_norms(params: list[nn.Parameter], step: Variant) -> Variant:
    """A Lightning-style per-parameter gradient-norm log: one .norm() and one .item() per parameter."""

    def run() -> dict[int, float]:
        step()
        return {i: p.grad.norm(2).item() for i, p in enumerate(params) if p.grad is not None}

    return run


def hooks_item(blocks: Sequence[tuple[str, nn.Module]], step: Variant) -> Variant:
    """What a user writes by hand: forward hooks whose tensor hooks log ||dL/d(output)|| with one
    .item() per block call, and the output norm with another."""
    logged: list[float] = []

    def on_forward(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            logged.append(output.detach().norm().item())
            output.register_hook(lambda g: logged.append(g.norm().item()))

    def run() -> list[float]:
        logged.clear()
        handles = [m.register_forward_hook(on_forward) for _, m in blocks]
        try:
            step()
        finally:
            for h in handles:
                h.remove()
        return logged

    return run


def floor(built: Built, params: list[nn.Parameter], input_side: bool) -> Variant:
    """An ideal probe with no bookkeeping: forward hooks appending outputs, one autograd.grad over the
    outputs (and, with `input_side`, the model's float input, as the probe takes block 0's input) and
    parameters, one fused norm call, one copy to the host. What probe(steps=0) could cost."""

    def run() -> list[float]:
        outputs: list[torch.Tensor] = []
        inputs = built.inputs
        if input_side and isinstance(inputs, torch.Tensor):
            inputs = inputs.detach().requires_grad_()
            outputs.append(inputs)
        handles = [m.register_forward_hook(lambda m, a, o: outputs.append(o)) for _, m in built.blocks]
        loss = built.loss_fn(call_model(built.model, inputs), inputs)
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(loss, [*outputs, *params])
        for p, g in zip(params, grads[len(outputs) :], strict=True):
            p.grad = g
        with torch.no_grad():
            norms = torch._foreach_norm([*grads, *outputs], 2, dtype=torch.float32)
            values: list[float] = torch.stack([loss.detach().float(), *norms]).tolist()
            return values

    return run


def norms_alone(built: Built, params: list[nn.Parameter], input_side: bool) -> Variant:
    """The floor's fused norm call and host copy alone, on the tensors one floor step leaves (block
    outputs, their gradients, the weight gradients): what any exact probe pays to read every byte
    once, its lower bound over bare."""
    step = floor(built, params, input_side)
    tensors: list[torch.Tensor] = []

    def on_forward(module: nn.Module, args: Any, output: Any) -> None:
        tensors.append(output.detach() if isinstance(output, torch.Tensor) else output[0].detach())

    handles = [m.register_forward_hook(on_forward) for _, m in built.blocks]
    step()
    for h in handles:
        h.remove()
    tensors += [p.grad for p in params if p.grad is not None]
    tensors += [torch.randn_like(t) for t in tensors[: len(tensors) - len(params)]]  # output-grad sized

    def run() -> list[float]:
        with torch.no_grad():
            norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
            values: list[float] = torch.stack(norms).tolist()
            return values

    return run


def input_grad(built: Built, params: list[nn.Parameter]) -> Variant | None:
    """bare with the model's float input made to require grad: the gradient of block 0's input, which
    the probe reads (block 0's gain) and a bare backward never computes (one matmul more on an MLP,
    a 1 / (3 x depth) share of its FLOPs). None where the input is no float tensor (token ids)."""
    x = built.inputs
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return None

    def run() -> None:
        for p in params:
            p.grad = None
        leaf = x.detach().requires_grad_()
        built.loss_fn(call_model(built.model, leaf), leaf).backward()

    return run


def variants(config: Config) -> dict[str, Variant]:
    """Every variant of the table on one built model, each a callable that runs it once."""
    built = build(config)
    model, inputs, loss_fn = built.model, built.inputs, built.loss_fn
    params = [p for p in model.parameters() if p.requires_grad]

    def bare() -> None:
        for p in params:
            p.grad = None
        loss_fn(call_model(model, inputs), inputs).backward()

    def anomaly() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.detect_anomaly(check_nan=True):
                bare()

    fns: dict[str, Variant] = {
        "bare": bare,
        "bare x2 + step": bare_steps(model, inputs, loss_fn, params, config.run.lr),
        "probe steps=0": functools.partial(probe_module, model, inputs, loss_fn, blocks=built.blocks),
        "probe steps=1": functools.partial(
            probe_module, model, inputs, loss_fn, blocks=built.blocks, steps=1, lr=config.run.lr
        ),
        "floor": floor(built, params, input_side=not config.recurrent),
        "norms alone": norms_alone(built, params, input_side=not config.recurrent),
        "detect_anomaly": anomaly,
        "lightning norms": lightning_norms(params, bare),
        "hooks + .item()": hooks_item(built.blocks, bare),
    }
    given = input_grad(built, params) if not config.recurrent else None
    if given is not None:
        fns["input grad"] = given
    return fns


RATIOS = {  # column: (variant, the baseline it is divided by)
    "probe steps=0": ("probe steps=0", "bare"),
    "probe steps=1": ("probe steps=1", "bare x2 + step"),
    "floor": ("floor", "bare"),
    "norms alone": ("norms alone", "bare"),
    "input grad": ("input grad", "bare"),
    "detect_anomaly": ("detect_anomaly", "bare"),
    "lightning norms": ("lightning norms", "bare"),
    "hooks + .item()": ("hooks + .item()", "bare"),
}


def spread(ratios: Sequence[float]) -> str:
    """'median [q1, q3]' of per-round ratios."""
    q1, m, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return f"{m:.3f}x [{q1:.2f}, {q3:.2f}]"


def overhead(s: Sizes) -> list[Row]:
    """One row per model: bare CPU ms and every variant's ratio, all interleaved in one process."""
    rows = []
    for label, config in s.models.items():
        fns = variants(config)
        t = interleaved(fns, s.rounds)
        row: Row = {
            "model": label,
            "bare ms": med(t["bare"], 1),
            "bare x2 + step ms": med(t["bare x2 + step"], 1),
        }
        targets = TARGETS_RNN if config.recurrent else TARGETS_DENSE
        met = []
        for column, (num, den) in RATIOS.items():
            if num not in t:
                row[column] = "-"
                continue
            ratios = [a[1] / b[1] for a, b in zip(t[num], t[den], strict=True)]  # CPU
            row[column] = spread(ratios)
            row[f"{column} ratio"] = statistics.median(ratios)
            row[f"{column} rounds"] = ratios
            if column.startswith("probe"):
                met.append(statistics.median(ratios) <= targets)
        row["target"] = f"<= {targets:.2f}x"
        row["target ratio"] = targets
        row["met"] = "yes" if all(met) else "NO"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- watch

WATCH_TARGET_SLOW, WATCH_TARGET_TINY, SLOW_MS = 1.05, 1.15, 5.0  # issue 17: watch / bare training step


def train_loop(config: Config, watched: str) -> tuple[Variant, Any]:
    """`steps` training steps (zero_grad, forward, backward, SGD step) on a fresh copy of the model:
    bare, under watch() with its defaults, or under `floor_capture`. Returns the loop and its watcher."""
    built = build(config)
    opt = torch.optim.SGD(built.model.parameters(), lr=config.run.lr)
    w = None
    if watched == "watch":
        w = Watcher(built.model, opt, blocks=built.blocks, report=None).__enter__()
    done = floor_capture(built, opt) if watched == "floor" else None

    def loop() -> None:
        for _ in range(WATCH_STEPS):
            opt.zero_grad(set_to_none=True)
            loss = built.loss_fn(call_model(built.model, built.inputs), built.inputs)
            if w is not None:
                w.loss(loss)
            loss.backward()
            opt.step()
        if done is not None:
            done()

    return loop, w


def floor_capture(built: Built, opt: torch.optim.Optimizer) -> Callable[[], list[Any]]:
    """An ideal watcher with no bookkeeping: forward hooks keep each block output, a pre-hook on its
    autograd node keeps its gradient, and before each optimizer step one fused norm call over them and
    the weight gradients and one stack; one host read per loop. Returns the read."""
    kept: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    params = [p for p in built.model.parameters() if p.requires_grad]

    def on_forward(module: nn.Module, args: Any, out: Any) -> None:
        kept.append(out.detach())
        if out.grad_fn is not None:
            out.grad_fn.register_prehook(lambda grads: kept.append(grads[0]))

    def close(*_: Any) -> None:
        tensors = kept + [p.grad for p in params if p.grad is not None]
        steps.append(torch.stack(torch._foreach_norm(tensors, 2)))
        kept.clear()

    for _, module in built.blocks:
        module.register_forward_hook(on_forward)
    opt.register_step_pre_hook(close)

    def read() -> list[Any]:
        values: list[Any] = torch.stack(steps).tolist()
        steps.clear()
        return values

    return read


def watch_overhead(s: Sizes) -> list[Row]:
    """Per model (the overhead table's and the tiny ones): a training loop under watch() vs bare."""
    rows = []
    rounds = max(3, s.rounds // 2)
    for label, config in {**s.models, **sizes(True).models}.items():
        loops, watchers = {}, {}
        for name in ("bare", "watch", "floor", "bare copy"):
            loops[name], watchers[name] = train_loop(config, name)
        t = interleaved(loops, rounds)
        report = watchers["watch"].close()
        bare_ms = med(t["bare"], 1) / WATCH_STEPS
        target = WATCH_TARGET_SLOW if bare_ms >= SLOW_MS else WATCH_TARGET_TINY
        row: Row = {"model": label, "bare ms/step": bare_ms}
        row["watch ms/step"] = med(t["watch"], 1) / WATCH_STEPS
        for column, name in (("watch", "watch"), ("floor", "floor"), ("2nd copy", "bare copy")):
            ratios = [a[1] / b[1] for a, b in zip(t[name], t["bare"], strict=True)]  # CPU
            row[column] = spread(ratios)
            row[f"{column} ratio"] = statistics.median(ratios)
            row[f"{column} rounds"] = ratios
        row["target"] = f"<= {target:.2f}x"
        row["target ratio"] = target
        row["met"] = "yes" if row["watch ratio"] <= target else "NO"
        row["steps"], row["host reads"] = report.steps, report.host_reads
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- search


class Counting:
    """A Subject that counts the models it builds: every probe of one seed builds one (the search's
    judging, its remedy re-judging, a recurrent subject's last-step probes, a float32 re-probe)."""

    def __init__(self, subject: Subject) -> None:
        self.subject = subject
        self.builds = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.subject, name)

    def build(self, config: Config) -> Built:
        self.builds += 1
        return self.subject.build(config)

    def last_step(self, config: Config) -> Built | None:
        built = self.subject.last_step(config)
        self.builds += built is not None
        return built


def counting(space: Space) -> Counting:
    return Counting(resolve(space.base.subject))


def index_of(space: Space, config: Config) -> tuple[int, ...]:
    """The grid index of a Config of `space`."""
    return tuple(a.values.index(_value(config, a.name)) for a in space.axes)


def _value(config: Config, name: str) -> Any:
    """A knob's value, or a run setting's (a Space may search steps, lr, warmup or clip)."""
    return config.values[name] if name in config.values else getattr(config.run, name)


def search_vs_sweep(space: Space, limits: Limits, max_examples: int) -> Row:
    """Points, probes and time of search() (remedy re-probes included) vs sweep() of every grid point,
    both judging each point over the same seeds budget (the space's run.seeds)."""
    s_subject, w_subject = counting(space), counting(space)
    (w_search, c_search), result = _timed_value(
        lambda: search(
            space, subject=s_subject, limits=limits, max_examples=max_examples, seed=0, database=None
        )
    )
    (w_sweep, c_sweep), grid = _timed_value(lambda: sweep(space, subject=w_subject, limits=limits))
    cx = result.counterexample
    minimal = boundary(grid)
    found = index_of(space, cx.config) if cx else None
    same = "n/a (grid has no explosion)" if not minimal else ("yes" if found in minimal else "NO")
    knobs = " ".join(f"{a.name}={_value(cx.config, a.name)}" for a in space.axes) if cx else "none found"
    return {
        "space": space.label,
        "seeds": space.base.run.seeds,
        "grid": space.size,
        "search points": result.points,
        "point frac": result.points / len(grid),
        "search probes": s_subject.builds,
        "search judged probes": result.probes,
        "sweep probes": w_subject.builds,
        "probe frac": s_subject.builds / w_subject.builds,
        "search s": c_search,
        "sweep s": c_sweep,
        "time frac": c_search / c_sweep,
        "wall frac": w_search / w_sweep,
        "found": knobs,
        "boundary pts": len(minimal),
        "same minimum": same,
    }


def _timed_value(fn: Callable[[], Any]) -> tuple[tuple[float, float], Any]:
    box: list[Any] = []
    times = timed(lambda: box.append(fn()))
    return times, box[0]


def searching(s: Sizes) -> list[Row]:
    """search vs sweep on the 2-knob and the 4-knob space, with the target on the 4-knob one."""
    rows = [search_vs_sweep(space, s.limits, s.max_examples) for space in (s.space2, s.space4)]
    for row, judged in zip(rows, (False, True), strict=True):
        ok = row["probe frac"] <= SEARCH_TARGET and row["time frac"] <= SEARCH_TARGET
        row["target"] = f"<= {SEARCH_TARGET:.0%}" if judged else "(none)"
        row["met"] = ("yes" if ok else "NO") if judged else "-"
    return rows


# ----------------------------------------------------------------------------------------------- seeds


@dataclass
class Searched:
    """What one search of the seeds section measured, round by round."""

    probes: list[int]  # SearchResult.probes: every seed's probe of every judged point
    points: list[int]  # SearchResult.points: the configurations judged
    builds: list[int]  # every probe, remedies and last-step probes included
    found: list[str]  # the counterexample's knobs, or 'none found'


NONE_FOUND = "none found"


def run_search(space: Space, limits: Limits, max_examples: int, into: Searched) -> Variant:
    """One search of `space` (Hypothesis seed 0, no database) recording what it spent into `into`."""

    def go() -> SearchResult:
        subject = counting(space)
        result = search(
            space, subject=subject, limits=limits, max_examples=max_examples, seed=0, database=None
        )
        cx = result.counterexample
        into.probes.append(result.probes)
        into.points.append(result.points)
        into.builds.append(subject.builds)
        into.found.append(cx.config.describe() if cx else NONE_FOUND)
        return result

    return go


def _one(values: Sequence[Any]) -> Any:
    """The value every round agrees on (a search is deterministic here), or 'varies'."""
    return values[0] if len(set(values)) == 1 else "varies"


def seeds_vs_one(s: Sizes) -> list[Row]:
    """Each zoo target searched at each base seed with the space's seeds budget and with seeds=1, all
    the searches interleaved round by round; per target the probes, points and CPU time of both summed
    over the bases, their ratios and the per-base ratios' spread, then the totals."""
    fns: dict[str, Variant] = {}
    got: dict[tuple[str, int, int], Searched] = {}
    budgets: dict[str, int] = {}
    for label, space in s.seeds_targets.items():
        budgets[label] = space.base.run.seeds
        for base in s.seeds_bases:
            at = space.with_run(seed=base)
            for k, sp in ((budgets[label], at), (1, at.with_run(seeds=1))):
                got[label, base, k] = Searched([], [], [], [])
                fns[f"{label} base {base} seeds={k}"] = run_search(
                    sp, s.limits, s.seeds_max_examples, got[label, base, k]
                )
    for (_, base, _), fn in zip(got, fns.values(), strict=True):
        if base == s.seeds_bases[0]:
            fn()  # the warm-up: each target's two searches at the first base (counts dropped below)
    t = interleaved(fns, s.seeds_rounds, warmup=0)
    for searched in got.values():
        for values in vars(searched).values():
            del values[: -s.seeds_rounds]
    rows: list[Row] = []
    for label, k in budgets.items():
        per_base = [
            (
                got[label, b, k],
                got[label, b, 1],
                t[f"{label} base {b} seeds={k}"],
                t[f"{label} base {b} seeds=1"],
            )
            for b in s.seeds_bases
        ]
        rows.append(seeds_row(label, k, per_base, s.seeds_rounds))
    rows.append(seeds_total(rows))
    return rows


Times = list[tuple[float, float]]  # (wall, CPU) seconds of each round


def seeds_row(
    label: str, k: int, per_base: Sequence[tuple[Searched, Searched, Times, Times]], rounds: int
) -> Row:
    """One target's row: counts and CPU seconds summed over the bases round by round, and per base the
    ratios of seeds to one seed (counts: a search is deterministic, every round agrees; CPU: the
    median of per-round ratios)."""
    row: Row = {"space": label, "seeds": k, "bases": len(per_base)}
    for key, field in (("points", "points"), ("probes", "probes"), ("all probes", "builds")):
        for side, at in ((f"{key} rounds", 0), (f"{key} 1 seed rounds", 1)):
            row[side] = [sum(getattr(b[at], field)[r] for b in per_base) for r in range(rounds)]
    row["CPU rounds"] = [sum(b[2][r][1] for b in per_base) for r in range(rounds)]
    row["CPU 1 seed rounds"] = [sum(b[3][r][1] for b in per_base) for r in range(rounds)]
    row["probes per base"] = [_one(m.probes) for m, _, _, _ in per_base]
    row["probes 1 seed per base"] = [_one(o.probes) for _, o, _, _ in per_base]
    row["probe x per base"] = [
        m / o for m, o in zip(row["probes per base"], row["probes 1 seed per base"], strict=True)
    ]
    row["CPU x per base"] = [
        statistics.median(a[1] / b[1] for a, b in zip(tm, to, strict=True)) for _, _, tm, to in per_base
    ]
    row["found per base"] = [[_one(m.found), _one(o.found)] for m, o, _, _ in per_base]  # seeds, 1 seed
    row["same point per base"] = [m == o != "varies" for m, o in row["found per base"] if m != NONE_FOUND]
    return judged_seeds(row)


def seeds_total(rows: Sequence[Row]) -> Row:
    """The totals over the targets: counts and CPU seconds summed round by round."""
    row: Row = {"space": f"total ({len(rows)} targets)", "seeds": "-", "bases": rows[0]["bases"]}
    for key in ("points", "probes", "all probes", "CPU"):
        for side in (f"{key} rounds", f"{key} 1 seed rounds"):
            row[side] = [sum(col) for col in zip(*(r[side] for r in rows), strict=True)]
    for key in ("probes per base", "probes 1 seed per base", "probe x per base", "CPU x per base"):
        row[key] = []
    row["same point per base"] = [same for r in rows for same in r["same point per base"]]
    return judged_seeds(row)


def over_bases(ratios: Sequence[float]) -> str:
    """'median [min, max]' of per-base ratios ('-' where there are none: the totals' row, whose bases
    are the targets' own)."""
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]"


def judged_seeds(row: Row) -> Row:
    """Medians and ratios of a seeds row from its per-round sums, and whether it meets the targets
    (on the sums over the bases: one base's search is one draw of the search's path)."""
    for key in ("points", "probes", "all probes"):
        row[key] = statistics.median(row[f"{key} rounds"])
        row[f"{key} 1 seed"] = statistics.median(row[f"{key} 1 seed rounds"])
    row["probe x"] = row["probes"] / row["probes 1 seed"]
    row["all probe x"] = row["all probes"] / row["all probes 1 seed"]
    cpu_many, cpu_one = row["CPU rounds"], row["CPU 1 seed rounds"]
    row["CPU s"], row["CPU s 1 seed"] = statistics.median(cpu_many), statistics.median(cpu_one)
    ratios = [a / b for a, b in zip(cpu_many, cpu_one, strict=True)]
    row["CPU x"] = spread(ratios)
    row["CPU ratio"] = statistics.median(ratios)
    row["probe x: bases"] = over_bases(row["probe x per base"])
    row["CPU x: bases"] = over_bases(row["CPU x per base"])
    over = sum(x > SEEDS_COST_TARGET for x in row["probe x per base"])
    row["bases > 2x probes"] = f"{over}/{len(row['probe x per base'])}" if row["probe x per base"] else "-"
    row["#14: probes <= 3x"] = "yes" if row["probe x"] <= SEEDS_PROBES_TARGET else "NO"
    ok = row["probe x"] <= SEEDS_COST_TARGET and row["CPU ratio"] <= SEEDS_COST_TARGET
    row["#18: probes, CPU <= 2x"] = "yes" if ok else "NO"
    same = row["same point per base"]
    row["same point"] = f"{sum(same)}/{len(same)}" if same else "-"
    return row


# --------------------------------------------------------------------------------------------- scaling


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """k of y ~ x^k: the least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def scale_axis(label: str, base: Config, knob: str, values: Sequence[int], rounds: int) -> tuple[Row, Row]:
    """Median CPU time of probe_module(steps=0) at each value (interleaved); (times row, fit row)."""
    fns: dict[str, Callable[[], Any]] = {}
    for v in values:
        built = build(base.with_knobs(**{knob: v}))
        fns[str(v)] = functools.partial(
            probe_module, built.model, built.inputs, built.loss_fn, blocks=built.blocks
        )
    t = interleaved(fns, rounds, warmup=1)
    ms = [med(t[str(v)], 1) for v in values]
    times = {"axis": label, **{f"{knob}={v}": m for v, m in zip(values, ms, strict=True)}}
    fit = {"axis": label, "values": " ".join(map(str, values)), "k": fit_exponent(values, ms)}
    fit["k (largest two)"] = fit_exponent(values[-2:], ms[-2:])  # the local slope at the large end
    return times, fit


def scaling(s: Sizes) -> tuple[list[Row], list[Row]]:
    """Probe time vs depth, width and seq_len, with the fitted exponents."""
    rounds = max(3, s.rounds // 2)
    tf = s.scaling_transformer
    axes = [
        (f"mlp depth (width {s.scaling_mlp.knob('width')})", s.scaling_mlp, "depth", s.depths),
        (f"mlp width (depth {s.scaling_mlp.knob('depth')})", s.scaling_mlp, "width", s.widths),
        (f"rnn seq_len (width {s.scaling_rnn.knob('width')})", s.scaling_rnn, "seq_len", s.seq_lens),
        (
            f"transformer seq_len ({tf.knob('depth')}x{tf.knob('width')})",
            s.scaling_transformer,
            "seq_len",
            s.seq_lens,
        ),
    ]
    pairs = [scale_axis(label, base, knob, values, rounds) for label, base, knob, values in axes]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# -------------------------------------------------------------------------------------------- parallel

DURATION = re.compile(r"^\s*(\d+\.\d+)s\s+(call|setup|teardown)\s+(.+?)\s*$")  # a --durations line


def children_cpu() -> float:
    """User + system CPU seconds of every child process this one has waited for (their own waited-for
    children, such as xdist workers, included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pytest_run(target: Sequence[str], workers: str, timeout: float) -> Row:
    """One `pytest [TARGET] -n WORKERS --durations=10` subprocess: its wall seconds, the CPU seconds of
    it and every process it waited for (its xdist workers), and its 10 slowest phases. Infinite
    times when it ran past `timeout`."""
    cmd = [sys.executable, "-m", "pytest", *target, "-q", "-n", workers, "-p", "no:cacheprovider"]
    cmd += ["--durations=10"]
    before = children_cpu()
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "wall s": math.inf,
            "CPU s": math.inf,
            "exit": "timeout",
            "summary": f"killed after {timeout:.0f} s",
            "slowest": [],
        }
    wall, cpu = time.perf_counter() - start, children_cpu() - before
    lines = proc.stdout.strip().splitlines()
    slowest = [(float(m[1]), m[2], m[3]) for m in map(DURATION.match, lines) if m]
    return {
        "wall s": wall,
        "CPU s": cpu,
        "exit": proc.returncode,
        "summary": lines[-1] if lines else "",
        "slowest": slowest,
    }


def start_up() -> Row:
    """What each pytest process (each xdist worker) pays before its first test: importing torch,
    hypothesis and this package, then collecting the suite; wall and CPU seconds of each, measured in
    fresh subprocesses."""
    row: Row = {"run": "start-up of one process"}
    for label, cmd in (
        ("import", [sys.executable, "-c", "import torch, hypothesis, stabilitycheck"]),
        ("collect", [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]),
    ):
        before, start = children_cpu(), time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
        row[f"{label} wall s"] = time.perf_counter() - start
        row[f"{label} CPU s"] = children_cpu() - before
    return row


def parallel(s: Sizes) -> tuple[list[Row], list[Row]]:
    """The suite (`s.pytest_target`, the whole of it by default) with -n 2 and -n 0, and one process's
    start-up (collection includes the import); then the 10 slowest test phases of the -n 0 run."""
    rows: list[Row] = []
    for label, n in (("-n 2", "2"), ("-n 0", "0")):
        rows.append({"run": label, **pytest_run(s.pytest_target, n, s.pytest_timeout)})
    for row in rows:
        row["wall vs -n 2"] = row["wall s"] / rows[0]["wall s"]
        row["CPU vs -n 2"] = row["CPU s"] / rows[0]["CPU s"]
    slowest = [{"s": t, "phase": phase, "test": test} for t, phase, test in rows[1].pop("slowest")]
    rows[0].pop("slowest")
    return [*rows, start_up()], slowest


# ------------------------------------------------------------------------------------------------ main


def pin_malloc() -> str:
    """Keep freed memory in glibc's heap (trim and mmap thresholds at 1 GiB). With the defaults, a
    large free returns pages to the OS and the next variant to allocate pays the page faults (we saw
    2,500 faults, +30%, land on whichever variant ran after a big free), so ratios depended on order."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default (not glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 1 << 30)
    return "glibc, trim and mmap thresholds 1 GiB" if ok else "glibc defaults (mallopt refused)"


def machine() -> Row:
    """The machine the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch threads": torch.get_num_threads(),
        "malloc": MALLOC[0],
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


NOTES = {
    "overhead": (
        "One process, torch threads as above (1 by default). Every variant runs once per round on the\n"
        "same model, in an order rotated each round; {rounds} rounds after 2 warm-up calls. Time is\n"
        "CPU time of the process (time.process_time). Each cell is the median over rounds of the\n"
        "per-round ratio to its baseline, [quartiles] of those ratios. Baselines: bare = zero grads +\n"
        "forward + backward(); probe steps=1 is divided by 2 x (forward + backward) + 1 SGD step, the\n"
        "same work unprobed. floor = hooks appending block outputs + one autograd.grad + one fused\n"
        "norm + one host copy, no bookkeeping; norms alone = that fused norm call and host copy by\n"
        "itself, over tensors of the same sizes (block outputs, as many output-gradient-sized ones,\n"
        "weight gradients): the cost of reading every byte once, which any exact probe pays;\n"
        "input grad = bare with the float input requiring grad: dL/d(input), which block 0's gain\n"
        "needs and bare never computes ('-': token ids or a recurrent row, no such gradient).\n"
        "detect_anomaly = bare under torch.autograd.detect_anomaly; lightning norms = bare +\n"
        "p.grad.norm().item() per parameter; hooks + .item() = bare with a forward hook per block\n"
        "logging ||output|| and, via a tensor hook, ||dL/d(output)|| with .item().\n"
        "The watch mode is measured in its own section. The probe caches its per-model layout, warm\n"
        "after the warm-up calls (as for repeated calls on one model; a search builds a new model per\n"
        "probe). Target: probe <= 1.05x on the MLPs and the transformer, <= 1.15x on the RNN."
    ),
    "watch": (
        "Per model, {watch_steps} training steps (zero_grad, forward, backward, SGD step) per call, on four\n"
        "copies of the model built alike: bare; under watch() with its defaults (flush every\n"
        "{watch_steps} steps, so each call holds one flush: its host read, the rule and the log); floor =\n"
        "an ideal watcher with no bookkeeping (hooks keeping block outputs and their gradients, one\n"
        "fused norm call and one stack per step, one host read per call); 2nd copy = bare again, the\n"
        "copy-to-copy noise. {watch_rounds} interleaved rounds after 2 warm-up calls; CPU time; each\n"
        "ratio is the median over rounds of the per-round ratio to bare, [quartiles]. ms/step are\n"
        "medians. Target (issue 17): watch <= 1.05x where a bare step takes >= 5 ms, else <= 1.15x."
    ),
    "search": (
        "search(): Hypothesis (max_examples={max_examples}, seed 0, database=None: one in memory per\n"
        "search) + canonical descent and 1-minimal check + remedy re-judging. sweep(): every grid point\n"
        "judged once. Both judge a\n"
        "point over the same seeds budget ('seeds', with early stopping), so 'search points' (points\n"
        "judged) compares with 'grid' (the sweep's points), and 'search probes' (every model built and\n"
        "probed, one per seed; remedies and last-step probes included) with 'sweep probes' (the same\n"
        "count for the sweep); 'search judged probes' is SearchResult.probes (judging only). Times are\n"
        "CPU seconds of one run each; 'same minimum' checks the search's point is in boundary(sweep).\n"
        "Target: <= 10% of the sweep's probes and time on the 4-knob space."
    ),
    "seeds": (
        "Each of the zoo's targets (zoo.targets(); shrunk by --quick) searched at each of {seeds_bases}\n"
        "base seeds (run.seed 0, 1, ...: where the verdict's seeds start) twice: with its seeds budget\n"
        "(run.seeds, the verdict over seeds, stopping early where the seeds so far decide) and with\n"
        "seeds=1; Hypothesis seed 0, max_examples={seeds_max_examples}, database=None, the default limits\n"
        "(--quick: growth limit 2, as above). One base's search is one draw of the search's path (the\n"
        "seeds a point is judged on change where the descent goes), so a target's figures are summed\n"
        "over its bases. All searches run once per round in a rotated order, {seeds_rounds} rounds after\n"
        "a warm-up (each target's two searches at the first base), in this process. points = configurations\n"
        "judged, on one seed (the screen the search steers on) or the full rule (SearchResult.points);\n"
        "probes = every (configuration, seed) probed to judge them, each once: the full rule reuses the\n"
        "screen's probes (SearchResult.probes); all probes = every model built, remedies and recurrent\n"
        "last-step probes included. Counts are summed over the bases (a search is deterministic, so\n"
        "every round agrees); CPU s = median over rounds of the CPU seconds of all the bases' searches;\n"
        "CPU x = median of per-round ratios of those sums [quartiles]; 'probe x: bases' and 'CPU x:\n"
        "bases' = median [min, max] over the bases of one base's ratio; 'bases > 2x probes' counts them.\n"
        "'same point': of the bases where the search with seeds found a counterexample, those where it\n"
        "is the single-seed one ('-': none found). Targets, on the sums: probes <= 3x (issue 14);\n"
        "probes and CPU time <= 2x (issue 18)."
    ),
    "scaling": (
        "CPU ms of probe_module(steps=0) on a prebuilt model (one forward + backward with hooks and\n"
        "norms), median of {scaling_rounds} interleaved rounds; k is the least-squares slope of log time\n"
        "on log size, over all sizes and over the largest two. A fixed per-probe cost (setup, hooks,\n"
        "one host sync) pulls k below its asymptote at small sizes. Matmul work is batch x width^2 per\n"
        "layer, so k -> 2 in width only once the matmuls dominate; depth and RNN length are linear;\n"
        "attention adds a seq_len^2 term that dominates only at long sequences."
    ),
    "parallel": (
        "`python -m pytest [TARGET] -q -n N -p no:cacheprovider --durations=10` in a subprocess, one run\n"
        "each; TARGET is the whole suite (the README's test command) unless --quick. wall = its wall\n"
        "seconds; CPU = user + system seconds of it and its xdist workers (getrusage of children); a run\n"
        "past {timeout:.0f} s is killed and shown as inf. Each xdist worker sets cores // workers torch\n"
        "threads (--stability-threads=auto). start-up = one fresh process importing torch, hypothesis\n"
        "and this package, and one collecting the suite (import included): the fixed cost each worker\n"
        "pays once. The slowest phases are the -n 0 run's (no worker beside them)."
    ),
}


SECTIONS = ("overhead", "watch", "search", "seeds", "scaling", "parallel")


def run(quick: bool, only: Sequence[str] = SECTIONS) -> dict[str, Any]:
    """Run the sections in `only` and return the results (figures, targets and notes) as one dict."""
    s = sizes(quick)
    start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "quick": quick}
    sections: dict[str, float] = {}
    for name, section in (
        ("overhead", overhead),
        ("watch", watch_overhead),
        ("search", searching),
        ("seeds", seeds_vs_one),
    ):
        if name in only:
            t0 = time.perf_counter()
            result[name] = section(s)
            sections[name] = time.perf_counter() - t0
    if "scaling" in only:
        t0 = time.perf_counter()
        result["scaling"], result["exponents"] = scaling(s)
        sections["scaling"] = time.perf_counter() - t0
    if "parallel" in only:
        t0 = time.perf_counter()
        result["parallel"], result["slowest"] = parallel(s)
        sections["parallel"] = time.perf_counter() - t0
    result["section_s"] = sections
    result["notes"] = {
        k: v.format(
            rounds=s.rounds,
            max_examples=s.max_examples,
            seeds_rounds=s.seeds_rounds,
            seeds_bases=len(s.seeds_bases),
            seeds_max_examples=s.seeds_max_examples,
            scaling_rounds=max(3, s.rounds // 2),
            timeout=s.pytest_timeout,
            watch_steps=WATCH_STEPS,
            watch_rounds=max(3, s.rounds // 2),
        )
        for k, v in NOTES.items()
    }
    result["total_s"] = time.perf_counter() - start
    return result


def shown(row: Row) -> Row:
    """A row as the table shows it: without the medians behind the spreads (' ratio') and the
    per-round values (lists), which the JSON keeps."""
    return {k: v for k, v in row.items() if not k.endswith(" ratio") and not isinstance(v, list)}


def render(result: dict[str, Any]) -> str:
    """The tables and notes as text."""
    fmt = ".3g"
    parts = ["## machine", tabulate(list(result["machine"].items()), tablefmt="simple")]
    sections = [
        ("probe and its peers vs a bare step (CPU time ratios)", "overhead", "overhead"),
        ("watch mode vs a bare training step (CPU time ratios)", "watch", "watch"),
        ("search vs exhaustive sweep", "search", "search"),
        ("seeds vs one seed (zoo targets)", "seeds", "seeds"),
        ("probe time vs size (CPU ms)", "scaling", "scaling"),
        ("scaling exponents (time ~ size^k)", "exponents", None),
        ("the test suite in parallel and not", "parallel", "parallel"),
        ("the 10 slowest test phases (-n 0)", "slowest", None),
    ]
    for title, key, note in sections:
        if key not in result:
            continue
        rows = [shown(row) for row in result[key]]
        parts += ["", f"## {title}", tabulate(rows, headers="keys", floatfmt=fmt)]
        if note:
            parts.append(result["notes"][note])
    per = ", ".join(f"{k} {v:.0f} s" for k, v in result["section_s"].items())
    parts += ["", f"total bench time: {result['total_s']:.1f} s wall ({per})"]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: print the tables; --json also writes them; --quick is a tiny smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: what each xdist worker uses; CPU time stays meaningful "
        "on a shared machine)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    args = parser.parse_args(argv)
    only = args.only.split(",")
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    MALLOC[0] = pin_malloc()
    result = run(args.quick, only)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
