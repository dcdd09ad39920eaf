"""A model file's inputs: checked (nested tensors), moved to the device, resized along SEQ_DIM, or
inferred from the first layer when the file gives none."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from stabilitycheck._tree import invalid_leaf, tensors, tree_map
from stabilitycheck._validation import article
from stabilitycheck.losses import Inputs, generator
from stabilitycheck.modelfile.importer import ModelFileError
from stabilitycheck.tokens import token_ids

EXAMPLE = "e.g. `return torch.randn(batch_size, 16)` or `return (tokens, model.init_hidden(batch_size))`"


def check_inputs(given: str, label: str, inputs: object) -> Inputs:
    """A tensor, or nested tuples/lists/dicts holding at least one tensor (None and scalars beside)."""
    bad = invalid_leaf(inputs)
    if bad is not None or not tensors(inputs):
        what = f"holds {article(bad)}" if bad is not None and bad is not inputs else f"is {article(inputs)}"
        raise ModelFileError(
            f"{given}: {label} {what}, not tensors; expected a tensor or nested tuples/lists/dicts "
            f"(str keys) of tensors, None and scalars, {EXAMPLE}"
        )
    empty = [t for t in tensors(inputs) if t.numel() == 0]
    if empty:
        raise ModelFileError(
            f"{given}: {label} holds an empty tensor (shape {tuple(empty[0].shape)}): an empty batch has "
            f"no gradient to measure; give every tensor at least one entry (check batch_size >= 1), {EXAMPLE}"
        )
    return dict(inputs) if isinstance(inputs, Mapping) else inputs  # model(**inputs) takes a plain dict


def move(inputs: Inputs, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Inputs on `device`, floating tensors cast to `dtype`, each a fresh tensor (never the user's)."""

    def one(x: torch.Tensor) -> torch.Tensor:
        moved = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device=device)
        return moved.clone() if moved is x else moved

    return tree_map(one, inputs)


def _resize(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """`x` cut to `n` entries along `dim`, or tiled end to end and then cut to lengthen it."""
    length = x.shape[dim]
    if n > length:
        x = torch.cat([x] * -(-n // length), dim=dim)
    return x.narrow(dim, 0, n)


def resize(inputs: Inputs, dim: int, n: int) -> Inputs:
    """Resize every tensor whose size along `dim` is the first tensor's to `n` (ids and mask alike)."""
    base = tensors(inputs)[0].shape[dim]

    def one(x: torch.Tensor) -> torch.Tensor:
        return _resize(x, dim, n) if x.dim() > dim and x.shape[dim] == base else x

    return tree_map(one, inputs)


def infer(given: str, model: nn.Module, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """Inputs for a model without batch() or example_input, read off its first layer."""
    if next(model.parameters(), None) is None:  # not 'its first layer is not nn.Linear': it has none
        raise ModelFileError(
            f"{given}: the model it built has no parameters, so there is nothing to measure (an empty "
            "model: a knob such as depth at 0 or below?); give knob values it builds layers at"
        )
    gen = generator(seed)
    first: nn.Module | None = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return torch.randn(batch_size, module.in_features, generator=gen)
        if isinstance(module, nn.Embedding):
            return token_ids(module.num_embeddings, [module.padding_idx], (batch_size, seq_len), gen)
        if not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
            first = module
            break
    sizes = _sizes_taken(first) if first is not None else None
    example = f"torch.randn(batch_size, {', '.join(map(str, sizes or [16]))})"
    named = f" ({type(first).__name__})" if first is not None else ""
    raise ModelFileError(
        f"{given}: has no batch() and its first layer{named} is not nn.Linear or nn.Embedding, so the inputs "
        f"cannot be inferred; add e.g. `def batch(model, batch_size=8): return {example}`"
    )


SPATIAL = {nn.BatchNorm2d: [32, 32], nn.BatchNorm3d: [16, 16, 16], nn.GroupNorm: [32, 32]}  # 1d: none


def _sizes_taken(first: nn.Module) -> list[int] | None:
    """An input's sizes after the batch for a first layer that is no nn.Linear or nn.Embedding: a conv's
    channels, then its spatial sizes (a lazy conv's channels are 0 until its first call: 3; each size
    at least its kernel's reach); a norm's features, then spatial sizes for its kind (a LayerNorm's
    normalized shape); None where the layer does not tell."""
    if isinstance(first, nn.modules.conv._ConvNd):
        reach = [d * (k - 1) + 1 for d, k in zip(first.dilation, first.kernel_size, strict=True)]
        return [first.in_channels or 3] + [max(32, r) for r in reach]
    if isinstance(first, nn.LayerNorm):
        return list(first.normalized_shape)
    if isinstance(first, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        features = first.num_channels if isinstance(first, nn.GroupNorm) else first.num_features
        kind = getattr(first, "cls_to_become", None) or type(first)  # a lazy norm's is set on its call
        spatial = next((v for k, v in SPATIAL.items() if issubclass(kind, k)), [])
        return [features or 3, *spatial]
    return None
