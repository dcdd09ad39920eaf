"""Re-run the flagged step a `watch` bundle saved, and compare the norms it measures now with those
measured during training (the command is cli_replay's: `stabilitycheck replay BUNDLE`)."""

from __future__ import annotations

import json
import math
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stabilitycheck._validation import describe
from stabilitycheck.errors import UsageError

RTOL = 1e-6


@dataclass(frozen=True)
class Replayed:
    """The norms measured during training and on replay, per series (kind, block)."""

    step: int
    names: list[tuple[str, str]]
    recorded: list[float]
    replayed: list[float]
    changed: tuple[str, ...] = ()  # code (compute_loss, the model's classes) edited since the bundle
    hooked: tuple[str, ...] = ()  # modules with hooks of the user's own in training, not saved
    clip: float | None = None  # the max_norm the replay clipped to, as the bundle says the loop did

    def mismatches(self, rtol: float = RTOL) -> list[int]:
        """Series where the two differ by more than rtol (relative), or differ in finiteness."""
        bad = []
        for i, (a, b) in enumerate(zip(self.recorded, self.replayed, strict=True)):
            if math.isfinite(a) and math.isfinite(b):
                if abs(a - b) > rtol * max(abs(a), abs(b)):
                    bad.append(i)
            elif not (a == b or (math.isnan(a) and math.isnan(b))):
                bad.append(i)
        return bad

    def gradient_factor(self, rtol: float = RTOL) -> float | None:
        """Where the weight gradients alone differ, and each by one factor below 1 (to 1e-5): that
        factor, as gradient-norm clipping after backward leaves them (a loop calling clip_grad_norm_
        before its step, not told to watch); else None."""
        bad = self.mismatches(rtol)
        weights_alone = all(self.names[i][0] in ("gradient", "grad_norm") for i in bad)
        if self.clip is not None or not bad or not weights_alone:
            return None
        ratios = [self.recorded[i] / self.replayed[i] for i in bad if self.replayed[i] > 0]
        if len(ratios) < len(bad) or not all(math.isfinite(r) for r in ratios):
            return None
        low, high = min(ratios), max(ratios)
        return low if high < 1 and high - low <= 1e-5 * high else None

    def over_the_clip(self) -> float | None:
        """The recorded total gradient norm where it is above the clip the bundle says the loop clipped
        to, by more than 1% (bfloat16 gradients clipped to 1.0 read up to 1.0049): the loop did not clip
        to it (clip_grad_norm= given to watch for a loop that does not clip), so the replay that
        clipped differs; else None."""
        total = self.names.index(("grad_norm", "(all)")) if ("grad_norm", "(all)") in self.names else None
        if self.clip is None or total is None:
            return None
        recorded = self.recorded[total]
        return recorded if math.isfinite(recorded) and recorded > self.clip * 1.01 else None

    def largest_difference(self) -> float:
        """The largest relative difference between a recorded norm and its replay, over the pairs
        that are both finite and not both 0."""
        return max(
            (
                abs(a - b) / max(abs(a), abs(b))
                for a, b in zip(self.recorded, self.replayed, strict=True)
                if math.isfinite(a) and math.isfinite(b) and max(abs(a), abs(b)) > 0
            ),
            default=0.0,
        )


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from stabilitycheck.watchstate import FORMAT, OLDER

    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(
            f"replay {path}: not a watch bundle directory (meta.json: {describe(exc)}); give the directory "
            "watch(..., bundle=DIR) wrote"
        ) from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT and found not in OLDER:
        raise UsageError(f"replay {path}: unknown bundle format {found!r}, expected {FORMAT!r}")
    _check_meta(path, meta)
    if not meta.get("has_batch"):
        raise UsageError(
            f"replay {path}: the bundle lacks a batch; pass batch= to w.loss() for every micro-batch"
        )
    for root in meta["import_roots"]:
        if root not in sys.path:
            sys.path.insert(0, root)
    location = None if torch.cuda.is_available() else "cpu"
    try:
        data = torch.load(path / "data.pt", map_location=location, weights_only=False)
    except (OSError, ImportError, AttributeError, RuntimeError) as exc:
        raise UsageError(
            f"replay {path}: cannot load data.pt ({describe(exc)}); the model class and "
            "compute_loss must be importable from the roots in meta.json"
        ) from None
    except (ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise UsageError(
            f"replay {path}: data.pt is not as watch wrote it ({describe(exc)}); write the "
            "bundle again with watch(..., bundle=...)"
        ) from None
    return meta, data


def _is_list(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """A one-line UsageError naming the first field of meta.json that is missing or of a wrong type."""
    step = meta.get("step")
    valid = {
        "step (an integer)": isinstance(step, int) and not isinstance(step, bool) and step >= 0,
        "blocks (a list of names)": _is_list(meta.get("blocks"), str),
        "values (a list of numbers, null for NaN)": _is_list(meta.get("values"), (int, float, type(None))),
        "import_roots (a list of paths)": _is_list(meta.get("import_roots"), str),
        "sizes (element counts by slot)": isinstance(sizes := meta.get("sizes", {}), dict)
        and all(k.isdigit() and isinstance(v, int) and not isinstance(v, bool) for k, v in sizes.items()),
        "clip_grad_norm (null or a number > 0)": (clip := meta.get("clip_grad_norm")) is None
        or (isinstance(clip, int | float) and not isinstance(clip, bool) and clip > 0),
    }
    for field, ok in valid.items():
        if not ok:
            raise UsageError(f"replay {path}: meta.json lacks a valid {field}; it is not as watch wrote it")


def replay(path: Path | str) -> Replayed:
    """Restore the model state of the flagged step, then run its micro-batches once under a watcher,
    each from the RNG state its forward began with."""
    import torch

    from stabilitycheck.blocks import find_blocks
    from stabilitycheck.rng import set_rng_state
    from stabilitycheck.watching import Watcher
    from stabilitycheck.watchstate import sources

    meta, data = _read(Path(path))
    model = data["model"]
    tensors = [*model.parameters(), *model.buffers()]
    with torch.no_grad():
        for t, saved in zip(tensors, data["state"], strict=True):
            t.copy_(saved)
    for p in model.parameters():
        p.grad = None
    modules = dict(model.named_modules())
    # the user's blocks by module name; the watcher's own choice again (its layers group modules: a
    # Linear's layer '0' ends after the Tanh, and taken for a user's Linear '0' read 22.3 for 654.5)
    found = {} if meta.get("blocks_given") else dict(find_blocks(model)[0])
    missing = [name for name in meta["blocks"] if name not in modules and name not in found]
    if missing:
        raise UsageError(
            f"replay {path}: the model has no blocks named {missing}; the bundle was written for another "
            "model, or its blocks were renamed since: replay it with that model, or write the bundle again"
        )
    blocks = [(name, found.get(name) or modules[name]) for name in meta["blocks"]]
    n = len(data["batches"])  # a format-3 bundle has no modes nor scales: training mode, unscaled
    scaler = _scaler(model, data.get("scales", [None] * n))
    watcher = Watcher(model, None, blocks=blocks, report=None, flush_every=1, scaler=scaler)
    # the norms read at the element counts the run read them at (Capture.sizes; a bundle written
    # without them: the replayed step's own)
    watcher.capture.sizes = {int(slot): numel for slot, numel in meta.get("sizes", {}).items()}
    with watcher:
        micro = zip(
            data["batches"],
            data["losses"],
            data["rng"],
            data.get("modes", [None] * n),
            data.get("autocast", [None] * n),
            strict=True,
        )
        kind = tensors[0].device.type
        for batch, recorded, rng, modes, amp in micro:
            _set_modes(model, modes)
            # compute_loss from the state before it ('start'), the model's forward from its own
            start = rng.get("start") if rng is not None else None
            set_rng_state(start if start is not None else rng)
            hook = model.register_forward_pre_hook(_first_call(rng)) if start is not None else None
            try:  # under the autocast the loop opened around it (one inside compute_loss nests)
                with torch.autocast(kind, dtype=getattr(torch, amp or "float32"), enabled=amp is not None):
                    loss = _as_passed(data["compute_loss"](model, batch), recorded)
            finally:
                if hook is not None:
                    hook.remove()
            watcher.loss(loss)
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:  # the weight gradients unscaled in place, as scaler.step did before
            scaler.unscale_(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0))
        clip = meta.get("clip_grad_norm")
        if clip is not None:  # clipped as the loop clipped them before its step (norms read after it)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        watcher.before_step()
    names = watcher.out.names
    values = [math.nan if v is None else float(v) for v in meta["values"]]  # strict JSON: NaN is null
    if len(values) != len(names):
        raise UsageError(
            f"replay {path}: meta.json has {len(values)} values, the replayed step measures {len(names)}; "
            "the bundle was edited or is not from this model"
        )
    written = meta.get("sources") or {}
    now = sources(model, data["compute_loss"])
    changed = tuple(sorted(name for name, digest in written.items() if now.get(name, digest) != digest))
    hooked = tuple(meta.get("user_hooks", ()))
    return Replayed(meta["step"], names, values, watcher.out.last_values, changed, hooked, clip)


def _scaler(model: Any, scales: list[float | None]) -> Any:
    """A GradScaler at the loss scale the step ran with (None where it had none): the backward of
    the scaled loss rounds as the step's did (float16's gradients of the unscaled loss differed by
    up to 5.6e-5), and the watcher divides the scale out as it did then."""
    import torch

    scale = next((s for s in scales if s is not None), None)
    if scale is None:
        return None
    device = next(model.parameters()).device.type
    return torch.amp.GradScaler(device, init_scale=scale)


def _set_modes(model: Any, modes: list[bool] | None) -> None:
    """Each module's training mode as the micro-batch's forward ran it (a frozen BatchNorm kept in
    eval in a training run: model.train() replayed its batch statistics, 63.4 for 18.9); training
    throughout where none was seen (no model call before w.loss)."""
    modules = list(model.modules())
    if modes is None or len(modes) != len(modules):
        model.train()
        return
    for module, mode in zip(modules, modes, strict=True):
        module.training = mode


def _first_call(state: dict[str, Any] | None) -> Any:
    """A forward pre-hook setting `state` at the model's first call only (a micro-batch's forward)."""
    from stabilitycheck.rng import set_rng_state

    done: list[bool] = []

    def hook(module: Any, args: Any) -> None:
        if not done:
            done.append(True)
            set_rng_state(state)

    return hook


def _as_passed(loss: Any, passed: Any) -> Any:
    """compute_loss's `loss` scaled as training passed it to w.loss: divided by the number of
    micro-batches where their ratio is that whole number to 1e-6 (`loss / accumulation_steps`), so the
    gradients are those of the same division; else as it is, so a loss that differs shows as one."""
    ratio = float(loss.detach().double() / passed.double())
    whole = round(ratio) if math.isfinite(ratio) else 0
    if whole >= 2 and abs(ratio - whole) <= 1e-6 * ratio:
        return loss / whole
    return loss
