"""Models, planted faults and a training loop for the watch tests (a module, so that replay bundles
can pickle the model class and compute_loss by reference)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stabilitycheck.watching import Watcher, watch
from stabilitycheck.watchlog import Report

WIDTH = 16


class MLP(nn.Module):
    """`depth` blocks of Linear + tanh, then a linear head to one output."""

    def __init__(self, depth: int = 6, width: int = WIDTH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x).squeeze(-1).mean(-1) if x.dim() == 3 else self.head(x).squeeze(-1)


class Dropped(MLP):
    """The MLP with dropout after each block: its forward draws from the global RNG."""

    def __init__(self, depth: int = 4, p: float = 0.2) -> None:
        super().__init__(depth)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Dropout(p)) for _ in range(depth)
        )


class BatchNormed(MLP):
    """The MLP with a BatchNorm1d in each block: in training mode it normalises by the batch's own
    statistics, in eval mode by its running ones."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__(depth)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.Tanh()) for _ in range(depth)
        )


class PreNorm(nn.Module):
    """A pre-norm transformer encoder (no dropout) on (batch, seq, width) inputs, a linear head."""

    def __init__(self, depth: int = 4, width: int = WIDTH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, norm_first=True, batch_first=True)
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x).squeeze(-1).mean(-1)


class Interleaved(nn.Module):
    """Two lists of Linear + tanh blocks called in turn, attns.0, ffns.0, attns.1, ...: the order
    of the calls is not the order the model registers its blocks in (attns.*, then ffns.*)."""

    def __init__(self, depth: int = 4, width: int = WIDTH) -> None:
        super().__init__()
        self.attns = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        self.ffns = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for a, f in zip(self.attns, self.ffns, strict=True):
            x = f(a(x))
        return self.head(x).squeeze(-1)


class Reversed(MLP):
    """The MLP with its blocks called last first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            x = block(x)
        return self.head(x).squeeze(-1)


class Fault:
    """A forward hook that changes one block's output at one step: x`factor`, NaN or +Inf. The loop
    sets `step`, or with `count=True` the hook counts its own calls (one per training step)."""

    def __init__(self, at: int, kind: str = "scale", factor: float = 50.0, count: bool = False) -> None:
        self.at, self.kind, self.factor, self.count = at, kind, factor, count
        self.step = -1

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.count and torch.is_grad_enabled():
            self.step += 1
        if self.step != self.at:
            return None
        if self.kind == "nan":
            return output * torch.nan
        if self.kind == "inf":
            return output + torch.inf
        return output * self.factor


def batch(gen: torch.Generator, model: nn.Module, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs (a sequence of 8 for the transformer) and a smooth target of them plus noise
    (the loss then stays near the noise variance: its spread is that of a mean of 32 squares)."""
    shape = (size, 8, WIDTH) if isinstance(model, PreNorm) else (size, WIDTH)
    x = torch.randn(shape, generator=gen)
    y = torch.sin(x.sum(-1) / 4)
    y = y.mean(-1) if x.dim() == 3 else y
    return x, y + 0.3 * torch.randn(y.shape, generator=gen)


def compute_loss(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = data
    return ((model(x) - y) ** 2).mean()


def autocast_loss(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """compute_loss with the forward under float16 autocast (mixed precision, with a GradScaler)."""
    with torch.autocast("cpu", dtype=torch.float16):
        return compute_loss(model, data)


def masked_loss(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A masking loss: which examples count is drawn from the global RNG before the model is called
    (as a masked-LM loss draws its mask)."""
    x, y = data
    keep = (torch.rand(x.shape[0]) > 0.3).float()
    return (((model(x) - y) ** 2) * keep).mean()


def train(
    model: nn.Module,
    steps: int,
    faults: dict[int, Fault] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    batch_size: int = 32,
    bad_batch: tuple[int, float] | None = None,
    **options: Any,
) -> Watcher:
    """Train `steps` SGD (or `optimizer`) steps under watch, faults planted on blocks by index;
    `bad_batch` (step, factor) multiplies that step's inputs (a fault a replay can reproduce)."""
    gen = torch.Generator().manual_seed(seed)
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=0.01)
    handles = [model.blocks[b].register_forward_hook(f) for b, f in (faults or {}).items()]
    options.setdefault("report", None)
    try:
        with watch(model, opt, **options) as w:
            for step in range(steps):
                for f in (faults or {}).values():
                    f.step = step
                data = batch(gen, model, batch_size)
                if bad_batch is not None and step == bad_batch[0]:
                    data = (data[0] * bad_batch[1], data[1])
                loss = compute_loss(model, data)
                w.loss(loss, batch=data)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for h in handles:
            h.remove()
    return w


def report_of(w: Watcher) -> Report:
    assert w.report is not None
    return w.report


def squared_steps(
    model: nn.Module, opt: torch.optim.Optimizer, w: Watcher, steps: int, shape: tuple[int, ...]
) -> None:
    """`steps` SGD steps under `w` of the mean squared output on fresh normal inputs of `shape`."""
    for _ in range(steps):
        loss = model(torch.randn(*shape)).square().mean()
        w.loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
