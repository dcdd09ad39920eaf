"""The watch mode's spike rule on clean training runs: how often it flags a clean value, and how often
it catches one logged value multiplied x3, x10 or x50, early in training (steps 40-150) and later,
against the rule it replaced (the window's mean and std, with the same clamping, non-finite and zero
handling: OLMo-core's rule with two fixes).

Run `python ci/spike_rule.py [--steps N] [--seeds N] [--logs DIR]`. It trains 7 setups x `--seeds`
seeds for `--steps` steps under `stabilitycheck.watch` (one JSONL log each, kept in --logs; runs
already there are reused), then replays every logged series: the trend's rule is the package's
SpikeRule (its thresholds at every step, on the series' clean history), the window's rule is written
out below. A planted value counts as caught where it lies above the threshold its step was judged
against. About 10 minutes on one CPU core at the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the watch tests' regression models and data

import watch_models  # noqa: E402

from stabilitycheck import watch  # noqa: E402
from stabilitycheck.spikes import SpikeRule  # noqa: E402

KINDS = ("activation", "activation_grad", "gradient")  # block outputs, their gradients, weight gradients
PLANTED_AT = (40, 60, 80, 100, 120, 150, 200, 250, 400, 800, 1500)
EARLY = 150  # planted at or before this step: early in training
FACTORS = (3.0, 10.0, 50.0)
SETUPS = ("mlp-reg", "prenorm-reg", "readme", "cmlp-adam", "cmlp-tanh-sgd", "ctrans-warm", "cnn-sgd")


class Classifier(nn.Module):
    """An input layer, `depth` blocks and a 10-way head, on inputs of `shape`: Linear + `act` blocks,
    pre-norm transformer layers over a sequence, or Conv + BatchNorm + ReLU blocks over images."""

    def __init__(self, kind: str, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.inp: nn.Module = nn.Linear(32, 64)
            blocks = [nn.Sequential(nn.Linear(64, 64), act()) for _ in range(6)]
            self.head = nn.Linear(64, 10)
        elif kind == "transformer":
            self.inp = nn.Linear(16, 32)
            blocks = [
                nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, norm_first=True, batch_first=True)
                for _ in range(4)
            ]
            self.head = nn.Linear(32, 10)
        else:
            self.inp = nn.Conv2d(3, 16, 3, padding=1)
            blocks = [
                nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
                for _ in range(4)
            ]
            self.head = nn.Linear(16, 10)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        if self.kind == "transformer":
            x = x.mean(1)  # over the sequence
        elif self.kind == "cnn":
            x = x.mean((2, 3))  # over the image
        return self.head(x)


Batch = tuple[torch.Tensor, torch.Tensor]


def teacher(seed: int, shape: tuple[int, ...]) -> Callable[[torch.Generator, int], Batch]:
    """Batches of normal inputs of `shape`, labelled by a fixed random tanh network's argmax."""
    g = torch.Generator().manual_seed(1000 + seed)
    d = math.prod(shape)
    w1, w2 = torch.randn(d, 64, generator=g) / math.sqrt(d), torch.randn(64, 10, generator=g) / 8

    def data(gen: torch.Generator, n: int) -> Batch:
        x = torch.randn((n, *shape), generator=gen)
        return x, (torch.tanh(x.reshape(n, -1) @ w1) @ w2).argmax(-1)

    return data


def train(setup: str, seed: int, steps: int, log: Path) -> None:
    """One clean run of `setup` under watch, logged to `log`."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sched = None
    if setup in ("mlp-reg", "prenorm-reg"):  # the watch tests' regression: batch 32, a squared error
        model: nn.Module = watch_models.MLP() if setup == "mlp-reg" else watch_models.PreNorm()
        opt: torch.optim.Optimizer = (
            torch.optim.SGD(model.parameters(), lr=0.01)
            if setup == "mlp-reg"
            else torch.optim.Adam(model.parameters(), lr=1e-3)
        )

        def step_loss() -> torch.Tensor:
            return watch_models.compute_loss(model, watch_models.batch(gen, model))

    elif setup == "readme":  # the README's watch example: 8 Linear + Tanh blocks and a head, AdamW
        layers = [nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(8)]
        model = nn.Sequential(*layers, nn.Linear(32, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step_loss() -> torch.Tensor:
            x = torch.randn(64, 32, generator=gen)
            return nn.functional.mse_loss(model(x).squeeze(-1), x.sum(-1).sin())

    else:  # a teacher's classes, batch 64, cross-entropy
        shapes = {"cmlp": ("mlp", (32,)), "ctrans": ("transformer", (8, 16)), "cnn": ("cnn", (3, 12, 12))}
        kind, shape = shapes[setup.split("-")[0]]
        model = Classifier(kind, nn.Tanh if setup == "cmlp-tanh-sgd" else nn.ReLU)
        if setup in ("cmlp-tanh-sgd", "cnn-sgd"):
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        elif setup == "ctrans-warm":  # 100 steps of linear warm-up, then cosine decay
            opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
            )
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        data = teacher(seed, shape)

        def step_loss() -> torch.Tensor:
            x, y = data(gen, 64)
            return nn.functional.cross_entropy(model(x), y)

    with watch(model, opt, log=str(log), report=None) as w:
        for _ in range(steps):
            loss = step_loss()
            w.loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()


def series_of(log: Path) -> dict[str, list[float]]:
    """Every judged series of a log but the weights (measured every 50th step): name -> values, 0.0
    where a step has none (the rule's 'no measurement')."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    out = {"loss": [r["loss"] or 0.0 for r in rows], "grad_norm": [r["grad_norm"] or 0.0 for r in rows]}
    for kind in KINDS:
        for j in range(len(rows[0][kind])):
            out[f"{kind}.{j}"] = [r[kind][j] if r[kind] else 0.0 for r in rows]
    return out


def window_rule(rule: SpikeRule, values: Sequence[float], logged: bool) -> tuple[list[float], list[bool]]:
    """The rule replaced: the mean and population std of the last `window` accepted values (on ln x
    where `logged`), threshold mean + max(sigmas x std, floor), flagged values entering clamped to it,
    non-finite values and zeros never entering. Per step: the threshold (NaN before warm-up), the flag."""
    window: list[float] = []
    thresholds, flags = [], []
    for x in values:
        if x == 0 or not math.isfinite(x):
            thresholds.append(math.nan)
            flags.append(not math.isfinite(x))
            continue
        y = math.log(x) if logged else x
        threshold, flagged = math.nan, False
        if len(window) >= rule.warmup:
            mean = sum(window) / len(window)
            std = math.sqrt(sum((v - mean) ** 2 for v in window) / len(window))
            floor = math.log1p(rule.floor) if logged else rule.floor * abs(mean)
            threshold = mean + max(rule.sigmas * std, floor)
            flagged = y > threshold
            y = min(y, threshold)
        thresholds.append(math.exp(threshold) if logged else threshold)
        flags.append(flagged)
        window = [*window, y][-rule.window :]
    return thresholds, flags


def trend_rule(rule: SpikeRule, values: Sequence[float], logged: bool) -> tuple[list[float], list[bool]]:
    """The package's rule on one series: per step the threshold and the flag."""
    column = torch.tensor(values, dtype=torch.float64)
    judged = rule.update_many(rule.state(1, logged=[logged]), column.unsqueeze(1))
    accepted = (column != 0) & column.isfinite()
    judged_at = accepted & (torch.cumsum(accepted, 0) - accepted.long() >= rule.warmup)  # as window_rule
    thresholds = torch.where(judged_at, judged.threshold[:, 0], math.nan)
    return thresholds.tolist(), judged.flags[:, 0].tolist()


RULES: dict[str, Callable[[SpikeRule, Sequence[float], bool], tuple[list[float], list[bool]]]] = {
    "trend": trend_rule,
    "window": window_rule,
}


def replay(logs: Sequence[Path]) -> tuple[list[list[Any]], list[list[Any]]]:
    """The clean runs' flags per rule and mode, and the planted values caught per rule."""
    rule = SpikeRule()
    caught: Counter[tuple[str, str, str, float]] = Counter()
    tried: Counter[tuple[str, str, str, float]] = Counter()
    clean: Counter[tuple[str, bool, str]] = Counter()  # (rule, on ln x, series kind) -> runs flagged
    for log in logs:
        flagged_here: set[tuple[str, bool, str]] = set()
        for name, values in series_of(log).items():
            kind = name.split(".")[0]
            for label, judge in RULES.items():
                for logged in (True, False):
                    thresholds, flags = judge(rule, values, logged)
                    if any(flags):
                        flagged_here.add((label, logged, kind))
                    if not logged:
                        continue
                    for at in PLANTED_AT:
                        if at >= len(values) or values[at] == 0 or not math.isfinite(thresholds[at]):
                            continue  # not judged there (warm-up, no measurement)
                        phase = "40-150" if at <= EARLY else "after 150"
                        for factor in FACTORS:
                            tried[label, kind, phase, factor] += 1
                            caught[label, kind, phase, factor] += values[at] * factor > thresholds[at]
        clean.update(flagged_here)
    flags = [
        [label, "ln x" if logged else "values", kind, clean[label, logged, kind], len(logs)]
        for label in RULES
        for logged in (True, False)
        for kind in ("loss", "grad_norm", *KINDS)
    ]
    rows = []
    for kind in ("loss", "grad_norm", *KINDS):
        for phase in ("40-150", "after 150"):
            row: list[Any] = [kind, phase]
            for factor in FACTORS:
                n = tried["trend", kind, phase, factor]
                row += [f"{caught[label, kind, phase, factor]}/{n}" for label in RULES]
            rows.append(row)
    return flags, rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument(
        "--logs", type=Path, default=None, help="where the logs are kept (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.logs or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        logs = []
        for setup in SETUPS:
            for seed in range(args.seeds):
                log = folder / f"{setup}-{seed}.jsonl"
                if not log.exists():
                    part = log.with_suffix(".part")
                    train(setup, seed, args.steps, part)
                    part.rename(log)
                    print(f"trained {setup} seed {seed}", file=sys.stderr, flush=True)
                logs.append(log)
        flags, rows = replay(logs)
    print(
        f"{len(logs)} clean runs of {args.steps} steps; runs with a flagged value per rule, mode and series:"
    )
    print(tabulate(flags, headers=["rule", "judged on", "series", "runs flagged", "runs"]))
    print(
        f"\nplanted x{', x'.join(f'{f:g}' for f in FACTORS)} caught (trend's rule / window's rule), on ln x:"
    )
    headers = ["series", "planted at"] + [f"x{f:g} {r}" for f in FACTORS for r in ("trend", "window")]
    print(tabulate(rows, headers=headers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
