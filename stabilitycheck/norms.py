"""L2 norms as the probe and the watcher take them: finite for every finite tensor (but, in the watch
mode on CUDA, a float64 one's above 1.3e154: see `refine`) and within 5e-5 of the float64 norm
(float32 sums), many tensors in one fused call, and the values of a step brought to the host in one
read."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

EXACT = torch.float64


RANGED = (torch.float32, torch.bfloat16)  # dtypes whose squares can leave float32's range


def accumulator(dtype: torch.dtype, exact: bool, device: torch.device | None = None) -> torch.dtype:
    """The dtype norms of `dtype` tensors are computed in: float64 when exact, for float64 tensors and,
    on CUDA, for RANGED ones (its fused norm sums in the output dtype, memory-bound: at float32's
    cost); else float32, where `refine` takes again the few norms that float32 squares spoiled."""
    wide = device is not None and device.type == "cuda" and dtype in RANGED
    return EXACT if exact or wide or dtype == torch.float64 else torch.float32


LOW = 2.0**-60  # x sqrt(numel): a float32 sum of squares above its square lost < 2^-30 to subnormals


def _spoiled(value: float, tensor: torch.Tensor) -> bool:
    """Whether a float32 norm `value` of `tensor` was spoiled by float32 squares: inf where the squares
    of finite values overflowed (a norm above 1.8e19), or below LOW * sqrt(numel), where subnormal
    squares cost precision (0.0 under 1e-19 or so)."""
    return value == math.inf or value < LOW * math.sqrt(tensor.numel())


WIDE_LOW = 2.0**-500  # the same for float64 squares of float64 values (subnormal below 2^-1022)


def _spoiled_wide(value: float, tensor: torch.Tensor) -> bool:
    """Whether a float64 norm `value` of a float64 `tensor` was spoiled by float64 squares: inf where
    they overflowed (a norm above 1.3e154), or below WIDE_LOW * sqrt(numel), where they went
    subnormal; float32 and narrower values square within float64's range."""
    return tensor.dtype == EXACT and (value == math.inf or value < WIDE_LOW * math.sqrt(tensor.numel()))


def _scaled_norms(tensors: Sequence[torch.Tensor]) -> list[float]:
    """The L2 norms of float64 `tensors` from their values divided by each one's largest magnitude,
    whose squares stay in range: finite for any finite tensor (0 for zeros, inf or NaN where the
    tensor holds one). The largest magnitudes in one host read: most such tensors are all zeros (a
    gradient that did not reach), which need no second pass."""
    tops = torch.stack(torch._foreach_norm(list(tensors), math.inf)).tolist()  # none is empty
    return [
        top * float(torch.linalg.vector_norm(t / top)) if 0.0 < top < math.inf else top
        for t, top in zip(tensors, tops, strict=True)
    ]


def _in_float32(tensor: torch.Tensor, norm: torch.Tensor) -> bool:
    """Whether `norm` of `tensor` was summed in float32 from float32 squares, which can spoil it."""
    return tensor.dtype in RANGED and norm.dtype != EXACT


def _checked(tensor: torch.Tensor, norm: torch.Tensor) -> bool:
    """Whether `refine` checks `norm` of `tensor`: a float32 sum (`_in_float32`, on the CPU alone), or
    a float64 tensor's on the CPU, where reading it costs nothing (on CUDA, a host read per step)."""
    return _in_float32(tensor, norm) or (tensor.dtype == EXACT and tensor.device.type == "cpu")


def refine(tensors: Sequence[torch.Tensor], norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """`norms` with each float32 norm of a RANGED tensor that is `_spoiled` taken again in float64, and
    each float64 tensor's on the CPU that is `_spoiled_wide` scaled by its largest value. One host
    read when there are such norms: on the CPU, where it costs nothing and a float64 sum is 10-40x
    slower than a float32 one (on CUDA the RANGED norms are float64 already, and a float64 tensor's
    above 1.3e154 stays inf: the watch mode reads it as non-finite, the probe as it is)."""
    summed = [i for i, (t, n) in enumerate(zip(tensors, norms, strict=True)) if _checked(t, n)]
    if summed:
        values = torch.stack([norms[i] for i in summed]).tolist()
        for i, value in zip(summed, values, strict=True):
            if _spoiled_wide(value, tensors[i]):
                norms[i] = torch.tensor(_scaled_norms([tensors[i]])[0], dtype=EXACT)
            elif tensors[i].dtype != EXACT and _spoiled(value, tensors[i]):
                norms[i] = torch.linalg.vector_norm(tensors[i], dtype=EXACT)
    return norms


CHUNK = 1 << 16  # elements: a larger float32 norm on the CPU is taken in pieces (`_pieces_norm`)


def _pieces_norm(tensor: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """The norm of a large CPU tensor from the norms of its CHUNK-element pieces. torch's float32 norm
    on the CPU accumulates each lane in order: 1e-5 relative error at 1M elements, 2e-3 at 33M; in
    pieces at most that of one piece, 1e-7 to 4e-7 on random data and 4.6e-5 for one value repeated
    (its equal squares round alike), at the same speed (float64 costs 30x). A tensor whose dimensions,
    put in memory order, are contiguous (a transposed weight, a channels_last activation) is taken as
    that view, never copied; another strided one is copied first."""
    strides = tensor.stride()
    order = sorted(range(tensor.dim()), key=lambda d: -strides[d])
    view = tensor.permute(order) if tensor.dim() > 1 else tensor
    flat = view.reshape(-1) if view.is_contiguous() else view.contiguous().view(-1)
    whole = flat.numel() // CHUNK * CHUNK
    parts = torch.linalg.vector_norm(flat[:whole].view(-1, CHUNK), dim=1, dtype=acc)
    if whole < flat.numel():
        parts = torch.cat([parts, torch.linalg.vector_norm(flat[whole:], dtype=acc).reshape(1)])
    whole_norm: torch.Tensor = torch.linalg.vector_norm(parts)
    return whole_norm


def _in_pieces(tensor: torch.Tensor, acc: torch.dtype) -> bool:
    return acc != EXACT and tensor.device.type == "cpu" and tensor.numel() > CHUNK


def norm(tensor: torch.Tensor) -> torch.Tensor:
    """The L2 norm of `tensor` (0-d, float32 or wider), finite for any finite tensor (as `refine`)."""
    acc = accumulator(tensor.dtype, False, tensor.device)
    value = (
        _pieces_norm(tensor, acc) if _in_pieces(tensor, acc) else torch.linalg.vector_norm(tensor, dtype=acc)
    )
    return refine([tensor], [value])[0]


def fused_norms(tensors: list[torch.Tensor], exact: bool) -> list[torch.Tensor]:
    """The L2 norm of each tensor as a 0-d tensor, finite for any finite tensor (`accumulated`, then
    `refine`)."""
    return refine(tensors, accumulated(tensors, exact))


def accumulated(tensors: list[torch.Tensor], exact: bool) -> list[torch.Tensor]:
    """The L2 norm of each tensor as a 0-d tensor in its accumulator dtype, float32 ones maybe spoiled:
    one fused call per accumulator dtype, so one call in all when the tensors share a dtype, as they
    do in most models (then taken at once: the per-tensor checks cost a third of the call on a
    2-block model); a large CPU tensor in float32 alone, in pieces (`_pieces_norm`)."""
    if not tensors:
        return []
    device, dtype = tensors[0].device, tensors[0].dtype
    acc = accumulator(dtype, exact, device)
    if all(t.dtype == dtype for t in tensors) and not _in_pieces(max(tensors, key=torch.Tensor.numel), acc):
        return list(torch._foreach_norm(tensors, 2, dtype=acc))
    acc_of = {d: accumulator(d, exact, device) for d in {t.dtype for t in tensors}}
    out = list(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        acc = acc_of[t.dtype]
        if _in_pieces(t, acc):
            out[i] = _pieces_norm(t, acc)
        else:
            groups.setdefault(acc, []).append(i)
    for acc, idx in groups.items():
        for i, value in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2, dtype=acc), strict=True):
            out[i] = value
    return out


def narrow(tensors: Sequence[torch.Tensor], norms: Sequence[torch.Tensor]) -> bool:
    """Whether a norm of `tensors` is one `refine` checks (summed in float32 from float32 squares, on
    the CPU; on CUDA they are summed in float64; or a float64 tensor's on the CPU): the ones `clean`
    must vouch for."""
    return any(_checked(t, n) for t, n in zip(tensors, norms, strict=True))


def clean(values: Sequence[float], largest: int) -> bool:
    """Whether no float32 norm among `values` can be spoiled (`_spoiled`), `largest` the most elements
    of a tensor they are norms of: all finite and none below LOW * sqrt(largest); else they are
    checked one by one."""
    return math.isfinite(sum(values)) and min(values, default=math.inf) >= LOW * math.sqrt(largest)


def dense(grad: torch.Tensor) -> torch.Tensor:
    """A tensor with the same L2 norm as `grad`: its values when sparse (nn.Embedding(sparse=True)),
    coalesced so repeated indices add up as in the dense gradient; else `grad` itself."""
    return grad.coalesce().values() if grad.is_sparse else grad


STACK_MIN, STACK_NUMEL = 64, 1 << 13  # >= 64 tensors of one shape, <= 8K elements each: stacked


def norm_values(
    tensors: Sequence[torch.Tensor],
    exact: bool,
    head: Sequence[torch.Tensor] = (),
    groups: Sequence[Sequence[int]] = (),
) -> list[float]:
    """The 0-d tensors `head`, then the L2 norm of each tensor, as Python floats from one host read.
    Each of `groups` (indices of tensors likely of one shape: a recurrent cell's per-token outputs)
    with STACK_MIN or more small tensors is normed as one stack (`_foreach_norm` on the CPU costs
    ~5 us a tensor); the rest in one fused call per accumulator dtype. A float32 norm spoiled by
    float32 squares (see `_spoiled`) is taken again in float64, a float64 tensor's spoiled by float64
    squares (`_spoiled_wide`) scaled by its largest value (`_scaled_norms`)."""
    device = tensors[0].device if tensors else None
    pieces: list[torch.Tensor] = [torch.stack(list(head))] if head else []  # cat widens dtypes exactly
    order: list[int] = []
    largest = 1  # elements of the largest tensor
    for idx in groups:
        if len(idx) < STACK_MIN or tensors[idx[0]].numel() > STACK_NUMEL:
            continue
        try:
            block = torch.stack([tensors[i] for i in idx])  # exact: mixed float dtypes widen
        except RuntimeError:  # shapes differ
            continue
        acc = accumulator(block.dtype, exact, device)
        dims = tuple(range(1, block.dim()))
        pieces.append(torch.linalg.vector_norm(block, dim=dims, dtype=acc).reshape(-1))
        order += idx
        largest = max(largest, block[0].numel())
    done = set(order)
    rest = [i for i in range(len(tensors)) if i not in done]
    if rest:
        pieces.append(torch.stack(accumulated([tensors[i] for i in rest], exact)))
        order += rest
        largest = max([largest, *(tensors[i].numel() for i in rest)])
    flat: list[float] = (  # the one host synchronisation
        (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).tolist() if pieces else []
    )
    out = [0.0] * len(tensors)
    for i, value in zip(order, flat[len(head) :], strict=True):
        out[i] = value
    spoilable = [] if clean(out, largest) else tensors  # rare: a second read per spoiled norm
    wide = []
    for i, t in enumerate(spoilable):
        if t.dtype in RANGED and accumulator(t.dtype, exact, device) != EXACT and _spoiled(out[i], t):
            out[i] = float(torch.linalg.vector_norm(t, dtype=EXACT))
        elif _spoiled_wide(out[i], t):
            wide.append(i)
    for i, value in zip(wide, _scaled_norms([tensors[i] for i in wide]) if wide else [], strict=True):
        out[i] = value
    return flat[: len(head)] + out
