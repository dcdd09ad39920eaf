"""The random streams a probe draws from are independent of each other: a forward's draws (noise,
dropout) of the weights' initialisation, and every purpose's seed (inputs, labels) of the other seeds
of its verdict. Oracles: the draws compared directly, and a weight-noise stack's growth against its
distribution with independent draws."""

from __future__ import annotations

import importlib.util
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.losses import NUM_CLASSES
from stabilitycheck.probing import probe_module
from stabilitycheck.rng import SALT_BATCH, SALT_FORWARD, SALT_INFER, SALT_LOSS, derived
from stabilitycheck.seeds import SEED_MIX, seed_of

NOISE = str(Path(__file__).parent / "modelfiles" / "weight_noise.py")


def _noise_module() -> Any:
    spec = importlib.util.spec_from_file_location("weight_noise", NOISE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sum_loss(out: torch.Tensor, _: object) -> torch.Tensor:
    return out.sum()


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_a_forward_does_not_redraw_the_initialisation_it_was_seeded_alike(seed: int) -> None:
    """probe_module(seed=s) on a model built right after torch.manual_seed(s): the forward's noise was
    the init's own draws (eps == mu x sqrt(width), exactly), W = 2 mu for every seed. Oracle: the
    tensors compared, and their correlation (independent N(0, 1) draws: |r| < 0.1 over 4096 pairs)."""
    torch.manual_seed(seed)
    layer = _noise_module().NoisyLinear(64)
    probe_module(layer, torch.randn(8, 64), _sum_loss, seed=seed)
    init = layer.mu.detach() * math.sqrt(64)
    assert not torch.allclose(layer.eps, init)
    r = torch.corrcoef(torch.stack([layer.eps.flatten(), init.flatten()]))[0, 1]
    assert abs(float(r)) < 0.1


def test_a_weight_noise_stacks_growth_is_that_of_independent_noise() -> None:
    """Oracle: plain torch on this model file at depth 30 (cross-entropy on random labels), 40 seeds:
    with the forward's noise drawn apart from the init, median growth 3.0 and largest 6.4; with the
    noise a copy of the init (W = 2 mu), median 82 and 40-197. Nine seeds through probe(): every
    one under 20."""
    growth = [probe(Config.of(NOISE, depth=30, seed=seed_of(0, i))).growth for i in range(9)]
    assert max(growth) < 20, growth
    assert 1 < statistics.median(growth) < 8, growth


@pytest.mark.parametrize("salt", [SALT_BATCH, SALT_LOSS, SALT_INFER, SALT_FORWARD])
def test_no_purposes_seed_is_another_seed_of_its_verdict(salt: int) -> None:
    """torch's CPU generator keeps a seed's low 32 bits: a purpose's seed equal there to seed_of(base, k)
    draws that seed's stream (hf's labels of seed i were seed i + 1's token ids). Oracle: SEED_MIX is
    odd, so derived(base, salt) = seed_of(base, k) mod 2^32 for exactly one k mod 2^32, found with
    its inverse; it lies over 10^8 seeds away from 0."""
    base = 12345
    k = (derived(base, salt) - base) * pow(SEED_MIX, -1, 2**32) % 2**32
    assert min(k, 2**32 - k) > 10**8
    assert (seed_of(base, k) - derived(base, salt)) % 2**32 == 0  # the one k, found


def test_an_hf_seeds_labels_are_not_the_next_seeds_token_ids() -> None:
    """hf's inputs and labels were drawn from seed + salt x SEED_MIX, seed_of's own step: seed i's
    labels were seed i + 1's token ids, and seed i's ids were drawn from seed i + 1's weight seed.
    Oracle: the labels the default loss drew, against those the next seed's token-id stream draws."""
    pytest.importorskip("transformers")
    from stabilitycheck.hf import HFModel

    subject = HFModel("gpt2")
    config = subject.config()
    built = [subject.build(config.with_run(seed=seed_of(0, i))) for i in range(3)]
    ids = [b.inputs["input_ids"] for b in built]
    for i in range(2):
        built[i].loss_fn(built[i].model(**built[i].inputs), built[i].inputs)  # draws its labels
        (labels,) = [t for key, t in built[i].loss_fn.default.cache.items() if key[0] == "ce"]
        next_ids = torch.Generator().manual_seed(derived(seed_of(0, i + 1), SALT_BATCH))
        drawn_there = torch.randint(0, NUM_CLASSES, labels.shape, generator=next_ids)
        assert labels.shape == ids[i + 1].shape and not torch.equal(labels, drawn_there)
    torch.manual_seed(seed_of(0, 1))  # no pad ids in gpt2's vocabulary: uniform over all of it
    assert not torch.equal(torch.randint(0, built[0].model.config.vocab_size, ids[0].shape), ids[0])


class _HostDrop(torch.nn.Module):
    """A residual tanh block skipped with probability 1/2 on Python's `random` (a LayerDrop, as
    MusicGen's decoder draws it)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if random.random() < 0.5:
            return x
        return x + 1.5 * torch.tanh(self.lin(x))


def test_a_forward_drawing_with_python_random_reads_the_same_for_the_same_seed() -> None:
    """probe_module seeded torch's generator alone: a forward drawing its LayerDrop with `random` read
    another growth at each call of the same seed, set by whatever state the caller left. Oracle: the
    same call twice, from different caller states, and the caller's own next draw, unchanged by the
    probe."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(_HostDrop(16) for _ in range(12))
    model = torch.nn.Sequential(*blocks)
    x = torch.randn(4, 16)
    named = [(str(i), b) for i, b in enumerate(blocks)]
    growth = []
    for state in (1, 2):
        random.seed(state)
        growth.append(probe_module(model, x, _sum_loss, blocks=named, seed=5).growth)
        after = random.random()
        random.seed(state)
        assert after == random.random()  # the caller's state given back
    assert growth[0] == growth[1]
    others = {probe_module(model, x, _sum_loss, blocks=named, seed=s).growth for s in range(6)}
    assert len(others) > 1  # the seeds still draw apart


class _HostCoin(torch.nn.Module):
    """Inf on a coin of Python's `random`, identity otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * math.inf if random.random() < 0.5 else x


@pytest.mark.parametrize("seed", range(6))
def test_a_nan_from_a_python_random_draw_is_reproduced_by_the_re_run(seed: int) -> None:
    """The float64 re-run that names the block restored torch's generator alone: a forward's coin of
    Python's `random` came up otherwise there, and the finding read reproduced=False. Oracle: the
    coin itself, drawn from the forward's seed (nothing drawn before it)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), _HostCoin(), torch.nn.Linear(8, 8))
    blocks = [("0", model[0]), ("1", model[1])]
    m = probe_module(model, torch.randn(4, 8), _sum_loss, blocks=blocks, seed=seed)
    random.seed(derived(seed, SALT_FORWARD))
    inf = random.random() < 0.5
    found = m.first_nonfinite
    assert (found is not None) == inf
    if found is not None:
        assert (found.layer, found.tensor, found.reproduced) == ("1", "activation", True)
