"""Draw docs/watch-heatmap.png: a pre-norm transformer from the zoo trained 240 steps under
stabilitycheck.watch(skip=True) with a fused SGD; block 2's output is multiplied by 50 at step 150
and block 4's is NaN at step 200; both steps are skipped on the device. Run
`python ci/watch_heatmap.py [PATH]`; it prints the watcher's report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from stabilitycheck.config import Config
from stabilitycheck.losses import call_model
from stabilitycheck.subjects import resolve
from stabilitycheck.watching import watch

STEPS, SPIKE, NAN = 240, (150, 2), (200, 4)


def main(path: Path) -> None:
    torch.manual_seed(0)
    config = Config.of("transformer", depth=6, width=32, seq_len=16, norm="pre", batch_size=8)
    built = resolve(config.subject).build(config)
    model, inputs, loss_fn = built.model, built.inputs, built.loss_fn
    opt = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)
    step = 0

    def spike(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        return output * 50 if step == SPIKE[0] else None

    def nan(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        return output * torch.nan if step == NAN[0] else None

    built.blocks[SPIKE[1]][1].register_forward_hook(spike)
    built.blocks[NAN[1]][1].register_forward_hook(nan)
    with watch(model, opt, blocks=built.blocks, heatmap=path, report=sys.stdout, skip=True) as w:
        for step in range(STEPS):  # noqa: B007 (the hook reads `step`)
            noisy = inputs + 0.1 * torch.randn_like(inputs)
            loss = loss_fn(call_model(model, noisy), noisy)
            w.loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "docs" / "watch-heatmap.png")
