"""Benchmarks of stabilitycheck: probe overhead, search vs exhaustive grid, scaling, parallel tests.

Run `python ci/bench.py [--json FILE] [--quick] [--threads N]`. Every figure is measured here, in this
process (the parallel figure in subprocesses), as the median of several interleaved repeats; nothing
is hard-coded. `--quick` runs every section on tiny sizes (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
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

from stabilitycheck.config import Config
from stabilitycheck.probing import call_model, probe_module
from stabilitycheck.searching import boundary, search, sweep
from stabilitycheck.space import INIT_SCALES, Axis, Space
from stabilitycheck.verdicts import Limits
from stabilitycheck.zoo import build

ROOT = Path(__file__).resolve().parent.parent
SLOW_MS = 5.0  # a bare step at least this long is held to the tight overhead target
TARGET_SLOW, TARGET_FAST = 1.05, 1.15
SEARCH_TARGET = 0.10  # search cost as a fraction of the exhaustive sweep, on the 4-knob space
Row = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """Every size the bench uses; `quick` shrinks them all to a smoke run."""

    rounds: int  # interleaved repeats of the overhead and scaling measurements
    mlp: Config
    transformer: Config
    rnn: Config
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
    pytest_target: str
    pytest_timeout: float


def sizes(quick: bool) -> Sizes:
    """The full bench, or tiny sizes for `--quick`."""
    if quick:
        tiny = Config(family="mlp", depth=2, width=8, batch_size=4)
        return Sizes(
            rounds=3,
            mlp=tiny,
            transformer=Config(family="transformer", depth=1, width=8, seq_len=4, norm="pre", batch_size=2),
            rnn=Config(family="rnn", depth=1, width=8, seq_len=8, batch_size=2),
            depths=(2, 4),
            widths=(8, 16),
            seq_lens=(4, 8),
            scaling_mlp=tiny,
            scaling_rnn=Config(family="rnn", depth=1, width=8, batch_size=2),
            scaling_transformer=Config(family="transformer", depth=1, width=8, norm="pre", batch_size=2),
            space2=Space("mlp 2-knob", tiny, (Axis.range("depth", 1, 4), Axis("init_scale", (1.0, 4.0)))),
            space4=Space(
                "mlp 4-knob",
                tiny,
                (
                    Axis.range("depth", 1, 3),
                    Axis("width", (4, 8)),
                    Axis("init_scale", (1.0, 4.0)),
                    Axis.range("steps", 0, 1),
                ),
            ),
            limits=Limits(growth=2.0),  # tiny models cannot pass the default growth limit
            max_examples=5,
            pytest_target="tests/test_config.py",
            pytest_timeout=120.0,
        )
    base = Config(family="mlp", width=32, batch_size=8, activation="tanh")
    return Sizes(
        rounds=21,
        mlp=Config(family="mlp", depth=16, width=256, activation="tanh", batch_size=16, lr=1e-4),
        transformer=Config(
            family="transformer",
            depth=4,
            width=128,
            seq_len=64,
            norm="pre",
            activation="gelu",
            batch_size=2,
            lr=1e-4,
        ),
        rnn=Config(family="rnn", depth=1, width=64, seq_len=256, batch_size=16, lr=1e-4),
        depths=(8, 16, 32, 64),
        widths=(64, 128, 256, 512, 1024),
        seq_lens=(16, 64, 256, 1024),
        scaling_mlp=Config(family="mlp", depth=8, width=256, batch_size=32),
        scaling_rnn=Config(family="rnn", depth=1, width=64, batch_size=8),
        scaling_transformer=Config(
            family="transformer", depth=2, width=64, norm="pre", activation="gelu", batch_size=2
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
        pytest_target="properties",
        pytest_timeout=120.0,
    )


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


def bare_step(config: Config) -> tuple[Callable[[], None], Callable[[], None], Callable[[], Any]]:
    """(bare, anomaly, probed) on one built model: 2 x (forward + backward) + 1 SGD step, the same
    under detect_anomaly, and probe_module(steps=1) doing that same work with hooks and norms."""
    built = build(config)
    model, inputs, loss_fn = built.model, built.inputs, built.loss_fn
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)

    def bare() -> None:
        for i in range(2):
            opt.zero_grad(set_to_none=True)
            loss_fn(call_model(model, inputs), inputs).backward()
            if i == 0:
                opt.step()

    def anomaly() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.detect_anomaly(check_nan=True):
                bare()

    def probed() -> Any:
        return probe_module(model, inputs, loss_fn, blocks=built.blocks, steps=1, lr=config.lr)

    return bare, anomaly, probed


def calibrate_batch(config: Config, min_ms: float, cap: int = 4096) -> Config:
    """Double the batch until the bare step's median CPU time (5 runs) reaches `min_ms`."""
    while True:
        bare, _, _ = bare_step(config)
        bare()
        ms = med([timed(bare) for _ in range(5)], 1)
        if ms >= min_ms or config.batch_size >= cap:
            return config
        config = config.with_knobs(batch_size=config.batch_size * 2)


def overhead(s: Sizes) -> list[Row]:
    """Probe overhead vs the bare step (and detect_anomaly vs the bare step) per model."""
    if s.rounds < 5:
        cases = {"mlp (quick)": s.mlp, "transformer (quick)": s.transformer, "rnn (quick)": s.rnn}
    else:
        mlp = calibrate_batch(s.mlp, 1.5 * SLOW_MS)  # a margin: the calibration itself is noisy
        big = mlp.with_knobs(batch_size=4 * mlp.batch_size)  # the per-parameter norm cost is fixed
        cases = {
            "mlp 16x256": mlp,
            "mlp 16x256, 4x batch": big,
            "transformer 4x128 pre, T=64": s.transformer,
            "rnn T=256": s.rnn,
        }
    rows = []
    for label, config in cases.items():
        bare, anomaly, probed = bare_step(config)
        t = interleaved({"bare": bare, "probe": probed, "anomaly": anomaly}, s.rounds)
        finite = probed().first_nonfinite is None  # the repeated SGD steps kept the model finite
        bare_ms = med(t["bare"], 1)
        target = TARGET_SLOW if bare_ms >= SLOW_MS else TARGET_FAST
        ratio = paired_ratio(t["probe"], t["bare"], 1)
        rows.append(
            {
                "model": label,
                "batch": config.batch_size,
                "bare ms": bare_ms,
                "probe ms": med(t["probe"], 1),
                "probe/bare": ratio,
                "wall probe/bare": paired_ratio(t["probe"], t["bare"], 0),
                "target": target,
                "met": "yes" if ratio <= target else "NO",
                "anomaly/bare": paired_ratio(t["anomaly"], t["bare"], 1),
                "finite": finite,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------- watch

WATCH_STEPS = 10  # training steps per timed call; the watcher flushes once per call (default: every 50)


def watch_overhead(s: Sizes) -> list[Row]:
    """stabilitycheck.watch on a training loop vs the same loop bare, on two copies of each model."""
    from stabilitycheck.watching import Watcher

    if s.rounds < 5:
        cases = {"mlp (quick)": s.mlp, "transformer (quick)": s.transformer, "rnn (quick)": s.rnn}
    else:
        mlp = calibrate_batch(s.mlp, 2 * 1.5 * SLOW_MS)  # calibrate_batch times 2 forward+backward
        cases = {"mlp 16x256": mlp, "transformer 4x128 pre, T=64": s.transformer, "rnn T=256": s.rnn}
    rows = []
    for label, config in cases.items():
        loops, watchers = {}, []
        for name in ("bare", "watch"):
            built = build(config)
            opt = torch.optim.SGD(built.model.parameters(), lr=config.lr)
            w = Watcher(built.model, opt, blocks=built.blocks, flush_every=WATCH_STEPS, report=None)
            if name == "watch":
                watchers.append(w.__enter__())

            def loop(
                b: Any = built, o: Any = opt, w: Watcher | None = w if name == "watch" else None
            ) -> None:
                for _ in range(WATCH_STEPS):
                    o.zero_grad(set_to_none=True)
                    loss = b.loss_fn(call_model(b.model, b.inputs), b.inputs)
                    if w is not None:
                        w.loss(loss)
                    loss.backward()
                    o.step()

            loops[name] = loop
        t = interleaved(loops, s.rounds)
        report = watchers[0].close()
        bare_ms = med(t["bare"], 1) / WATCH_STEPS
        target = TARGET_SLOW if bare_ms >= SLOW_MS else TARGET_FAST
        ratio = paired_ratio(t["watch"], t["bare"], 1)
        rows.append(
            {
                "model": label,
                "batch": config.batch_size,
                "bare ms/step": bare_ms,
                "watch ms/step": med(t["watch"], 1) / WATCH_STEPS,
                "watch/bare": ratio,
                "wall watch/bare": paired_ratio(t["watch"], t["bare"], 0),
                "target": target,
                "met": "yes" if ratio <= target else "NO",
                "steps": report.steps,
                "flagged": len(report.flagged_steps),
                "host reads": report.host_reads,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------- search


def index_of(space: Space, config: Config) -> tuple[int, ...]:
    """The grid index of a Config of `space`."""
    return tuple(a.values.index(config.knob(a.name)) for a in space.axes)


def search_vs_sweep(space: Space, limits: Limits, max_examples: int) -> Row:
    """Probes and time of search() (remedy re-probes included) vs sweep() of every grid point."""
    (w_search, c_search), result = _timed_value(
        lambda: search(space, limits=limits, max_examples=max_examples, seed=0, database=None)
    )
    (w_sweep, c_sweep), grid = _timed_value(lambda: sweep(space, limits=limits))
    cx = result.counterexample
    remedies = sum(1 for r in cx.remedies if r.config is not None) if cx else 0
    probes = result.probes + remedies
    minimal = boundary(grid)
    found = index_of(space, cx.config) if cx else None
    same = "n/a (grid has no explosion)" if not minimal else ("yes" if found in minimal else "NO")
    knobs = " ".join(f"{a.name}={cx.config.knob(a.name)}" for a in space.axes) if cx else "none found"
    return {
        "space": space.label,
        "grid": space.size,
        "search probes": probes,
        "sweep probes": len(grid),
        "probe frac": probes / len(grid),
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
    axes = [
        (f"mlp depth (width {s.scaling_mlp.width})", s.scaling_mlp, "depth", s.depths),
        (f"mlp width (depth {s.scaling_mlp.depth})", s.scaling_mlp, "width", s.widths),
        (f"rnn seq_len (width {s.scaling_rnn.width})", s.scaling_rnn, "seq_len", s.seq_lens),
        (
            f"transformer seq_len (2x{s.scaling_transformer.width})",
            s.scaling_transformer,
            "seq_len",
            s.seq_lens,
        ),
    ]
    pairs = [scale_axis(label, base, knob, values, rounds) for label, base, knob, values in axes]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# -------------------------------------------------------------------------------------------- parallel


def pytest_wall(target: str, workers: str, env: dict[str, str], timeout: float) -> Row:
    """Wall seconds of one `pytest TARGET -q -n WORKERS` subprocess (inf when it times out)."""
    cmd = [sys.executable, "-m", "pytest", target, "-q", "-n", workers, "-p", "no:cacheprovider"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"wall s": math.inf, "exit": "timeout", "summary": f"killed after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    return {
        "wall s": time.perf_counter() - start,
        "exit": proc.returncode,
        "summary": lines[-1] if lines else "",
    }


def parallel(s: Sizes) -> list[Row]:
    """The pytest run of `s.pytest_target` with -n 2, -n 0, and -n 0 with one OpenMP thread."""
    runs = [
        ("-n 2 (1 torch thread per worker)", "2", {}),
        ("-n 0 (torch default threads)", "0", {}),
        ("-n 0, OMP_NUM_THREADS=1", "0", {"OMP_NUM_THREADS": "1"}),
    ]
    rows = [
        {"run": label, **pytest_wall(s.pytest_target, n, env, s.pytest_timeout)} for label, n, env in runs
    ]
    for row in rows:
        row["vs -n 2"] = row["wall s"] / rows[0]["wall s"]
    return rows


# ------------------------------------------------------------------------------------------------ main


def machine() -> Row:
    """The machine the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch threads": torch.get_num_threads(),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


NOTES = {
    "overhead": (
        "CPU time (time.process_time; torch threads as above) of one call, median over {rounds}\n"
        "interleaved rounds (bare, probe, anomaly each once per round, order rotated) after 2 warm-up\n"
        "calls; ratios are the median of the per-round ratios (wall-clock ratio beside it). bare =\n"
        "2 x (forward + backward) + 1 SGD step; probe = probe_module(steps=1) on the same model and\n"
        "inputs (hooks, every norm, one host sync per step); anomaly = bare under\n"
        "torch.autograd.detect_anomaly. The MLP batch is doubled until bare takes >= 7.5 ms (5 ms plus\n"
        "a margin), then 4x that batch again. Target: <= 1.05x when bare >= 5 ms, else <= 1.15x."
    ),
    "watch": (
        "CPU time of {watch_steps} training steps (zero_grad, forward, backward, SGD step) per call, median\n"
        "over {rounds} interleaved rounds, per step; bare and watched run on two identical copies of the\n"
        "model. watch = stabilitycheck.watch with flush_every={watch_steps} (one host read per call; the\n"
        "default, 50, reads 5x less often) and the spike rule on every series. The MLP batch is doubled\n"
        "until a bare step takes about 7.5 ms (5 ms plus a margin).\n"
        "Target: <= 1.05x when bare >= 5 ms/step, else <= 1.15x."
    ),
    "search": (
        "search(): Hypothesis (max_examples={max_examples}, seed 0, no database) + 1-minimal pass +\n"
        "remedy re-probes (counted in its probes and time). sweep(): every grid point probed once.\n"
        "Times are CPU seconds of one run each; 'same minimum' checks the search's point is in\n"
        "boundary(sweep). Target: <= 10% of the sweep's probes and time on the 4-knob space."
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
        "Wall seconds of `python -m pytest TARGET -q -n N -p no:cacheprovider` in a subprocess, one\n"
        "run each (the suite is long; a run past {timeout:.0f} s is killed and shown as inf). Under xdist\n"
        "each worker sets 1 torch thread (conftest.py); plain -n 0 keeps torch's default, so the third\n"
        "run repeats -n 0 with OMP_NUM_THREADS=1 to separate thread oversubscription from xdist."
    ),
}


SECTIONS = ("overhead", "watch", "search", "scaling", "parallel")


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
        ("parallel", parallel),
    ):
        if name in only:
            t0 = time.perf_counter()
            result[name] = section(s)
            sections[name] = time.perf_counter() - t0
    if "scaling" in only:
        t0 = time.perf_counter()
        result["scaling"], result["exponents"] = scaling(s)
        sections["scaling"] = time.perf_counter() - t0
    result["section_s"] = sections
    result["notes"] = {
        k: v.format(
            rounds=s.rounds,
            max_examples=s.max_examples,
            scaling_rounds=max(3, s.rounds // 2),
            timeout=s.pytest_timeout,
            watch_steps=WATCH_STEPS,
        )
        for k, v in NOTES.items()
    }
    result["total_s"] = time.perf_counter() - start
    return result


def render(result: dict[str, Any]) -> str:
    """The tables and notes as text."""
    fmt = ".3g"
    parts = ["## machine", tabulate(list(result["machine"].items()), tablefmt="simple")]
    sections = [
        ("probe overhead (CPU ms)", "overhead", "overhead"),
        ("watch overhead on a training loop (CPU ms)", "watch", "watch"),
        ("search vs exhaustive sweep", "search", "search"),
        ("probe time vs size (CPU ms)", "scaling", "scaling"),
        ("scaling exponents (time ~ size^k)", "exponents", None),
        ("parallel property suite", "parallel", "parallel"),
    ]
    for title, key, note in sections:
        if key not in result:
            continue
        parts += ["", f"## {title}", tabulate(result[key], headers="keys", floatfmt=fmt)]
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
    result = run(args.quick, only)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
