"""Round-7 mutation-testing additions (recording, junctions, subject, loops, probing, readings, norms:
the block recorder, the junction test, block finding and the probe's step). Each test's oracle is
theory, brute force, torch's own functions (autograd on hand-written models) or the documented rule
(never a number the code printed). Fast and deterministic."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from torch import nn

from stabilitycheck.loops import looped_blocks
from stabilitycheck.probing import probe_module
from stabilitycheck.rng import SALT_FORWARD, derived
from stabilitycheck.subject import find_blocks

F64 = torch.float64


def _square(out: torch.Tensor, _: object) -> torch.Tensor:
    return out.square().sum()


def _grads_of(blocks: list[nn.Module], run: Callable[[], torch.Tensor]) -> list[float]:
    """||dL/d output|| of each call of `blocks` in one forward `run()`, by torch."""
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _a, o: outs.append(o)) for b in blocks]
    try:
        value = run()
    finally:
        for handle in handles:
            handle.remove()
    return [float(g.norm()) for g in torch.autograd.grad(value, outs)]


# ---------------------------------------------------------------- loops.py


class _DrawsPython(nn.Module):
    """One Linear looped over depth (find_blocks' last resort: its leaf modules), whose forward draws
    from Python's `random` (a stochastic depth written with it) without changing its output."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(8, 8, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            keep = random.random() >= 0.0  # always True: a draw that changes nothing
            x = torch.tanh(self.block(x)) if keep else x
        return x


def test_the_forward_that_finds_looped_blocks_puts_pythons_random_state_back() -> None:
    """looped_blocks' docstring: the finding forward runs with the random states of torch, Python and
    numpy put back. Oracle: random.getstate() before and after (the draw moves it)."""
    model = _DrawsPython()
    x = torch.randn(2, 8, dtype=F64)
    random.seed(7)
    before = random.getstate()
    blocks, _ = looped_blocks(model, x, *find_blocks(model))
    assert [name for name, _ in blocks] == ["block"]
    assert random.getstate() == before


class _SpareStackDeclaredFirst(nn.Module):
    """Two stacks of composite blocks, the first declared never called (a spare tower the forward
    skips), the second the chain."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_stack_the_forward_never_calls_comes_after_the_ones_it_calls() -> None:
    """looped_blocks takes the stacks in the order the forward first calls them, 'a stack never called
    comes last' (loops._apart), with the order note. Oracle: the documented rule."""
    model = _SpareStackDeclaredFirst()
    assert [name for name, _ in find_blocks(model)[0]][:1] == ["spare.0"]  # declared order
    blocks, note = looped_blocks(model, torch.randn(2, 8), *find_blocks(model))
    want = [*(f"layers.{i}" for i in range(3)), *(f"spare.{i}" for i in range(3))]
    assert [name for name, _ in blocks] == want
    assert note == "blocks: layers (3) + spare (3) (in the order the forward calls them)"


def _composite(n: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(n))


class _Sandwich(nn.Module):
    """Two stacks of composite blocks: `outer` opens and closes the forward around `inner`."""

    def __init__(self) -> None:
        super().__init__()
        self.outer, self.inner = _composite(2), _composite(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.outer[0](x)
        for layer in self.inner:
            x = layer(x)
        return self.outer[1](x)  # type: ignore[no-any-return]


def test_stacks_are_ordered_by_their_first_call_not_their_last() -> None:
    """looped_blocks: 'the stacks in the order the forward first calls them' (block 0's input is the
    chain's `(input)`): outer's first call comes before inner's, so the declared order stands, its
    note unchanged. Oracle: the documented rule."""
    model = _Sandwich()
    chosen = find_blocks(model)
    assert chosen[1] == "blocks: outer (2) + inner (3)"
    assert looped_blocks(model, torch.randn(2, 8), *chosen) == chosen


class _DeclaresItsBlocks(_Sandwich):
    """The sandwich declaring inner's blocks first (its own choice, whatever the forward does)."""

    def stability_blocks(self) -> list[tuple[str, nn.Module]]:
        return [*((f"inner.{i}", b) for i, b in enumerate(self.inner)), ("outer.0", self.outer[0])]


def test_declared_blocks_are_taken_as_declared() -> None:
    """README: stability_blocks() 'returns its repeated blocks'; only blocks find_blocks chose itself are
    reordered or dropped by what a forward shows. Oracle: the documented rule."""
    model = _DeclaresItsBlocks()
    chosen = find_blocks(model)
    assert [name for name, _ in chosen[0]] == ["inner.0", "inner.1", "inner.2", "outer.0"]
    assert looped_blocks(model, torch.randn(2, 8), *chosen) == chosen


class _EncoderHeadsDecoder(nn.Module):
    """Three stacks of composite blocks, declared decoder, encoder, heads; the forward runs the
    encoder with a head after each of its layers (deep supervision, off the chain), then the decoder
    on the encoder's output."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder, self.encoder, self.heads = _composite(2), _composite(3), _composite(3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for layer, head in zip(self.encoder, self.heads, strict=True):
            x = layer(x)
            outs.append(head(x))
        for layer in self.decoder:
            x = layer(x)
        return [*outs, x]


def test_stacks_kept_apart_from_heads_are_in_the_order_the_forward_calls_them() -> None:
    """The heads run between the encoder's calls, off the chain, and are left out; the two stacks kept
    are 'in the order the forward first calls them' (loops._apart), the encoder's first, and the note
    names them in that order. Oracle: the documented rule."""
    model = _EncoderHeadsDecoder()
    blocks, note = looped_blocks(model, torch.randn(2, 8), *find_blocks(model))
    assert [name for name, _ in blocks] == ["encoder.0", "encoder.1", "encoder.2", "decoder.0", "decoder.1"]
    assert note == "blocks: encoder + decoder (5; heads run between their calls, off the chain: not taken)"


# ---------------------------------------------------------------- probing.py


class _MarksItsInputAfterDrawing(nn.Module):
    """As Hugging Face's wav2vec2 feature encoder in training (it sets requires_grad on a view of its
    raw input, which torch allows on a leaf alone, so the probe's in-graph copy makes it raise), but
    before that line it draws noise from torch's generator and updates two buffers, one in place and
    one re-assigned: the failed forward has drawn and counted once already."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(1, 8, 5, stride=2, dtype=F64)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh()) for _ in range(3))
        self.register_buffer("seen", torch.zeros((), dtype=F64))
        self.register_buffer("kept", torch.zeros((), dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x)
        self.seen.add_(1.0)
        self.kept = self.kept + 1.0
        h = x[:, None]
        h.requires_grad = True
        h = self.conv(h * (1 + 0.5 * noise[:, None]) * self.seen * self.kept).transpose(1, 2)
        for layer in self.layers:
            h = layer(h)
        return h


def test_the_rerun_on_the_inputs_as_given_draws_and_counts_as_the_failed_forward_would_have() -> None:
    """The step runs again on the inputs as given 'random state and buffers restored' (the commit and
    probing._run_step): the re-run must be the model's one forward. Oracle: a twin built the same way,
    run once by torch from the probe's seed, its loss and dL/d each layer's output; and the buffers
    after the probe, one forward's worth (1, not 2)."""
    x = torch.randn(2, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    model, twin = _MarksItsInputAfterDrawing(), _MarksItsInputAfterDrawing()
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    m = probe_module(model, x, _square, blocks=blocks, seed=3)
    torch.manual_seed(derived(3, SALT_FORWARD))  # the forward's own stream (rng.derived)
    loss: list[torch.Tensor] = []

    def run() -> torch.Tensor:
        loss.append(_square(twin(x), None))
        return loss[0]

    expect = _grads_of(list(twin.layers), run)
    assert m.activation_names == ("(input)", "layers.0", "layers.1", "layers.2")
    assert m.loss[0] == pytest.approx(float(loss[0].detach()), rel=1e-12)
    assert m.activation_grad_norms[1:] == pytest.approx(expect, rel=1e-12)
    assert float(model.seen) == 1.0
    assert float(model.kept) == 1.0


class _TanhLayers(nn.Module):
    """Three tanh layers, float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(8, 8, dtype=F64) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_an_input_that_requires_grad_is_given_to_the_model_as_it_is() -> None:
    """probing._in_graph copies each floating input 'that does not require grad'; one that does is the
    caller's own, which a loss may differentiate against (a gradient penalty on the inputs, as WGAN-GP
    writes it): given a copy, the model's output was no function of it and torch.autograd.grad
    raised. Oracle: torch's loss and dL/d each layer's output for the same penalty."""
    model = _TanhLayers()
    x = torch.randn(4, 8, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_()

    def penalised(out: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        (slope,) = torch.autograd.grad(out.sum(), given, create_graph=True)
        return out.square().sum() + slope.square().sum()

    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    m = probe_module(model, x, penalised, blocks=blocks)
    loss: list[torch.Tensor] = []

    def run() -> torch.Tensor:
        loss.append(penalised(model(x), x))
        return loss[0]

    expect = _grads_of(list(model.layers), run)
    assert m.loss[0] == pytest.approx(float(loss[0].detach()), rel=1e-12)
    assert m.activation_grad_norms[1:] == pytest.approx(expect, rel=1e-12)


class _MarksItsInputAndChangesOutputs(nn.Module):
    """Sets requires_grad on a view of its raw input (as wav2vec2 in training), and puts each layer's
    output through an in-place leaky ReLU after the layer returned it: the step runs again on the
    inputs as given, then again for the outputs changed in place."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(1, 8, 5, stride=2, dtype=F64)
        self.layers = nn.ModuleList(nn.Linear(8, 8, dtype=F64) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x[:, None]
        h.requires_grad = True
        h = self.conv(h).transpose(1, 2)
        for layer in self.layers:
            h = nn.functional.leaky_relu(layer(h), 0.2, inplace=True)
        return h


def test_outputs_changed_in_place_by_a_model_marking_its_input_are_read_as_returned() -> None:
    """Both re-runs of _run_step at once: the one on the inputs as given (the model refuses the probe's
    copy) and the one for outputs changed in place, which must stay on the inputs as given. Oracle:
    torch's dL/d each layer's output as the layer returned it (retain_grad before the in-place ReLU)."""
    x = torch.randn(2, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    model = _MarksItsInputAndChangesOutputs()
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    m = probe_module(model, x, _square, blocks=blocks)
    outs: list[torch.Tensor] = []

    def kept(_m: nn.Module, _a: object, out: torch.Tensor) -> torch.Tensor:
        outs.append(out)  # as the layer returned it; the model changes the copy in place after
        return out * 1.0

    handles = [b.register_forward_hook(kept) for b in model.layers]
    loss = _square(model(x), None)
    for handle in handles:
        handle.remove()
    expect = [float(g.norm()) for g in torch.autograd.grad(loss, outs)]
    assert m.activation_names == ("(input)", "layers.0", "layers.1", "layers.2")
    assert m.activation_grad_norms[1:] == pytest.approx(expect, rel=1e-12)


class _DoublesWhenAsked(nn.Module):
    """A block that, asked to, doubles its input in place before its layer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8, dtype=F64)

    def forward(self, x: torch.Tensor, double: bool) -> torch.Tensor:
        if double:
            x.mul_(2.0)
        return torch.tanh(self.lin(x))


class _CalledAgainOnAnotherInput(nn.Module):
    """Block 0 called a second time, on another tensor (z), which it doubles in place; the model
    reads z afterwards, doubled."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block, self.other = _DoublesWhenAsked(), _DoublesWhenAsked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.block(x, False) + 1.0
        return self.other(self.block(z, True), False) + z  # type: ignore[no-any-return]


def test_only_calls_of_block_0_on_its_first_input_get_a_copy() -> None:
    """Recorder: until release, 'every call of block 0 on that same input' gets a copy; a call on
    another tensor gets that tensor, so what the block does to it in place the model sees, as without
    the probe. Oracle: the model's own loss, computed by torch."""
    x = torch.randn(4, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    model = _CalledAgainOnAnotherInput()
    m = probe_module(model, x, _square, blocks=[("block", model.block), ("other", model.other)])
    assert m.activation_names == ("(input)", "block[0]", "block[1]", "other")
    assert m.loss[0] == pytest.approx(float(_square(model(x.clone()), None).detach()), rel=1e-12)


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
    """recording._entry: called by keyword alone, the entry is `hidden_states` or else the call's one
    tensor argument, '(None, None) where that is not one tensor': with the float bias given before the
    integer ids, taking the first tensor read the bias as the chain's input. Oracle: the documented
    rule (the block's own arguments: two tensors)."""
    model = _CallsBiasedByKeyword()
    blocks = [("biased", model.biased), ("head", model.head)]
    m = probe_module(model, torch.randint(0, 10, (3, 5)), lambda o, _: o.square().mean(), blocks=blocks)
    assert m.activation_names == ("biased", "head")


# ---------------------------------------------------------------- junctions.py


class _PassesItsInputOn(nn.Module):
    """A layer returning its output and, beside it, half its input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8, dtype=F64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(self.lin(x)), 0.5 * x


class _TowerOnTheInputHandedOn(nn.Module):
    """An encoder of three such layers; a second tower of two layers runs on the half of the model's
    input that encoder layer 0 hands on, not on anything the encoder computed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleList(_PassesItsInputOn() for _ in range(3))
        self.tower = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, side = self.enc[0](x)
        for layer in self.enc[1:]:
            h, _ = layer(h)
        for layer in self.tower:
            side = layer(side)
        return h.sum() + side.sum()


def test_a_tower_on_the_input_block_0_hands_on_runs_beside_the_chain() -> None:
    """junctions.taken_chains: block 0's input (the `(input)` entry) is not an output of chain 0, 'a
    second tower taking that input too runs beside the first'; the tower's gradient reaches the input
    through 0.5 * x, never through the encoder, so no path crosses both. Oracle: the documented rule."""
    model = _TowerOnTheInputHandedOn()
    blocks = [(f"enc.{i}", b) for i, b in enumerate(model.enc)]
    blocks += [(f"tower.{i}", b) for i, b in enumerate(model.tower)]
    m = probe_module(model, torch.randn(4, 8, dtype=F64), lambda out, _: out, blocks=blocks)
    assert m.activation_names == ("(input)", "enc.0", "enc.1", "enc.2", "tower.0", "tower.1")
    assert m.chain_starts == (4,)
    assert m.chain_feeds == ((), ())
    assert m.growth == pytest.approx(max(m.chain_growths), rel=1e-12)


class _Decoding(nn.Module):
    """A decoder layer: its own input and the encoder's memory."""

    def __init__(self) -> None:
        super().__init__()
        self.own, self.mem = nn.Linear(8, 8, dtype=F64), nn.Linear(8, 8, dtype=F64)

    def forward(self, y: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.own(y) + self.mem(memory))


class _HeadOnDecoderPlusSkip(nn.Module):
    """Two encoder layers, two decoder layers on the encoder's memory, and a head on the decoder's
    output plus the decoder's own input (a skip around the decoder)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh()) for _ in range(2))
        self.dec = nn.ModuleList(_Decoding() for _ in range(2))
        self.head = nn.Linear(8, 4, dtype=F64)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for layer in self.enc:
            x = layer(x)
        h = y
        for layer in self.dec:
            h = layer(h, x)
        return self.head(h + y)  # type: ignore[no-any-return]


def test_a_head_after_a_decoder_takes_the_decoders_chain_alone() -> None:
    """junctions.taken_chains: 'a head after a decoder takes the decoder's alone (the encoder's reach
    it through the decoder)': the head's input, the decoder's output plus a skip, is no merge of two
    chains, so the head goes on with the decoder's chain. Oracle: the documented rule, and torch's
    |dL/d dec.0| / |dL/d head| for the decoder chain's growth."""
    model = _HeadOnDecoderPlusSkip()
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 8, dtype=F64, generator=gen), torch.randn(4, 8, dtype=F64, generator=gen)
    blocks = [(f"enc.{i}", b) for i, b in enumerate(model.enc)]
    blocks += [*((f"dec.{i}", b) for i, b in enumerate(model.dec)), ("head", model.head)]
    m = probe_module(model, (x, y), _square, blocks=blocks)
    assert m.activation_names == ("(input)", "enc.0", "enc.1", "dec.0", "dec.1", "head")
    assert m.chain_starts == (3,)
    assert m.chain_feeds == ((), (0,))
    dec0, _, head = _grads_of([*model.dec, model.head], lambda: _square(model(x, y), None))
    assert m.chain_growths[1] == pytest.approx(dec0 / head, rel=1e-12)


class _LearnedStart(nn.Module):
    """A block returning its learned state as it is (a leaf: no autograd node), whatever it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.state = nn.Parameter(torch.randn(4, 8, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.state


class _StartsFromALearnedState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.start = _LearnedStart()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.start(x)
        for layer in self.layers:
            h = layer(h)
        return h


def test_a_block_taking_the_leaf_the_block_before_returned_goes_on_with_its_chain() -> None:
    """junctions.comes_from: a call goes on with the chain where what it takes 'is out or is computed from
    it'; the learned state start returns is a leaf (no autograd node to trace back to), and layers.0
    takes it as it is. Oracle: the documented rule, and torch's |dL/d start| / |dL/d layers.2|."""
    model = _StartsFromALearnedState()
    blocks = [("start", model.start), *((f"layers.{i}", b) for i, b in enumerate(model.layers))]
    x = torch.randn(4, 8, dtype=F64)
    m = probe_module(model, x, _square, blocks=blocks)
    assert m.activation_names[-4:] == ("start", "layers.0", "layers.1", "layers.2")
    assert m.chain_starts == ()
    out: list[torch.Tensor] = []

    def run() -> torch.Tensor:
        out.append(_square(model(x), None))
        return out[0]

    start, *_, last = _grads_of([model.start, *model.layers], run)
    assert m.growth == pytest.approx(start / last, rel=1e-12)


class _TwoHeadsOnTwoInputs(nn.Module):
    """A list of two heads, each on its own input: head 1 does not take head 0's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh()) for _ in range(2))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.heads[0](a) + self.heads[1](b)  # type: ignore[no-any-return]


def test_block_1_not_taking_block_0s_output_starts_a_chain() -> None:
    """Every block but a lone block 0 is checked for a junction, a stack's later blocks too (a head per
    stage is a chain of its own): heads.1 takes b, not heads.0's output, so it starts a chain at call 2.
    Oracle: the documented rule (stack_starts' docstring)."""
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 8, dtype=F64, generator=gen), torch.randn(4, 8, dtype=F64, generator=gen)
    m = probe_module(_TwoHeadsOnTwoInputs(), (a, b), _square)
    assert m.activation_names == ("(input)", "heads.0", "heads.1")
    assert m.chain_starts == (2,)


def _starts_by_rule(stacks: list[str]) -> list[int]:
    """stack_starts' docstring, spelt out: the first block of each run of blocks in one container,
    except block 0 where it is a one-block stack (a recurrent cell called per token)."""
    runs = [b for b in range(len(stacks)) if b == 0 or stacks[b] != stacks[b - 1]]
    return [b for b in runs if b > 0 or (len(stacks) > 1 and stacks[1] == stacks[0])]


@pytest.mark.parametrize(
    "stacks",
    [
        ["cell"],
        ["cell", "head"],
        ["layers", "layers", "head"],
        ["enc", "enc", "dec", "dec"],
        ["stages.0", "stages.1", "stages.1", "heads", "heads"],
        ["fwd", "bwd"],
        ["a", "a", "b", "a", "a"],
    ],
)
def test_the_blocks_checked_in_a_pre_hook_are_each_stacks_first_but_a_lone_block_0(stacks: list[str]) -> None:
    """Oracle: the rule of junctions.stack_starts' docstring, spelt out by hand."""
    from stabilitycheck.junctions import stack_starts

    assert stack_starts(stacks) == _starts_by_rule(stacks)


# ---------------------------------------------------------------- subject.py


class _Halved(nn.Module):
    """A parametrization of a weight: w / 2 (torch.nn.utils.parametrize)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w / 2


class _StackAndReparametrizedHead(nn.Module):
    """A two-layer stack and a head whose weight three parametrizations compute: the head's
    `parametrizations.weight` list holds three modules of one type, longer than the stack."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 4)
        for _ in range(3):
            nn.utils.parametrize.register_parametrization(self.head, "weight", _Halved())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)  # type: ignore[no-any-return]


def test_the_lists_computing_a_weight_are_no_stack_even_where_longest() -> None:
    """README: 'the lists computing its weight are no stack'; the blocks are the stack of layers.
    Oracle: the documented rule."""
    blocks, note = find_blocks(_StackAndReparametrizedHead())
    assert [name for name, _ in blocks] == ["layers.0", "layers.1"]
    assert note == "blocks: layers (2)"


class _ListNamedParametrizations(nn.Module):
    """A model of its own whose stack of three layers happens to be called `parametrizations` (no
    torch.nn.utils.parametrize anywhere), and a shorter stack of two beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.parametrizations = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.extra = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.parametrizations, *self.extra]:
            x = torch.tanh(layer(x))
        return x


def test_a_stack_called_parametrizations_of_an_unparametrized_model_is_its_stack() -> None:
    """Only a parametrized module's `parametrizations` lists compute a weight (subject._reparametrizing);
    a list of that name elsewhere is a stack like any other, here the longest. Oracle: the documented
    rule (the longest stack of same-type modules)."""
    blocks, note = find_blocks(_ListNamedParametrizations())
    assert [name for name, _ in blocks] == [f"parametrizations.{i}" for i in range(3)]
    assert note == "blocks: parametrizations (3)"


class _NormedStackBesideShorter(nn.Module):
    """Four weight-normed layers in a list, and a plain two-layer list beside them."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)) for _ in range(4))
        self.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.layers, *self.heads]:
            x = torch.tanh(layer(x))
        return x


def test_a_stack_of_parametrized_layers_is_a_stack_of_their_class() -> None:
    """README: a layer reparametrized by weight_norm, which torch gives a class of its own (one per
    instance), 'counts as its module's class': the four weight-normed Linears are one stack of four,
    the longest, not four types. Oracle: the documented rule."""
    blocks, note = find_blocks(_NormedStackBesideShorter())
    assert [name for name, _ in blocks] == [f"layers.{i}" for i in range(4)]
    assert note == "blocks: layers (4)"


class _TwoLayersOneTwiceReparametrized(nn.Module):
    """No stack: two Linear attributes, the second's weight computed by two parametrizations (its
    `parametrizations.weight` list has two modules, the only list of two or more in the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)
        for _ in range(2):
            nn.utils.parametrize.register_parametrization(self.second, "weight", _Halved())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))  # type: ignore[no-any-return]


def test_without_a_stack_no_block_is_a_module_computing_a_weight() -> None:
    """The parametrizations computing `second.weight` are no list of blocks either (they run inside
    the weight's getter, never on the chain). Oracle: the documented rule ('the lists computing its
    weight are no stack')."""
    blocks, _ = find_blocks(_TwoLayersOneTwiceReparametrized())
    assert not any("parametrizations" in name for name, _ in blocks)
    assert not any(isinstance(m, _Halved) for _, m in blocks)


# ---------------------------------------------------------------- readings.py


def test_a_chain_taking_an_unreadable_chain_takes_what_that_one_took() -> None:
    """readings.chains_of: a chain of outputs no gradient reached has no growth, 'and a chain taking one
    takes what that one took': chain 2 (from call 4) takes chain 1 (calls 2-3, unreached), which took
    chain 0, so chain 2 is fed by chain 0. Oracle: the documented rule, by hand."""
    from stabilitycheck.readings import chains_of

    act = [8.0, 4.0, 0.0, 0.0, 6.0, 3.0]
    chains, feeds = chains_of(
        act, frozenset({2, 4}), frozenset({2, 3}), {2: frozenset({0}), 4: frozenset({2})}
    )
    assert chains == (2.0, 2.0)
    assert feeds == ((), (0,))


def test_under_a_gradscaler_a_non_finite_gradient_alone_is_no_finding() -> None:
    """readings.locate: 'Under a GradScaler (grads_count False) non-finite gradients are a skipped
    step, not a finding'; with grads counted they are one. Oracle: the documented rule."""
    from stabilitycheck.measurement import INPUT
    from stabilitycheck.readings import Step, locate

    step = Step(
        loss=1.0,
        grads=[1.0, float("inf")],
        weights=[],
        calls=(INPUT, "a", "b"),
        breaks=frozenset(),
        feeds={},
        unreached=frozenset(),
        forward=[1.0, 1.0, 1.0],
        backward=[1.0, float("nan"), 1.0],
    )
    assert locate(0, step, ["a", "b"], [0, 1], grads_count=False) is None
    found = locate(0, step, ["a", "b"], [0, 1])
    assert found is not None and found.tensor == "activation_grad"
