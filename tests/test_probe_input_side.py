"""Block 0's input side, the `(input)` entry: residual adds and layer scales around block 0,
norms outside it, skips, and keyword or repeated calls, read as torch's gradients are."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from chain_models import OrthogonalTowers, run_tower
from torch import nn
from torch.nn import functional as F

from stabilitycheck.probing import Measurement, probe_module
from stabilitycheck.verdicts import Limits, verdict


class _Doubling(nn.Module):
    """x -> W x with W twice an orthogonal matrix: a backward gain of exactly 2."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8, bias=False)
        nn.init.orthogonal_(self.linear.weight)
        with torch.no_grad():
            self.linear.weight *= 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_blocks_called_by_keyword_keep_their_input_side_and_their_chain() -> None:
    """Stages of blocks called as block(x=x): the input side was taken from a positional argument or
    `hidden_states` alone, so block 0's gain was lost (growth 2^5 for 2^6), and each stage's first
    block was read as starting a new chain (a NaN gain at the junction). Oracle: exact linear growth,
    six gains of 2."""
    torch.manual_seed(0)

    class Staged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.ModuleList(nn.ModuleList(_Doubling() for _ in range(3)) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for stage in self.stages:
                for block in stage:
                    x = block(x=x)
            return x

    m = probe_module(Staged(), torch.randn(4, 8), lambda o, _: o.square().mean())
    assert m.activation_names[0] == "(input)" and len(m.gains) == 6
    assert m.gains == pytest.approx([2.0] * 6, rel=1e-5)
    assert m.growth == pytest.approx(2.0**6, rel=1e-5)


def test_a_keyword_call_of_two_tensors_has_no_input_side() -> None:
    """block(x=ids, bias=b) with integer ids: the one floating keyword tensor, the bias, was taken as
    the chain's entry, and block 0 got a gain against it. Two tensors: which is the chain is not read
    from the call. Oracle: the block's own arguments."""

    class Biased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return self.emb(x) + bias

    biased, head = Biased(), nn.Linear(4, 4)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.biased, self.head, self.bias = biased, head, torch.randn(4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.biased(x=ids, bias=self.bias))

    blocks = [("biased", biased), ("head", head)]
    m = probe_module(Model(), torch.randint(0, 10, (3, 5)), lambda o, _: o.square().mean(), blocks=blocks)
    assert m.activation_names[0] != "(input)"


def test_a_whole_sequence_rnn_wider_than_its_input_has_its_input_side() -> None:
    """An nn.RNN from 8 inputs to 16 hidden, the loss on the last step: its growth through time is
    block 0's gain from the input, though the shapes differ. Oracle: dL/dx and dL/d(rnn output) from
    torch's own backward; and rho^T growth makes it large (rho 3, relu: ~(3 / sqrt 2)^T)."""
    torch.manual_seed(0)
    rnn = nn.RNN(8, 16, batch_first=True, nonlinearity="relu", bias=False)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(3.0 * torch.linalg.qr(torch.randn(16, 16))[0])
    head = nn.Linear(16, 4)

    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = rnn, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    model, x = Last(), torch.randn(4, 16, 8)
    loss = lambda out, _: out.square().mean()  # noqa: E731
    m = probe_module(model, x, loss, blocks=[("rnn", rnn), ("head", head)])
    assert m.activation_names == ("(input)", "rnn", "head")
    xg = x.clone().requires_grad_()
    out = rnn(xg)[0]
    out.retain_grad()
    loss(head(out[:, -1]), None).backward()
    assert m.activation_grad_norms[0] == pytest.approx(xg.grad.norm().item(), rel=1e-5)
    assert m.activation_grad_norms[1] == pytest.approx(out.grad.norm().item(), rel=1e-5)
    assert m.growth > 100


def test_a_skip_around_the_whole_stack_does_not_hide_its_vanishing() -> None:
    """A stem, 4 blocks at 1/2 x orthogonal, and a skip from the stem's output to the model's output
    (y = h + blocks(h)): block 0's input, which requires grad, was read over all its uses, the skip's
    too, so the growth read about 1 where the stack shrinks the gradient 16-fold. Through block 0
    alone, every gain is 1/2. Oracle, exact: ||W^T v|| = g ||v|| for W = g x orthogonal."""
    torch.manual_seed(0)

    class Skipped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(8, 8, bias=False)
            self.blocks = OrthogonalTowers(4, (0.5,)).towers[0]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            return h + run_tower(self.blocks, h)[0]

    model = Skipped().double()
    blocks = [(f"blocks.{i}", layer) for i, layer in enumerate(model.blocks)]
    m = probe_module(
        model, torch.randn(4, 8, dtype=torch.float64), lambda o, _: o.square().sum(), blocks=blocks
    )
    assert m.gains == pytest.approx([0.5] * 4, rel=1e-6)
    assert m.growth == pytest.approx(0.5**4, rel=1e-6)


class _AroundBlocks(nn.Module):
    """Branch blocks with the residual add written in the model's forward, x = x + block(x) (or
    block(x) + x), optionally behind a stem whose output requires grad; `scale` multiplies the
    branch (x + scale * block(x))."""

    def __init__(self, stem: bool, first: bool, scale: float = 1.0) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8, bias=False, dtype=torch.float64) if stem else None
        self.layers = nn.ModuleList(nn.Linear(8, 8, bias=False, dtype=torch.float64) for _ in range(4))
        for layer in self.layers:
            nn.init.orthogonal_(layer.weight, gain=0.3)
        self.first, self.scale = first, scale

    def stream(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream: the input to the stack, then the sum after each block."""
        h = self.stem(x) if self.stem is not None else x
        out = [h]
        for layer in self.layers:
            branch = self.scale * layer(h) if self.scale != 1.0 else layer(h)
            h = branch + h if self.first else h + branch
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stream(x)[-1]


@pytest.mark.parametrize(("stem", "first"), [(False, False), (False, True), (True, False)])
def test_a_residual_add_around_block_0_is_in_its_gain(stem: bool, first: bool) -> None:
    """Blocks that are residual branches, the add written in the model's forward (x = x + block(x)):
    block 0's input was read through block 0 alone, gain a (0.3 here) where the stream's is |I + W|,
    so the growth read about 0.3x what the gradient did. The add of block 0's input and output, as the
    next block takes it, is now on the chain too. Oracle: torch's gradients of the residual stream
    (the stack's input, then each sum), float64, their ratios."""
    torch.manual_seed(0)
    model = _AroundBlocks(stem, first)
    x = torch.randn(4, 8, dtype=torch.float64)
    loss = lambda o, _: o.square().sum()  # noqa: E731
    m = probe_module(model, x, loss)
    given = x.clone().requires_grad_()
    stream = model.stream(given)
    if not stem:
        stream[0] = given
    grads = [g.norm().item() for g in torch.autograd.grad(loss(stream[-1], x), stream)]
    want = [grads[i] / grads[i + 1] for i in range(4)]
    assert m.gains == pytest.approx(want, rel=1e-9)
    assert m.gains[0] > 0.9  # the branch alone is 0.3
    assert m.growth == pytest.approx(grads[0] / grads[-1], rel=1e-9)
    model.zero_grad()
    loss(model(x), x).backward()
    assert m.grad_norm[0] == pytest.approx(
        math.sqrt(sum(p.grad.square().sum().item() for p in model.parameters())), rel=1e-12
    )


def test_a_residual_add_around_block_0_behind_a_norm_is_in_its_gain() -> None:
    """XLM's layers written in the model's forward: h = LayerNorm(h + attention(h)), the branches the
    blocks, on an embedding-like stem's output. Block 0's input was read through its branch alone, so
    hf:xlm read growth 0.0067, a vanishing gradient, where the stream's is 0.998 (found by an audit).
    The add of the input and what block 0's output became, behind the next block's input, is now on
    the chain. Oracle: torch's gradients of the stem's output and of each sum, float64."""
    torch.manual_seed(0)

    class PostNormOutside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(8, 8, dtype=torch.float64)
            self.branches = nn.ModuleList(nn.Linear(8, 8, dtype=torch.float64) for _ in range(3))
            self.norms = nn.ModuleList(nn.LayerNorm(8, dtype=torch.float64) for _ in range(3))
            for branch in self.branches:
                nn.init.orthogonal_(branch.weight, gain=0.05)

        def stream(self, x: torch.Tensor) -> list[torch.Tensor]:
            out = [self.stem(x)]
            for branch, norm in zip(self.branches, self.norms, strict=True):
                out.append(out[-1] + branch(out[-1]))
                out.append(norm(out[-1]))
            return out

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stream(x)[-1]

    model, x = PostNormOutside(), torch.randn(4, 8, dtype=torch.float64)
    loss = lambda o, _: (o * torch.arange(8.0, dtype=torch.float64)).square().sum()  # noqa: E731
    m = probe_module(model, x, loss)
    assert m.layer_names == ("branches.0", "branches.1", "branches.2")
    stream = model.stream(x)
    sums = [stream[0], *stream[1::2]]  # the stem's output, then each add
    grads = [g.norm().item() for g in torch.autograd.grad(loss(stream[-1], x), sums)]
    assert m.gains == pytest.approx([grads[i] / grads[i + 1] for i in range(3)], rel=1e-9)
    assert m.gains[0] > 0.5  # through the branch alone, about 0.05 / the norm's scale


class _NormOutside(nn.Module):
    """x = x + layer(norm(x)) on an embedding's output, the norms written outside the blocks (the
    layers): nn.LayerNorm with a positional embedding added after it, or an RMS norm written by hand
    (several autograd nodes, x used twice) scaled by (1 + w), as Gemma's."""

    def __init__(self, hand: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, dtype=torch.float64)
        self.norms = nn.ModuleList(nn.LayerNorm(16, dtype=torch.float64) for _ in range(4))
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.Linear(16, 16, dtype=torch.float64), nn.Tanh(), nn.Linear(16, 16, dtype=torch.float64)
            )
            for _ in range(4)
        )
        self.head = nn.Linear(16, 50, dtype=torch.float64)
        self.pos = nn.Embedding(8, 16, dtype=torch.float64)
        self.hand = hand

    def norm(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.hand:  # Gemma's (1 + w): arithmetic on a parameter, nodes that do not lead to x
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.norms[i].weight)
        return self.norms[i](x) + self.pos(torch.arange(x.shape[-2]))  # an embedding added after it

    def stream(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        out = [self.emb(tokens)]
        for i, layer in enumerate(self.layers):
            out.append(out[-1] + layer(self.norm(i, out[-1])))
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.stream(tokens)[-1])


def _token_loss(out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a _NormOutside model's logits against its own tokens."""
    return nn.functional.cross_entropy(out.reshape(-1, 50), tokens.reshape(-1))


def _probe_layers(model: nn.Module, tokens: torch.Tensor) -> Measurement:
    """The probe of a _NormOutside model (or one built like it) on its layers, under _token_loss."""
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    return probe_module(model, tokens, _token_loss, blocks=blocks)


@pytest.mark.parametrize("hand", [False, True])
def test_a_residual_around_block_0_with_the_norm_outside_it_is_in_its_gain(hand: bool) -> None:
    """x = x + layer(norm(x)) with the norms outside the blocks (x-transformers' layout): block 0's
    input is norm(x), and its gain was read through its branch alone, 0.26 where the stream's is
    1.04, growth 0.28 for 1.14. Now the add of x and block 0's output is on the chain, its entry
    dL/dx along it (the add's and the norm's). Oracle: torch's gradients of the embedding's output
    and of each sum, float64, their ratios."""
    torch.manual_seed(0)
    model, tokens = _NormOutside(hand), torch.randint(0, 50, (2, 8))
    loss, m = _token_loss, _probe_layers(model, tokens)
    stream = model.stream(tokens)
    grads = [g.norm().item() for g in torch.autograd.grad(loss(model.head(stream[-1]), tokens), stream)]
    assert m.gains == pytest.approx([grads[i] / grads[i + 1] for i in range(4)], rel=1e-9)
    assert m.growth == pytest.approx(grads[0] / grads[-1], rel=1e-9)
    assert m.gains[0] > 0.9  # the branch alone is about 0.3


@pytest.mark.parametrize("hand", [False, True])
@pytest.mark.parametrize("given", ["plain", "requires_grad"])
def test_a_residual_with_the_norm_outside_on_a_raw_float_input_is_in_block_0s_gain(
    hand: bool, given: str
) -> None:
    """The same layout on the model's own float input, no embedding before it: nothing else needed
    that input's gradient, so the backward computed none into it, the taps read nothing and block 0
    was read through its branch alone (growth 1.02 for the stream's 1.85, found by a theory audit;
    0.24 for 1.16 at sigma_w 0.5, depth 8: a vanishing read where the gradient grows). Oracle:
    torch's gradients of the input and of each sum, float64."""
    torch.manual_seed(0)
    model, x = _NormOutside(hand), torch.randn(2, 8, 16, dtype=torch.float64)
    target = torch.randn(2, 8, 16, dtype=torch.float64)

    def stream(h: torch.Tensor) -> list[torch.Tensor]:
        out = [h]
        for i, layer in enumerate(model.layers):
            out.append(out[-1] + layer(model.norm(i, out[-1])))
        return out

    model.forward = lambda h: stream(h)[-1]  # type: ignore[method-assign]
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    m = probe_module(
        model,
        x.clone().requires_grad_(given == "requires_grad"),
        lambda out, _: (out * target).sum(),
        blocks=blocks,
    )
    sums = stream(x.clone().requires_grad_())
    grads = [g.norm().item() for g in torch.autograd.grad((sums[-1] * target).sum(), sums)]
    assert m.gains == pytest.approx([grads[i] / grads[i + 1] for i in range(4)], rel=1e-9)
    assert m.growth == pytest.approx(grads[0] / grads[-1], rel=1e-9)


def test_a_tensor_re_added_before_every_layer_is_no_residual_around_block_0() -> None:
    """h = layer_i(h + c), c a per-token embedding re-added before every layer: block 0 takes h + c
    and the next layer out_0 + c, an add of block 0's output and what its input was made from, as a
    residual with the norm outside is; but c is conditioning, not the stream (h's nodes do not lead
    to it): read as one, block 0's gain 1.02 for 0.46, growth 0.120 for 0.054 (found in review).
    Oracle: torch's gradients of block 0's input and of each layer's output, float64."""
    torch.manual_seed(0)

    class Conditioned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16, dtype=torch.float64)
            self.cond = nn.Embedding(50, 16, dtype=torch.float64)
            self.layers = nn.ModuleList(
                nn.Sequential(nn.Linear(16, 16, dtype=torch.float64), nn.Tanh()) for _ in range(4)
            )
            self.head = nn.Linear(16, 50, dtype=torch.float64)

        def stream(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            c, h, outs = self.cond(tokens), self.emb(tokens), []
            first = h + c
            for layer in self.layers:
                h = layer(h + c if outs else first)
                outs.append(h)
            return first, outs

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.stream(tokens)[1][-1])

    model, tokens = Conditioned(), torch.randint(0, 50, (2, 8))
    loss, m = _token_loss, _probe_layers(model, tokens)
    first, outs = model.stream(tokens)
    grads = [g.norm().item() for g in torch.autograd.grad(loss(model.head(outs[-1]), tokens), [first, *outs])]
    assert m.gains == pytest.approx([grads[i] / grads[i + 1] for i in range(4)], rel=1e-9)


def test_a_residual_around_block_0_on_a_learned_latent_with_the_norm_outside_is_in_its_gain() -> None:
    """x = x + layer(norm(x)) where x is a Parameter used as it is (a Perceiver's latent array), the
    norm an RMS norm written by hand: x's autograd node is a leaf, with no age, and the search for the
    norm's nodes stopped at the first (0.9825 for 0.9857; with a weight on the norm, the branch alone,
    0.25; found in review). Oracle: torch's gradients of x and of each sum, float64."""
    torch.manual_seed(0)

    class Latent(_NormOutside):
        def __init__(self) -> None:
            super().__init__(hand=True)
            self.latent = nn.Parameter(torch.randn(8, 16, dtype=torch.float64))

        def stream(self, tokens: torch.Tensor) -> list[torch.Tensor]:
            out = [self.latent]
            for i, layer in enumerate(self.layers):
                out.append(out[-1] + layer(self.norm(i, out[-1])))
            return out

    model, tokens = Latent(), torch.randint(0, 50, (8,))
    loss = lambda out, t: nn.functional.cross_entropy(out, t)  # noqa: E731
    m = probe_module(
        model, tokens, loss, blocks=[(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    )
    stream = model.stream(tokens)
    grads = [g.norm().item() for g in torch.autograd.grad(loss(model.head(stream[-1]), tokens), stream)]
    assert m.gains == pytest.approx([grads[i] / grads[i + 1] for i in range(4)], rel=1e-9)


def test_a_residual_with_the_norm_outside_on_an_input_with_a_skip_around_the_stack_is_read_on_the_chain() -> (
    None
):
    """x = x + layer(norm(x)) with the embedding's output also added to the stack's output (a skip
    around the whole stack): x has a use off the chain, and a check that the taps' sum be x's whole
    gradient read block 0 through its branch alone, 0.36 for 1.02 (found in review). The stream goes
    on from block 0's sum, which is what tells it from a re-added tensor. Oracle: torch's gradient of
    each sum, and block 0's entry as the gradient through its unit alone (autograd.grad of the first
    sum against x, given the first sum's gradient), float64."""
    torch.manual_seed(0)

    class Skipped(_NormOutside):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            stream = self.stream(tokens)
            return self.head(stream[-1] + stream[0])

    model, tokens = Skipped(hand=False), torch.randint(0, 50, (2, 8))
    loss, m = _token_loss, _probe_layers(model, tokens)
    stream = model.stream(tokens)
    sums = torch.autograd.grad(
        loss(model.head(stream[-1] + stream[0]), tokens), stream[1:], retain_graph=True
    )
    (entry,) = torch.autograd.grad(stream[1], stream[0], grad_outputs=sums[0])
    norms = [g.norm().item() for g in (entry, *sums)]
    assert m.gains == pytest.approx([norms[i] / norms[i + 1] for i in range(4)], rel=1e-9)
    assert m.gains[0] > 0.9  # the branch alone is about 0.3


@pytest.mark.parametrize("after", ["norm", "half"])
def test_a_residual_with_the_norm_outside_and_the_sum_changed_after_is_read_on_the_chain(after: str) -> None:
    """x = norm2(x + layer(norm1(x))), or 0.5 * (x + layer(norm1(x))): the stream goes on from what
    is made from block 0's sum, not from the sum itself, and a check asking for the sum itself read
    block 0 through its branch alone, 1.68 for 2.09 (found in review). Oracle: torch's gradient of
    block 0's sum, and block 0's entry as the gradient through its unit alone, float64."""
    torch.manual_seed(0)

    class Changed(_NormOutside):
        def stream(self, tokens: torch.Tensor) -> list[torch.Tensor]:
            out = [self.emb(tokens)]
            for i, layer in enumerate(self.layers):
                added = out[-1] + layer(self.norm(i, out[-1]))
                out += [added, self.norms[i](added) if after == "norm" else 0.5 * added]
            return out

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.stream(tokens)[-1])

    model, tokens = Changed(hand=True), torch.randint(0, 50, (2, 8))
    loss, m = _token_loss, _probe_layers(model, tokens)
    stream = model.stream(tokens)
    (added,) = torch.autograd.grad(loss(model.head(stream[-1]), tokens), stream[1], retain_graph=True)
    (entry,) = torch.autograd.grad(stream[1], stream[0], grad_outputs=added)
    assert m.gains[0] == pytest.approx(entry.norm().item() / added.norm().item(), rel=1e-9)


def test_a_residual_around_block_0_is_read_under_a_loss_with_a_gradient_penalty() -> None:
    """A loss taking torch.autograd.grad with create_graph (R1, WGAN-GP) runs the residual add's node
    once itself before the probe's backward does: two dL/d sum were kept, none read, and block 0 read
    through its branch alone, |dL/d input| 608 for 1185 (found in review). Oracle: torch's gradients
    of the same loss with respect to the stem's output (used by block 0 and the add alone) and each
    block's output, float64."""
    torch.manual_seed(0)
    model = _AroundBlocks(stem=True, first=False)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert model.stem is not None
    stem = model.stem.weight

    def penalised(out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(out.square().sum(), stem, create_graph=True)
        return out.square().sum() + 10.0 * g.square().sum()

    m = probe_module(model, x, penalised)
    outs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda mod, i, o: outs.append(o)) for layer in model.layers]
    stream = model.stream(x)
    for handle in handles:
        handle.remove()
    norms = [g.norm().item() for g in torch.autograd.grad(penalised(stream[-1], x), [stream[0], *outs])]
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-9)


@pytest.mark.parametrize("stem", [False, True])
def test_a_scaled_residual_around_block_0_starts_the_chain_at_its_output(stem: bool) -> None:
    """x + 0.5 * block(x) is not one add of block 0's input and output: the skip is seen in the graph
    and no (input) is taken, on a plain float input (the probe gives the model a copy of it in a
    graph of its own) as behind a stem. The branch alone read a LayerScale of 0.1 on a branch of gain
    15 as block 0's gain 14.5 where the stream's is about 1 (a false explosion, found by a user's
    trial, behind a stem, then on a plain input); every gain is the stream's (dL/d block(x) is 0.5 x
    dL/d sum). Oracle: torch's stream gradients."""
    torch.manual_seed(0)
    model = _AroundBlocks(stem=stem, first=False, scale=0.5)
    x = torch.randn(4, 8, dtype=torch.float64)
    loss = lambda o, _: o.square().sum()  # noqa: E731
    m = probe_module(model, x, loss)
    stream = model.stream(x)
    grads = [g.norm().item() for g in torch.autograd.grad(loss(stream[-1], x), stream[1:])]
    along = [grads[i] / grads[i + 1] for i in range(3)]
    assert m.activation_names[0] == "layers.0"
    assert m.gains == pytest.approx(along, rel=1e-9)


class _LayerScaled(nn.Module):
    """A stem (or none: the input itself), then h = h + 0.1 * tanh(W h) written in the forward
    (LayerScale, ReZero), W of gain 15: a branch far above 1 under a small scale, the stream's gain
    about 1.06."""

    def __init__(self, depth: int, stem: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 64) if stem else nn.Identity()
        self.blocks = nn.ModuleList(nn.Linear(64, 64, bias=False) for _ in range(depth))
        for block in self.blocks:
            nn.init.normal_(block.weight, std=15.0 / 64**0.5)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, stream: list[torch.Tensor] | None = None) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            if stream is not None:
                stream.append(h)
            h = h + 0.1 * torch.tanh(block(h))
        if stream is not None:
            stream.append(h)
        return self.head(h)  # type: ignore[no-any-return]


@pytest.mark.parametrize("stem", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_layer_scale_around_block_0_is_no_false_explosion(seed: int, stem: bool) -> None:
    """Block 0 read through its branch alone, gain 14.5, under a LayerScale of 0.1: growth 104 at depth
    30, exploding, where torch's stream growth is 4.6-8.4 (found by a user's trial behind a stem; on a
    plain float input, whose uses the probe's copy of it now records, the same: growth 15-23 at depth
    8 before). Oracle: torch's gradients of the stream h_0 .. h_30; the probe reads from block 0's
    output, one gain fewer, each gain the stream's up to tanh' (within 1.5x)."""
    torch.manual_seed(seed)
    model = _LayerScaled(30, stem).double()
    x, y = torch.randn(8, 16 if stem else 64, dtype=torch.float64), torch.randint(0, 10, (8,))
    loss = lambda o, _: F.cross_entropy(o, y)  # noqa: E731
    m = probe_module(model, x, loss)
    stream: list[torch.Tensor] = []
    grads = torch.autograd.grad(loss(model(x.clone().requires_grad_(), stream), x), stream)
    oracle = (grads[0].norm() / grads[-1].norm()).item()
    assert m.activation_names[0] == "blocks.0" and not verdict(m).exploded
    assert oracle / 1.5 < m.growth < oracle * 1.5


class _Batched(nn.Module):
    """`_LayerScaled` fed its input from a batch nested in a dict and a tuple, as a data loader gives
    (the probe calls it with batch={"x": (x,)})."""

    def __init__(self, inner: _LayerScaled) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: dict[str, tuple[torch.Tensor]]) -> torch.Tensor:
        return self.inner(batch["x"][0])  # type: ignore[no-any-return]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_layer_scale_around_block_0_on_a_nested_input_is_no_false_explosion(seed: int) -> None:
    """The probe copies a float input into a graph at any depth of tuples, lists and dicts, so the
    skip around block 0 shows on batch={"x": (x,)} as on x (nested below the top level, it was read
    through the branch alone: growth 17.9 and 28.4 at depth 8, seeds 0 and 1, where torch's stream
    growth is 1.28 and 1.53). Oracle: torch's gradients of the stream, as in the test above."""
    torch.manual_seed(seed)
    inner = _LayerScaled(8, stem=False).double()
    x, y = torch.randn(8, 64, dtype=torch.float64), torch.randint(0, 10, (8,))
    loss = lambda o, _: F.cross_entropy(o, y)  # noqa: E731
    blocks = [(f"inner.blocks.{i}", b) for i, b in enumerate(inner.blocks)]
    m = probe_module(_Batched(inner), {"batch": {"x": (x,)}}, loss, blocks=blocks)
    stream: list[torch.Tensor] = []
    grads = torch.autograd.grad(loss(inner(x.clone().requires_grad_(), stream), x), stream)
    oracle = (grads[0].norm() / grads[-1].norm()).item()
    assert m.activation_names[0] == "inner.blocks.0"
    assert oracle / 1.5 < m.growth < oracle * 1.5


class _ScaledAroundNorm(nn.Module):
    """h = h + gamma * W(norm(h)) written in the forward, the norms and the linear blocks in two
    lists: the skip starts at h, before the norm, and the branch (gain ~sigma through the norm) is far
    above 1 where the stream's gain is about 1 + gamma sigma."""

    def __init__(self, depth: int, gamma: float, stem: str, gemma: bool = False) -> None:
        super().__init__()
        self.stem = stem  # none, linear (on float inputs), intcast (on int inputs), latent (a parameter)
        self.inp = nn.Linear(16, 32) if stem in ("linear", "intcast") else nn.Identity()
        self.latent = nn.Parameter(torch.randn(1, 32))
        self.norms = nn.ModuleList((_GemmaNorm() if gemma else nn.LayerNorm(32)) for _ in range(depth))
        self.layers = nn.ModuleList(nn.Linear(32, 32, bias=False) for _ in range(depth))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=200.0 / 32**0.5)
        self.gamma = gamma

    def forward(self, x: torch.Tensor, stream: list[torch.Tensor] | None = None) -> torch.Tensor:
        latent = self.latent.expand(x.shape[0], 32)
        h = latent if self.stem == "latent" else self.inp(x.to(self.latent.dtype))
        for norm, layer in zip(self.norms, self.layers, strict=True):
            if stream is not None:
                stream.append(h)
            h = h + self.gamma * layer(norm(h))
        if stream is not None:
            stream.append(h)
        return h


class _GemmaNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + w), w a parameter starting at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


STEMS_AND_NORMS = [("none", False), ("linear", False), ("none", True), ("linear", True)]


@pytest.mark.parametrize(("stem", "gemma"), [*STEMS_AND_NORMS, ("intcast", False), ("latent", False)])
@pytest.mark.parametrize("gamma", [1e-1, 1e-3])
def test_a_scaled_residual_around_a_norm_and_block_0_is_no_false_explosion(
    gamma: float, stem: str, gemma: bool
) -> None:
    """The skip of x + gamma * block(norm(x)) starts at x, behind block 0's input norm(x): the probe
    read dL/d norm(x), the branch's gradient alone, as block 0's input side, a gain of ~200 where the
    stream's is 1.03 (gamma 1e-3; 21 at 1e-1): growth 211-512, exploding, with block 0 the culprit
    (found by an audit; with Gemma's norm, x_n * (1 + w), a second review: 1 + w read as a second
    input of the norm; behind a stem on an int input or a latent array, a third: read as parameters).
    The chain starts at block 0's output, whose gradient is gamma x the stream's
    after it, so every gain is the stream's from block 1 on. Oracle: torch's stream gradients."""
    torch.manual_seed(0)
    model = _ScaledAroundNorm(6, gamma, stem, gemma).double()
    width = 16 if stem in ("linear", "intcast") else 32
    x = torch.randint(0, 3, (16, width)) if stem == "intcast" else torch.randn(16, width).double()
    loss = lambda o, _: o.square().mean()  # noqa: E731
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    m = probe_module(model, x, loss, blocks=blocks)
    stream: list[torch.Tensor] = []
    given = x.clone().requires_grad_() if stem in ("none", "linear") else x  # an int or unused input: none
    grads = torch.autograd.grad(loss(model(given, stream), x), stream)
    along = [(grads[i] / grads[i + 1].norm()).norm().item() for i in range(1, len(grads) - 1)]
    assert m.activation_names[0] == "layers.0" and m.growth < Limits().growth
    assert m.gains == pytest.approx(along, rel=1e-9)


class _PositionsReAdded(nn.Module):
    """h = x + p, then h = tanh(W h) + p at every layer: positions p (an embedding's rows) re-added,
    a side input later blocks take again, no path around block 0 (whose input is x + p)."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.pe = nn.Embedding(4, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(depth))

    def forward(self, x: torch.Tensor, taken: list[torch.Tensor] | None = None) -> torch.Tensor:
        p = self.pe(torch.arange(4))
        h = x + p
        for layer in self.layers:
            out = layer(h)
            if taken is not None:
                taken.append(h)
                taken.append(out)
            h = torch.tanh(out) + p
        return h


def test_a_side_input_re_added_at_every_layer_keeps_block_0s_input_side() -> None:
    """What block 0's input was made from counts as the start of a path around it only where every
    path back from that input goes through it (x of norm(x)): positions re-added after each layer are
    one of two summands of x + p, and block 0's input gradient is still its chain's. Oracle: torch's
    gradients of block 0's input and of each block's output."""
    torch.manual_seed(0)
    model = _PositionsReAdded(4).double()
    x = torch.randn(4, 16, dtype=torch.float64)
    loss = lambda o, _: o.square().mean()  # noqa: E731
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    m = probe_module(model, x, loss, blocks=blocks)
    taken: list[torch.Tensor] = []
    out = model(x.clone().requires_grad_(), taken)
    grads = torch.autograd.grad(loss(out, x), [taken[0], *taken[1::2]])
    norms = [g.norm().item() for g in grads]
    assert m.activation_names[0] == "(input)"
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-9)


def test_a_cell_fed_its_input_plus_its_state_is_no_residual_whatever_the_tokens() -> None:
    """A cell called per token on x_t + h (input feeding): no residual around block 0, but where
    x_1 equals x_0 by value (a repeated token), x_1 + h_1 equalled block 0's input plus its output
    to the last bit, and its gradient was added to the input's: |dL/d input| 197.9 for 130.0 (found
    in review). For a plain input, the add is taken only where another block makes the next call.
    Oracle: torch's gradients of x_0 and of each call's output, float64."""
    torch.manual_seed(0)
    cell = nn.Sequential(nn.Linear(8, 8, bias=False, dtype=torch.float64), nn.Tanh())
    nn.init.orthogonal_(cell[0].weight, gain=0.9)

    class Feed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = cell

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack(self.steps(x, x[:, 0]), 1)

        def steps(self, x: torch.Tensor, first: torch.Tensor) -> list[torch.Tensor]:
            outs = [self.cell(first)]
            for t in range(1, x.shape[1]):
                outs.append(self.cell(x[:, t] + outs[-1]))
            return outs

    model, x = Feed(), torch.randn(3, 5, 8, dtype=torch.float64)
    x[:, 1] = x[:, 0]
    loss = lambda o, _: (o * torch.arange(8.0, dtype=torch.float64)).square().sum()  # noqa: E731
    m = probe_module(model, x, loss, blocks=[("cell", model.cell)])
    first = x[:, 0].clone().requires_grad_()
    outs = model.steps(x, first)
    norms = [g.norm().item() for g in torch.autograd.grad(loss(torch.stack(outs, 1), x), [first, *outs])]
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-9)


class _QKV(nn.Module):
    """A pre-norm block reading its input three times, as queries, keys and values."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln, self.f, self.g = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q + self.f(self.ln(q)) + self.g(self.ln(k)) * torch.tanh(v)


class _CalledThrice(nn.Module):
    """Each block called as layer(h, h, h) (Hugging Face's Funnel), on a small embedding that block 0's
    LayerNorm amplifies: the README's block-0 culprit."""

    def __init__(self, d: int = 32, depth: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, d)
        nn.init.normal_(self.emb.weight, std=0.01)
        self.layers = nn.ModuleList(_QKV(d) for _ in range(depth))
        self.head = nn.Linear(d, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h, h, h)
        return self.head(h)


def test_an_entry_passed_to_block_0_three_times_is_its_one_input() -> None:
    """layer(h, h, h) passes one tensor three times: the probe read it as several same-shaped inputs,
    dropped the `(input)` entry and with it block 0's gain (growth 2.4 for 135 on a review's model,
    hf:funnel's 1.14 for 1.19). Oracle: torch's dL/d(embedding output) through all of block 0's uses
    of it, and dL/d(each block's output)."""
    torch.manual_seed(0)
    model, ids, z = _CalledThrice(), torch.randint(0, 50, (4, 7)), torch.randn(4, 7, 10)
    m = probe_module(model, ids, lambda out, _: (out * z).sum())
    h0 = model.emb(ids).detach().requires_grad_()
    h, outs = h0, []
    for layer in model.layers:
        h = layer(h, h, h)
        outs.append(h)
    grads = torch.autograd.grad((model.head(h) * z).sum(), [h0, *outs])
    assert m.activation_names[0] == "(input)" and len(m.activation_grad_norms) == 7
    assert m.activation_grad_norms == pytest.approx([float(g.norm()) for g in grads], rel=1e-5)
    assert m.growth == pytest.approx(float(grads[0].norm() / grads[-1].norm()), rel=1e-5) and m.growth > 100


class _Packed(nn.Module):
    """A _QKV block taking its keys and values packed: layer(h, (h, h))."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _QKV(32)

    def forward(self, h: torch.Tensor, kv: Any) -> torch.Tensor:
        return self.inner(h, kv[0], kv[1])  # type: ignore[no-any-return]


class _PackedStack(_CalledThrice):
    def __init__(self, pack: type) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Packed() for _ in range(6))
        self.pack = pack

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h, self.pack([h, h]))
        return self.head(h)  # type: ignore[no-any-return]


@pytest.mark.parametrize("pack", [tuple, list])
def test_the_entry_passed_again_inside_a_container_is_not_taken(pack: type) -> None:
    """layer(h, (h, h)): the copy goes where the entry is passed as an argument; inside a container
    the original stays, whose gradient the copy's left out: (input) read 26 for torch's 1297 (found
    in review). Such a call takes no entry, as before; layer(h, h, h) does."""
    torch.manual_seed(0)
    model, ids, z = _PackedStack(pack), torch.randint(0, 50, (4, 7)), torch.randn(4, 7, 10)
    m = probe_module(model, ids, lambda out, _: (out * z).sum())
    assert m.activation_names[0] == "layers.0"


class _Biased(nn.Module):
    """Block 0 of the model below: an embedding of integer ids plus a float bias."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.emb(x) + bias  # type: ignore[no-any-return]


class _CallsBiasedByKeyword(nn.Module):
    """Calls block 0 by keyword alone, the float bias first: block(bias=b, x=ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.biased, self.head, self.bias = _Biased(), nn.Linear(4, 4), torch.randn(4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.biased(bias=self.bias, x=ids))  # type: ignore[no-any-return]


def test_a_keyword_call_of_two_tensors_has_no_input_side_whatever_their_order() -> None:
    """blockcalls.entry: called by keyword alone, the entry is `hidden_states` or else the call's one
    tensor argument, '(None, None) where that is not one tensor': with the float bias given before the
    integer ids, taking the first tensor read the bias as the chain's input. Oracle: the documented
    rule (the block's own arguments: two tensors)."""
    model = _CallsBiasedByKeyword()
    blocks = [("biased", model.biased), ("head", model.head)]
    m = probe_module(model, torch.randint(0, 10, (3, 5)), lambda o, _: o.square().mean(), blocks=blocks)
    assert m.activation_names == ("biased", "head")
