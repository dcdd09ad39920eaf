"""Faults planted in one place of a healthy model or its training step, and what names each: two
blocks amplifying alike, one block shrinking the gradient, a NaN the model's own code puts into a
block's keyword argument or a cell's state, a clip that drops the gradient it cannot clip. Oracle: the
construction (where the fault was planted)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stabilitycheck.culprit import culprit_of
from stabilitycheck.errors import StabilityError, UsageError
from stabilitycheck.invariants import assert_clipped_norm_bounded, assert_clipped_value_bounded
from stabilitycheck.probing import probe_module


class Scale(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `s` (a planted fault)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, s: float) -> torch.Tensor:
        ctx.s = s  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g * ctx.s, None  # type: ignore[attr-defined]


class Block(nn.Module):
    """tanh(W x) at the critical init (gain ~0.85-1 per block), its backward scaled by `s`."""

    def __init__(self, s: float = 1.0) -> None:
        super().__init__()
        self.lin, self.s = nn.Linear(32, 32, bias=False), s
        nn.init.normal_(self.lin.weight, std=32**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        return Scale.apply(h, self.s) if self.s != 1.0 else h  # type: ignore[no-any-return]


def _measured(planted: dict[int, float], seeds: int = 3) -> list:  # type: ignore[type-arg]
    out = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = nn.Sequential(*(Block(planted.get(i, 1.0)) for i in range(8)))
        x = torch.randn(8, 32)
        out.append(probe_module(model, x, lambda o, _: (o * torch.linspace(-1, 1, 32)).sum()))
    return out


def test_two_blocks_amplifying_alike_are_both_named() -> None:
    """x30 planted in blocks 1 and 6 (and 0 and 7): each stands out ln 30 over the stack's median in
    every seed; the larger alone was named, and a user fixing it kept the other fault."""
    assert culprit_of(_measured({1: 30.0, 6: 30.0})) == "1, 6"
    assert culprit_of(_measured({0: 30.0, 7: 30.0})) == "0, 7"


def test_a_block_shrinking_the_gradient_is_named_where_it_vanishes() -> None:
    """x1e-4 planted in block 5's backward: the growth vanishes (below 1) and block 5 is the one whose
    gain stands out below the rest in every seed; it read 'uniform, median gain x0.85'."""
    ms = _measured({5: 1e-4})
    assert all(m.growth < 1e-3 for m in ms)
    assert culprit_of(ms) == "5"


class Stack(nn.Module):
    """Six blocks called by keyword; the model's own code makes Inf/NaN before block 3."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, b in enumerate(self.layers):
            if i == 3:
                x = x / (x - x)
            x = b(x=x)
        return x


class Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w, self.u = nn.Linear(16, 16, bias=False), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.w(h) + self.u(x))


class Loop(nn.Module):
    """A cell stepped per token; the loop's own code puts a NaN into h after step 5."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = Cell()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 16)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            if t == 5:
                h = h + float("nan")
        return h


def test_a_nan_made_between_blocks_in_an_argument_other_than_the_first_is_outside_the_blocks() -> None:
    """Every block output before the named call is finite and a tensor the call takes is not: the
    model's code between the blocks made it. Only the first positional argument was looked at, so
    the healthy layers.3 (taking x by keyword) and cell[6] (taking h second) were named."""
    torch.manual_seed(0)
    nf = probe_module(Stack(), torch.randn(4, 32), lambda o, _: o.sum()).first_nonfinite
    assert nf is not None and nf.layer == "(outside blocks, before layers.3)", nf
    nf = probe_module(Loop(), torch.randn(4, 8, 16), lambda o, _: o.sum()).first_nonfinite
    assert nf is not None and nf.layer == "(outside blocks, before cell[6])", nf


def _grads_with_inf() -> tuple[nn.Sequential, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    model(torch.randn(3, 4)).sum().backward()
    params = list(model.parameters())
    params[2].grad[0, 0] = math.inf  # type: ignore[index]
    return model, [p.grad.detach().clone() for p in params if p.grad is not None]


@pytest.mark.parametrize("check", ["norm", "value"])
def test_a_clip_dropping_the_non_finite_gradient_fails(check: str) -> None:
    """A clip that sets p.grad = None for a non-finite gradient, then clips the rest: the blow-up is
    hidden and the parameter stops training. With `before`, the check passed (without it) or told the
    caller their `before` was wrong; it fails naming the dropped parameter. Oracle: the construction
    (the Inf planted in parameter 2, 1.weight)."""
    model, before = _grads_with_inf()
    params = list(model.parameters())
    for p in params:
        if p.grad is not None and not bool(p.grad.isfinite().all()):
            p.grad = None
    if check == "norm":
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
        with pytest.raises(StabilityError, match=r"removed the gradient of 1 parameter\(s\)") as err:
            assert_clipped_norm_bounded(model, 1.0, before=before)
    else:
        torch.nn.utils.clip_grad_value_([p for p in params if p.grad is not None], 0.1)
        with pytest.raises(StabilityError, match=r"removed the gradient of 1 parameter\(s\)") as err:
            assert_clipped_value_bounded(model, 0.1, before=before)
    assert "'1.weight'" in str(err.value) and "not finite" in str(err.value)  # parameter 2


def test_torchs_clip_on_the_same_gradients_is_not_called_a_drop() -> None:
    """The control: torch's clip keeps every gradient; with the Inf it fails as non-finite, not as a drop."""
    model, before = _grads_with_inf()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(StabilityError) as err:
        assert_clipped_norm_bounded(model, 1.0, before=before)
    assert "removed the gradient" not in str(err.value)


def test_sparse_gradients_are_a_one_line_usage_error() -> None:
    """nn.Embedding(sparse=True): the checks raised torch's multi-kilobyte NotImplementedError from
    isfinite() on a sparse tensor; torch's own clip_grad_norm_ cannot clip it either."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(UsageError, match=r"'0\.weight' is sparse") as err:
        assert_clipped_norm_bounded(model, 1.0)
    assert "\n" not in str(err.value)


class _WrappedStep:
    """A user's AMP step wrapping torch's GradScaler (composition, not a subclass), clipping before
    unscale_ (the fault)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.inner, self.params = torch.amp.GradScaler("cpu"), params
        self.get_scale = self.inner.get_scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.inner.scale(loss)

    def step(self, opt: torch.optim.Optimizer) -> object:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        return self.inner.step(opt)

    def update(self) -> None:
        self.inner.update()


def test_a_wrapped_scaler_backed_off_below_1_is_refused_not_passed() -> None:
    """16 trainable tensors: the 26 skipped steps take 2^16 to 2^-10, where the scaled gradients are
    smaller than the unscaled ones and the clip before unscale_ (plain gradient norm 0.35 < 1, scaled
    far above 1 at any scale over 3) never fires: it passed. A GradScaler is set back to 2^8; a scaler
    the check cannot set is refused, saying what scale to start at."""
    from stabilitycheck.invariants import assert_gradscaler_guards

    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(8) for m in (nn.Linear(8, 8), nn.Tanh())))
    x, z = torch.randn(4, 8), torch.randn(4, 8)

    def loss(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return (out * z).sum() * 0.05

    with pytest.raises(UsageError, match=r"scale is 0\.000976562 after the 26 skipped steps.*2\^34"):
        assert_gradscaler_guards(model, x, loss, _WrappedStep(list(model.parameters())))  # type: ignore[arg-type]


class _Recipe(torch.amp.GradScaler):
    """torch's AMP recipe with clipping in its step: unscale_ then the clip (correct), or the clip
    before unscale_ (the fault): clip_grad_norm_ at 1 over every gradient ("norm"), per tensor
    ("tensor"), or clip_grad_value_ at 0.05 ("value")."""

    def __init__(self, unscales: bool, kind: str) -> None:
        super().__init__("cpu")
        self.unscales, self.kind = unscales, kind

    def step(self, optimizer: torch.optim.Optimizer, *args: object, **kwargs: object) -> object:
        if self.unscales:
            self.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.kind == "norm":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        elif self.kind == "tensor":
            for p in params:
                torch.nn.utils.clip_grad_norm_(p, 0.5)
        else:
            torch.nn.utils.clip_grad_value_(params, 0.05)
        return super().step(optimizer, *args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["norm", "tensor", "value"])
@pytest.mark.parametrize("adam", [False, True])
def test_torchs_recipe_with_an_active_clip_passes_and_a_clip_before_unscale_fails(
    adam: bool, kind: str
) -> None:
    """A plain gradient of norm ~8.8 clipped at every step (by its norm, each tensor's, or by value):
    the correct recipe's clean step differs from an unclipped plain step by its own clip, and failed as
    'a scaler must unscale' (a planted-fault audit; the value and per-tensor clips, a review). It is the
    plain step on the gradients it stepped on, each a shrink of the unscaled one, and moves the
    weights and the optimizer's state alike at 16x the scale, so it passes; the clip before unscale_
    moves them by the scale's factor and still fails. Oracle: torch's recipe."""
    from stabilitycheck.invariants import assert_gradscaler_guards

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    x, z = torch.randn(4, 8), torch.randn(4, 8)

    def loss(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return (out * z).sum()

    loss(model(x), x).backward()
    assert float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)) > 5.0  # the clip is active
    model.zero_grad(set_to_none=True)
    opt = (lambda ps: torch.optim.Adam(ps, lr=1e-3)) if adam else None
    assert_gradscaler_guards(model, x, loss, _Recipe(True, kind), optimizer=opt)
    # a value clip of the scaled gradients also makes their Inf finite: the poisoned step is taken
    with pytest.raises(StabilityError, match=r"within 1% of it|state|stepped on a gradient holding"):
        assert_gradscaler_guards(model, x, loss, _Recipe(False, kind), optimizer=opt)


class _NaNBack(torch.autograd.Function):
    """Identity forward; a NaN backward (a planted fault)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> torch.Tensor:
        return g * math.nan


class _Poisoned(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NaNBack.apply(super().forward(x))  # type: ignore[no-any-return]


def test_bounded_growth_on_a_nan_names_it_and_its_block_not_the_first_layer() -> None:
    """Block 3's backward makes a NaN: every gain from there on is NaN, and the check named the first
    of them, layers.0, as the worst layer of a growth 'above the limit'. It says a value went non-finite
    and names block 3 (dL/d output of block 2 is made by the backward of block 3). Oracle: the
    construction."""
    from stabilitycheck.invariants import assert_bounded_growth

    torch.manual_seed(0)
    model = nn.Sequential(*(_Poisoned() if i == 3 else Block() for i in range(8)))
    m = probe_module(model, torch.randn(8, 32), lambda o, _: o.sum())
    with pytest.raises(StabilityError) as err:
        assert_bounded_growth(m, 100.0)
    text = str(err.value)
    assert text.startswith("A value went non-finite") and "made in '3'" in text, text  # a digit name, quoted
    assert "Worst layer" not in text


def test_a_minority_of_seeds_going_non_finite_does_not_name_the_culprit() -> None:
    """x30 planted in block 2's backward in every seed; a NaN planted in block 6's forward in one seed
    of four (too few for the nonfinite criterion): the culprit is block 2, read on the finite seeds;
    it was 6, from the one seed's NaN. With the NaN in two seeds of four, half, it
    is 6 (where the first non-finite value was made). Oracle: the construction."""

    class Nan6(Block):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * math.nan

    def seeds(nans: int) -> list:  # type: ignore[type-arg]
        out = []
        for seed in range(4):
            torch.manual_seed(seed)
            blocks = [
                Block(30.0) if i == 2 else Nan6() if i == 6 and seed < nans else Block() for i in range(8)
            ]
            x = torch.randn(8, 32)
            out.append(
                probe_module(nn.Sequential(*blocks), x, lambda o, _: (o * torch.linspace(-1, 1, 32)).sum())
            )
        return out

    assert culprit_of(seeds(1)) == "2"
    assert culprit_of(seeds(2)) == "6"


def test_a_causal_masks_inf_is_no_nan_between_blocks() -> None:
    """nn.TransformerEncoder called with torch's causal mask (-inf above the diagonal) and a NaN planted
    in layers.2's output: the NaN is layers.2's. Reading every tensor a block takes for Inf named
    '(outside blocks, before enc.layers.0)' (a review). Oracle: the construction."""

    class Causal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            return self.enc(x, mask=mask)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    model = Causal()

    def poison(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[0, 0, 0] = math.nan
        return out

    model.enc.layers[2].linear2.register_forward_hook(poison)
    blocks = [(f"enc.layers.{i}", layer) for i, layer in enumerate(model.enc.layers)]
    nf = probe_module(
        model, torch.randn(2, 6, 32), lambda o, _: o.pow(2).sum(), blocks=blocks
    ).first_nonfinite
    assert nf is not None and nf.layer == "enc.layers.2", nf


def test_a_nonfinite_verdict_names_the_block_that_made_it_whatever_the_seeds_count() -> None:
    """At q=0.9 the nonfinite criterion fires on 2 seeds of 5: the culprit is where the NaN was made
    (it read 'uniform', the minority rule ignoring which criterion fired; a review). Oracle: the
    construction, a NaN planted in block 6 of two seeds."""

    class Nan6(Block):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * math.nan

    ms, z = [], torch.linspace(-1, 1, 32)
    for seed in range(5):
        torch.manual_seed(seed)
        blocks = [Nan6() if i == 6 and seed < 2 else Block() for i in range(8)]
        ms.append(probe_module(nn.Sequential(*blocks), torch.randn(8, 32), lambda o, _: (o * z).sum()))
    assert culprit_of(ms, nonfinite=True) == "6"
    assert culprit_of(ms, nonfinite=False) != "6"
    assert culprit_of(ms) != "6"  # no verdict says: 2 of 5 is a minority


class _Keyed(nn.Module):
    """A block called by keyword, the mask first: tanh(W x) + 0 * softmax over a causal -inf mask."""

    def __init__(self, nan: bool = False) -> None:
        super().__init__()
        self.lin, self.nan = nn.Linear(16, 16), nan

    def forward(self, attention_mask: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.lin(hidden_states)) + 0 * attention_mask.softmax(-1).sum()
        return y * math.nan if self.nan else y


class _Gated(nn.Module):
    """A block returning (h, gate), the next block taking both; a NaN made in the gate where `nan`."""

    def __init__(self, nan: bool = False) -> None:
        super().__init__()
        self.lin, self.nan = nn.Linear(16, 16), nan

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.lin(x)) * gate
        return h, (torch.sigmoid(h) * math.nan if self.nan else torch.sigmoid(h))


def test_a_nan_a_block_makes_is_not_put_on_the_code_between_blocks() -> None:
    """Two calls the rule for a NaN between blocks misread (a second review): a -inf causal mask passed
    by keyword before hidden_states (its Inf read as the model's code's NaN before layers.0: the chain
    input is hidden_states), and a NaN a block made in a gate it returns beside its chain, which the
    next block takes (read as the code's between them). Oracle: the construction; the gate's NaN
    shows in the next block's output, which is named, as before the rule."""
    torch.manual_seed(0)
    mask = torch.full((4, 4), -math.inf).triu(1)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(_Keyed(nan=i == 2) for i in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(attention_mask=mask, hidden_states=x)
            return x

    class Gates(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(_Gated(nan=i == 1) for i in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate = torch.ones_like(x)
            for layer in self.layers:
                x, gate = layer(x, gate)
            return x

    nf = probe_module(Masked(), torch.randn(4, 16), lambda o, _: o.sum()).first_nonfinite
    assert nf is not None and nf.layer == "layers.2", nf
    nf = probe_module(Gates(), torch.randn(4, 16), lambda o, _: o.sum()).first_nonfinite
    assert nf is not None and nf.layer == "layers.2", nf
