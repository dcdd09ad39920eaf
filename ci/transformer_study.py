"""Post-norm vs pre-norm nn.TransformerEncoder (examples/transformer.py) as stabilitycheck measures it.

Two measurements per norm placement (norm_first 0 = post-norm, 1 = pre-norm), on the example's
d_model = 32, 4 heads, with small batches so it runs on a shared 2-core CPU in a few minutes:

1. At init, across depths: the per-layer activation-gradient norms |dL/d out_l| (input side first),
   the growth (input-side over output-side norm) and the weight-gradient norm of the last and the
   first encoder layer, averaged (geometric mean) over a few seeds. Xiong et al. (2020) predict the
   last layer's gradient to be roughly independent of depth for post-norm and to shrink like
   depth^-1/2 for pre-norm; the log-log slope over depth is printed to compare.
2. Training: 50 Adam steps at lr 1e-3, no warmup, on the example's default loss (cross-entropy of
   a fixed random readout of each token's 32 features to 10 classes against fixed random labels:
   chance is ln 10 = 2.30): loss start / min
   / end and checkpoints, total gradient norm, and the verdict. Liu et al. (2020) report that deep
   post-norm without warmup stalls (loss stays near chance) rather than explodes.

    python ci/transformer_study.py [--depths 2,4,8,16,32] [--seeds 3] [--steps 50] [--timing]

`--timing` also times one forward + backward at depth 32 with 1 and 2 intra-op threads, oneDNN
(mkldnn) on and off, to show where CPU time goes on a loaded machine.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

from stabilitycheck.configprobe import probe
from stabilitycheck.losses import NUM_CLASSES
from stabilitycheck.measurement import Measurement
from stabilitycheck.modelfile import load
from stabilitycheck.report import sparkline
from stabilitycheck.verdicts import verdict

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "transformer.py"
NORMS = {0: "post", 1: "pre"}
CHANCE = math.log(NUM_CLASSES)


def gmean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def slope(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of log y over log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def at_init(depths: list[int], seeds: int, seq_len: int, batch_size: int) -> None:
    subject = load(str(EXAMPLE))
    rows, profiles = [], []
    last: dict[int, list[float]] = {0: [], 1: []}
    for norm_first in (0, 1):
        for depth in depths:
            ms: list[Measurement] = []
            for seed in range(seeds):
                config = subject.config(seed=seed).with_knobs(
                    num_layers=depth, norm_first=norm_first, seq_len=seq_len, batch_size=batch_size
                )
                ms.append(probe(config, subject))
            act = [gmean([m.activation_grad_norms[i] for m in ms]) for i in range(depth)]
            w_last = gmean([m.layer_grad_norms[-1] for m in ms])
            w_first = gmean([m.layer_grad_norms[0] for m in ms])
            last[norm_first].append(w_last)
            v = verdict(ms[0])
            rows.append(
                [
                    NORMS[norm_first],
                    depth,
                    f"{act[0]:.3g}",
                    f"{act[-1]:.3g}",
                    f"{gmean([m.growth for m in ms]):.3g}",
                    f"{w_first:.3g}",
                    f"{w_last:.3g}",
                    f"{gmean([m.grad_norm[0] for m in ms]):.3g}",
                    ", ".join(v.names) or "stable",
                ]
            )
            profiles.append([NORMS[norm_first], depth, sparkline(act), " ".join(f"{a:.2g}" for a in act[:8])])
    headers = [
        "norm",
        "depth",
        "|dL/d out| layer 0",
        "|dL/d out| last",
        "growth",
        "|grad W| first layer",
        "|grad W| last layer",
        "total grad norm",
        "verdict (seed 0)",
    ]
    print(f"At init: d_model 32, seq_len {seq_len}, batch {batch_size}, geometric mean over {seeds} seeds")
    print(tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True))
    print()
    print("Per-layer |dL/d out_l| profile, input side first (log-scale sparkline; first 8 values):")
    print(tabulate(profiles, headers=["norm", "depth", "profile", "values"], tablefmt="simple"))
    print()
    fits = [
        [NORMS[nf], f"{slope(depths, last[nf]):+.3f}", f"{last[nf][-1] / last[nf][0]:.3g}"] for nf in (0, 1)
    ]
    print(
        tabulate(
            fits,
            headers=[
                "norm",
                "log-log slope of |grad W| last layer vs depth",
                f"ratio depth {depths[-1]} / depth {depths[0]}",
            ],
            tablefmt="simple",
        )
    )
    expected = (depths[0] / depths[-1]) ** 0.5
    print(f"(theory: post-norm slope ~ 0, pre-norm slope ~ -0.5, i.e. ratio {expected:.3g})")
    print()


def training(depths: list[int], steps: int, seq_len: int, batch_size: int) -> None:
    subject = load(str(EXAMPLE))
    rows = []
    marks = sorted({0, steps // 5, steps // 2, steps})
    for norm_first in (0, 1):
        for depth in depths:
            config = subject.config(steps=steps, lr=1e-3, optimizer="adam", warmup=0).with_knobs(
                num_layers=depth, norm_first=norm_first, seq_len=seq_len, batch_size=batch_size
            )
            start = time.perf_counter()
            m = probe(config, subject)
            elapsed = time.perf_counter() - start
            v = verdict(m)
            loss = m.loss
            rows.append(
                [
                    NORMS[norm_first],
                    depth,
                    f"{loss[0]:.3f}",
                    f"{min(loss):.3f}",
                    f"{loss[-1]:.3f}",
                    " ".join(f"{loss[k]:.2f}" for k in marks if k < len(loss)),
                    sparkline(loss, width=50),
                    f"{m.grad_norm[0]:.3g}",
                    f"{max(m.grad_norm):.3g}",
                    f"{m.grad_norm[-1]:.3g}",
                    ", ".join(c.describe() for c in v.criteria) or "stable",
                    f"{elapsed:.1f}",
                ]
            )
    headers = [
        "norm",
        "depth",
        "loss start",
        "min",
        "end",
        f"loss at steps {marks}",
        "loss per step",
        "grad norm start",
        "max",
        "end",
        "verdict",
        "s",
    ]
    print(
        f"Training: {steps} Adam steps, lr 1e-3, no warmup, seq_len {seq_len}, batch {batch_size} "
        f"(chance loss ln {NUM_CLASSES} = {CHANCE:.3f})"
    )
    print(tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True))
    print()


def timing(depth: int, seq_len: int, batch_size: int) -> None:
    subject = load(str(EXAMPLE))
    config = subject.config().with_knobs(num_layers=depth, seq_len=seq_len, batch_size=batch_size)
    threads, mkldnn = torch.get_num_threads(), bool(torch.backends.mkldnn.enabled)
    rows = []
    try:
        for n in (1, 2):
            for onednn in (True, False):
                torch.set_num_threads(n)
                torch.backends.mkldnn.enabled = onednn  # type: ignore[assignment]
                built = subject.build(config)
                times = []
                for _ in range(4):
                    start = time.perf_counter()
                    out = built.model(built.inputs)
                    built.loss_fn(out, built.inputs).backward()
                    times.append(time.perf_counter() - start)
                rows.append([n, onednn, f"{times[0]:.3f}", f"{min(times[1:]):.3f}", f"{max(times[1:]):.3f}"])
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn  # type: ignore[assignment]
    print(f"Timing of one forward + backward, depth {depth}, seq_len {seq_len}, batch {batch_size}:")
    headers = ["threads", "mkldnn", "first call s", "min of next 3 s", "max of next 3 s"]
    print(tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True))
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="2,4,8,16,32")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: see --timing)")
    p.add_argument("--timing", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    depths = [int(d) for d in args.depths.split(",")]
    start = time.perf_counter()
    at_init(depths, args.seeds, args.seq_len, args.batch_size)
    training(depths, args.steps, args.seq_len, args.batch_size)
    if args.timing:
        timing(max(depths), args.seq_len, args.batch_size)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
