"""The one "which loss" (DESIGN.md): cross-entropy against fixed random labels, never the mean of
squared outputs, whose gradient is aligned with the forward signal and reads as a false explosion;
and how a model is called on its inputs and its loss taken."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from stabilitycheck.errors import UsageError

Inputs = Any  # a tensor, or nested tuples/lists/dicts of tensors (and None, scalars)
LossFn = Callable[[Any, Inputs], torch.Tensor]

NUM_CLASSES = 10
READOUT_STREAM = 1  # the default loss's readout is drawn from generator(seed + this), its labels from seed


def generator(seed: int) -> torch.Generator:
    """A CPU generator: every random number of a build comes from it, so builds replay exactly."""
    return torch.Generator().manual_seed(seed)


def accumulate(output: torch.Tensor) -> torch.Tensor:
    """The output in the dtype a loss is computed in: float64 stays, anything else goes to float32."""
    return output.to(torch.float64 if output.dtype == torch.float64 else torch.float32)


def readout_loss(features: int, gen: torch.Generator, labels: torch.Tensor) -> LossFn:
    """Cross-entropy of a fixed random readout (N(0, 1/features), not trained) against fixed labels.

    At init its output gradient is nearly independent of the forward pass, so per-layer gains
    match mean-field theory (the mean of squared outputs would not; see DESIGN.md "Which loss").
    """
    weight = _readout(features, gen)
    cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def loss(output: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        out = accumulate(output)
        key = (out.device, out.dtype)
        if key not in cache:
            cache[key] = (weight.to(out.device, out.dtype), labels.to(out.device))
        return _read_out(out, *cache[key])

    return loss


def _readout(features: int, gen: torch.Generator) -> torch.Tensor:
    """A fixed random readout from `features` to NUM_CLASSES, N(0, 1/features), in float64."""
    weight: torch.Tensor = torch.randn(NUM_CLASSES, features, generator=gen, dtype=torch.float64)
    return weight / math.sqrt(features)


def _read_out(out: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the readout `weight` of `out`'s last dimension against `labels`."""
    return F.cross_entropy((out @ weight.T).reshape(-1, NUM_CLASSES), labels.reshape(-1))


def _entries(output: object, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in nested tuples/lists/dicts, depth first: "[1]['out']"."""
    if isinstance(output, torch.Tensor):
        return [(path, output)]
    if isinstance(output, tuple | list):
        items: Any = ((f"[{i}]", v) for i, v in enumerate(output))
    elif isinstance(output, Mapping):
        items = ((f"[{k!r}]", v) for k, v in output.items())
    else:
        return []
    return [entry for sub, v in items for entry in _entries(v, path + sub)]


def unpack(output: object) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
    """(output tensor, model-computed loss, note) of a model output: a tensor, tuple/list, dict,
    namedtuple or object (Hugging Face style: its `loss`, else its `logits`, by name in a namedtuple
    too: torchvision's InceptionOutputs). Without `logits` the tensor is the
    first floating one with a dimension (a 0-d auxiliary loss is no output; nor is the largest, which
    may be a hidden state beside the logits; nor integer predictions beside the logits, which carry no
    gradient: `(preds, logits)` was refused as an int64 output), else the first with a dimension, else
    the first; `note` names it when the output held several."""
    if isinstance(output, torch.Tensor):
        return output, None, ""
    fields = output if isinstance(output, Mapping) else None
    if isinstance(output, tuple) and hasattr(output, "_asdict"):  # a namedtuple: its fields by name
        fields = output._asdict()
    elif fields is None and not isinstance(output, tuple | list) and hasattr(output, "__dict__"):
        fields = vars(output)
    # a namedtuple's entries by position: `output[1]` indexes it, `output['logits']` would not
    found = _entries(dict(fields) if fields is not None and not isinstance(output, tuple) else output)
    loss, logits = (fields.get("loss"), fields.get("logits")) if fields is not None else (None, None)
    loss = loss if isinstance(loss, torch.Tensor) else None
    if isinstance(logits, torch.Tensor) and logits.dim() >= 1:
        return logits, loss, ""
    shaped = [(path, t) for path, t in found if t.dim() >= 1]
    shaped = [(path, t) for path, t in shaped if t.is_floating_point()] or shaped or found[:1]
    if not shaped:
        return None, loss, ""
    path, tensor = shaped[0]
    others = [p for p, _ in found]
    note = (
        f"loss on output{path} (of {len(found)} tensors {', '.join(others[:4])}{'...' * (len(found) > 4)}: "
        "the first with a dimension, floating ones first; a `logits` entry would be used first)"
    )
    return tensor, loss, note if len(found) > 1 and loss is None else ""


class DefaultLoss:
    """Cross-entropy of a fixed random readout of the output's last dimension (NUM_CLASSES classes,
    N(0, 1/features), not trained) against fixed random labels when it has >= 2 entries, else MSE to
    fixed random targets: bounded below and nearly independent of the forward signal. Cross-entropy
    on the output itself followed it: on a ReLU stack its softmax sharpens onto the largest outputs
    as they grow, and the growth read 1.6-2.1x the network's (width 512 depth 64, width 64 depth 32:
    a verdict 5-6 blocks before mean field's), where the readout reads 1.0-1.35x."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.cache: dict[tuple[object, ...], torch.Tensor] = {}

    def target(self, kind: str, shape: tuple[int, ...], classes: int, out: torch.Tensor) -> torch.Tensor:
        """Labels, targets or the readout for this shape, drawn once from the seed (the same for any
        call order; the readout from a stream of its own)."""
        key = (kind, shape, classes, out.device, out.dtype)
        if key not in self.cache:
            if kind == "ce":
                drawn = torch.randint(0, classes, shape, generator=generator(self.seed))
            elif kind == "readout":
                drawn = _readout(shape[-1], generator(self.seed + READOUT_STREAM)).to(out.dtype)
            else:
                drawn = torch.randn(shape, generator=generator(self.seed), dtype=torch.float64).to(out.dtype)
            self.cache[key] = drawn.to(out.device)
        return self.cache[key]

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        out = accumulate(output)
        if out.dim() >= 1 and out.shape[-1] >= 2:
            weight = self.target("readout", (NUM_CLASSES, out.shape[-1]), 0, out)
            labels = self.target("ce", tuple(out.shape[:-1]), NUM_CLASSES, out)
            return _read_out(out, weight, labels)
        return F.mse_loss(out, self.target("mse", tuple(out.shape), 0, out))


class OutputLoss:
    """The default loss applied to a model's unpacked output (its own `loss` when it computes one).
    `note` says which tensor it used when the output held several (a line for the report); `guard`
    calls the default loss (a model file's, to turn an exception into a one-line error)."""

    def __init__(self, default: DefaultLoss, what: str, guard: Callable[..., Any] | None = None) -> None:
        self.default, self.what, self.guard, self.note = default, what, guard, ""

    def __call__(self, output: Any, inputs: Inputs) -> torch.Tensor:
        tensor, model_loss, self.note = unpack(output)
        if model_loss is not None:
            return model_loss
        if tensor is None:
            raise UsageError(
                f"{self.what}: the model's output is a {type(output).__name__} with no tensor in it; return "
                "a tensor (e.g. logits), a tuple/dict holding one, or define `def loss(output, inputs)`"
            )
        if not (tensor.is_floating_point() or tensor.is_complex()):  # read as a detached output before
            raise UsageError(
                f"{self.what}: the model's output has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                "which carries no gradient; return the float tensor it is made from (the logits before "
                ".long() or .argmax()), or define `def loss(output, inputs)`"
            )
        if self.guard is None:
            return self.default(tensor)
        loss: torch.Tensor = self.guard("the default loss", self.default, tensor)
        return loss


__all__ = ["NUM_CLASSES", "DefaultLoss", "Inputs", "LossFn", "OutputLoss", "nn", "readout_loss", "unpack"]


def differentiable_loss(loss: Any) -> torch.Tensor:
    """`loss` if it is a scalar float tensor that requires grad; else a one-line UsageError saying why."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        got = (
            f"a tensor of dtype {str(loss.dtype).removeprefix('torch.')} and shape {tuple(loss.shape)}"
            if isinstance(loss, torch.Tensor)
            else type(loss).__name__
        )
        raise UsageError(f"the loss must be a scalar float tensor, got {got}; return e.g. out.mean()")
    if not loss.requires_grad:
        raise UsageError(
            "the loss does not require grad: it is not differentiable with respect to the "
            "model's parameters (was the output detached or computed under torch.no_grad()?)"
        )
    return loss


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """Call the model the way its inputs are packed: tensor, tuple/list (positional, a namedtuple's
    fields too) or dict. A PackedSequence, a namedtuple of one sequence's parts, is one input
    (spread, it made 4 arguments)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list) and not isinstance(inputs, nn.utils.rnn.PackedSequence):
        return model(*inputs)
    return model(inputs)


def seeded_loss(model: nn.Module, inputs: Inputs, loss_fn: LossFn, seed: int) -> torch.Tensor:
    """The loss of one forward with torch's CPU generator seeded (the caller's state given back): the
    same dropout masks at every call, so two calls differ only in what the caller changed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return differentiable_loss(loss_fn(call_model(model, inputs), inputs))
