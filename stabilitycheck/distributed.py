"""Full-model norms under torch.distributed (DDP, FSDP2 `fully_shard`) from squared local norms.

Each rank stores squared norms of what it holds; a parameter's square is pre-divided by the number of
ranks holding the same values (all of them for a DDP replica, the Replicate mesh dimensions of a
DTensor), so summing over ranks counts every value once whatever its mesh. One `all_gather` per
flush brings every rank's rows to every rank; the rows are combined on the host, which also names the
lowest rank that held a non-finite value. Block outputs are per-rank data (each rank its own batch):
their squares add up. Their gradients are dL_rank/d(output), where the full-batch loss is the mean
of the ranks' losses (how DDP and FSDP average gradients), so their squares add up divided by W^2.
A `.to_local()` norm of a sharded gradient is never reported as the model's norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stabilitycheck.errors import UsageError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (FSDP2, tensor parallel): its norms need its local values."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The values this rank holds and how many ranks hold the same values (its replication)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if isinstance(tensor, DTensor):
        copies = 1
        for dim, placement in enumerate(tensor.placements):
            if isinstance(placement, Partial):
                raise UsageError(
                    "watch: a parameter or gradient is a Partial DTensor (its local values are partial "
                    "sums, whose norms do not add up); reduce it (e.g. .redistribute()) before the step"
                )
            if isinstance(placement, Replicate):
                copies *= tensor.device_mesh.size(dim)
        return tensor.to_local(), copies
    return tensor, world()[1]


@dataclass(frozen=True)
class Layout:
    """One row per rank and step: loss | forward^2 | output-grad^2 per block | weight-grad^2 |
    weight^2 per block plus one slot for parameters outside the blocks. Series (what the rule sees):
    the same with square roots taken, the ranks combined, and the total gradient norm appended."""

    n_blocks: int
    head: bool = False  # the parameters outside the blocks are a head's (watching._a_head): see causal_order

    @property
    def width(self) -> int:
        return 1 + 4 * self.n_blocks + 2

    @property
    def n_series(self) -> int:
        return self.width + 1

    def parts(self) -> dict[str, slice]:
        b = self.n_blocks
        return {
            "loss": slice(0, 1),
            "activation": slice(1, 1 + b),
            "activation_grad": slice(1 + b, 1 + 2 * b),
            "gradient": slice(1 + 2 * b, 2 + 3 * b),
            "weight": slice(2 + 3 * b, 3 + 4 * b),
            "grad_norm": slice(3 + 4 * b, 4 + 4 * b),
        }

    def noisier(self) -> list[slice]:
        """The series a step of fewer samples leaves unjudged (spikes.noisier): the loss and the weight
        gradients, per block and in total."""
        p = self.parts()
        return [p["loss"], p["gradient"], p["grad_norm"]]

    def logged(self) -> list[bool | None]:
        """Per series, whether the spike rule judges it on its logarithm: every norm (positive, its
        noise a factor); the loss as its first value says (SpikeRule.state: a loss may be negative)."""
        return [True if i >= self.parts()["loss"].stop else None for i in range(self.n_series)]

    def scaled(self) -> list[bool]:
        """Per series, whether a GradScaler's loss scale multiplies it (the gradients: output
        gradients, weight gradients, the total): on a step the scaler skips, their Inf is its overflow
        handling, while the loss, block outputs and weights are the model's own values."""
        p = self.parts()
        mask = [False] * self.n_series
        for kind in ("activation_grad", "gradient", "grad_norm"):
            mask[p[kind]] = [True] * (p[kind].stop - p[kind].start)
        return mask

    def causal_order(self, calls: Sequence[int] | None = None) -> list[int]:
        """Series indices in the order their values come to be within a step: weights (from the last
        update), block outputs input side first, the loss, then output side first each block's output
        gradient and its weight gradient (both before the block's input gets its gradient: weight
        gradients listed input side first after every output gradient named block 2 first where the
        backward made block 4's Inf first), then those of parameters outside the
        blocks, the total gradient norm. A head's (`head`) come right after the loss, where the
        backward makes them (an LM head's Inf named the blocks' after it); the rest, an
        embedding's or of parameters on both sides, after the blocks'. `calls`: the blocks in the
        order the forward calls them, where that is not their order (two lists called in turn)."""
        p = self.parts()
        span = {k: list(range(s.start, s.stop)) for k, s in p.items()}
        calls = list(calls) if calls is not None else list(range(self.n_blocks))
        outside = span["gradient"][self.n_blocks :]
        activations = [span["activation"][b] for b in calls]
        order = span["weight"] + activations + span["loss"] + (outside if self.head else [])
        for b in reversed(calls):
            order += [span["activation_grad"][b], span["gradient"][b]]
        return order + ([] if self.head else outside) + span["grad_norm"]


def to_series(rows: torch.Tensor, layout: Layout, passed: torch.Tensor | None = None) -> torch.Tensor:
    """Rows (..., W, width) of squared local norms to series (..., n_series) of full-model values; the
    loss is the mean over the ranks that passed one (`passed` (..., W), 1.0 where a rank did; all
    ranks when None): a rank logging nothing adds no zero to it."""
    p = layout.parts()
    w = rows.shape[-2]
    summed = rows.sum(-2)
    out = torch.empty((*summed.shape[:-1], layout.n_series), dtype=rows.dtype, device=rows.device)
    losses = rows[..., p["loss"]]
    if passed is None:
        out[..., p["loss"]] = losses.sum(-2) / w
    else:
        n = passed.sum(-1, keepdim=True).clamp(min=1)
        out[..., p["loss"]] = torch.where(passed.unsqueeze(-1) != 0, losses, 0.0).sum(-2) / n
    squares = summed[..., 1:]
    squares[..., p["activation_grad"].start - 1 : p["activation_grad"].stop - 1] /= w * w
    out[..., 1 : layout.width] = squares.sqrt()
    out[..., p["grad_norm"]] = summed[..., p["gradient"]].sum(-1, keepdim=True).sqrt()
    return out


def gather(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's `rows` stacked (W, ...): one all_gather; the tensor itself outside distributed."""
    _, size = world()
    if size == 1:
        return rows.unsqueeze(0)
    out = torch.empty((size * rows.shape[0], *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    collective = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in 2.13
    collective(out, rows.contiguous())
    return out.view(size, *rows.shape)


def nonfinite_rank(rows: list[list[float]], layout: Layout, series: int) -> int | None:
    """The lowest rank whose local entry of a series is non-finite (rows: one list per rank)."""
    if series >= layout.width:  # the total grad norm: any rank with a non-finite weight gradient
        cols = list(range(layout.parts()["gradient"].start, layout.parts()["gradient"].stop))
    else:
        cols = [series]
    for rank, row in enumerate(rows):
        if any(not math.isfinite(row[c]) for c in cols):
            return rank
    return None


def full_grad_norm(parameters: list[torch.Tensor]) -> float:
    """The whole model's gradient L2 norm from squared local norms and one all_reduce (a host read)."""
    squares = []
    for p in parameters:
        if p.grad is not None:
            values, copies = local(p.grad)
            squares.append(values.double().pow(2).sum() / copies)
    total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
    if world()[1] > 1:
        dist.all_reduce(total)
    return float(total.sqrt())
