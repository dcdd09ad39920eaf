"""The built-in Subjects: mlp, resmlp, rnn, lstm, gru and transformer, in mean-field parametrisation.

Every weight matrix is N(0, init_scale**2 / fan_in); recurrent matrices are init_scale x an
orthogonal matrix (spectral radius exactly init_scale); biases are absent or zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from stabilitycheck.config import Config
from stabilitycheck.families import RECURRENT, Scalar, knob_specs
from stabilitycheck.losses import NUM_CLASSES, generator, readout_loss
from stabilitycheck.memory import PER_PARAMETER
from stabilitycheck.space import INIT_SCALES, Axis, Space
from stabilitycheck.subject import Built, torch_dtype


@dataclass(frozen=True)
class Knobs:
    """A zoo Config's knobs as attributes; knobs its family lacks keep values its builder ignores."""

    family: str
    depth: int = 1
    width: int = 64
    init_scale: float = 1.0
    seq_len: int = 1
    norm: str = "none"
    activation: str = "tanh"
    batch_size: int = 16

    @classmethod
    def of(cls, config: Config) -> Knobs:
        return cls(config.subject, **config.values)  # type: ignore[arg-type]


Activation = Callable[[torch.Tensor], torch.Tensor]
Block = Callable[[Knobs, torch.Generator, torch.dtype], nn.Module]  # a module built from the knobs
ACTIVATION_FNS: dict[str, Activation] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "linear": lambda x: x,
    "gelu": F.gelu,
}


def gaussian(
    rows: int, cols: int, scale: float, gen: torch.Generator, dtype: torch.dtype = torch.float64
) -> nn.Parameter:
    """A (rows, cols) weight drawn from N(0, scale**2 / cols) in float64, then held in `dtype` (the
    model's own: built in it, not cast after, which cost a walk over every module per build)."""
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return nn.Parameter((w * (scale / cols**0.5)).to(dtype))


def orthogonal(n: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    """scale x a random orthogonal (n, n) matrix: every singular value equals scale."""
    return nn.init.orthogonal_(torch.empty(n, n, dtype=torch.float64), gain=scale, generator=gen)


class Dense(nn.Module):
    """y = act(W x), the block of the plain MLP."""

    def __init__(self, c: Knobs, gen: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = gaussian(c.width, c.width, c.init_scale, gen, dtype)
        self.act = ACTIVATION_FNS[c.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.linear(x, self.weight))  # (batch, width)


class ResBlock(nn.Module):
    """x + W2 act(W1 x) with LayerNorm before the branch (pre), after the sum (post) or none."""

    def __init__(self, c: Knobs, gen: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        self.w1 = gaussian(c.width, c.width, c.init_scale, gen, dtype)
        self.w2 = gaussian(c.width, c.width, c.init_scale, gen, dtype)
        self.act = ACTIVATION_FNS[c.activation]
        self.mode = c.norm
        self.ln = nn.LayerNorm(c.width, dtype=dtype) if c.norm != "none" else nn.Identity()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(x, self.w1)), self.w2)  # (batch, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "pre":
            return x + self.branch(self.ln(x))
        if self.mode == "post":
            return self.ln(x + self.branch(x))  # type: ignore[no-any-return]
        return x + self.branch(x)


class Stack(nn.Module):
    """`depth` blocks in a row, then the final LayerNorm a pre-norm stack needs (as in GPT-2)."""

    def __init__(self, c: Knobs, gen: torch.Generator, dtype: torch.dtype, block: Block) -> None:
        super().__init__()
        self.layers = nn.ModuleList(block(c, gen, dtype) for _ in range(c.depth))
        pre = c.norm == "pre"
        self.ln_f = nn.LayerNorm(c.width, dtype=dtype) if pre else nn.Identity()

    def stability_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"layers.{i}", m) for i, m in enumerate(self.layers)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x)  # type: ignore[no-any-return]


class RNNCell(nn.Module):
    """h_t = act(u_t + W_hh h_{t-1}) where u_t = W_ih x_t is computed once for all t."""

    def __init__(self, c: Knobs, gen: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight_hh = nn.Parameter(orthogonal(c.width, c.init_scale, gen).to(dtype))
        self.act = ACTIVATION_FNS[c.activation]

    def forward(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.act(u + F.linear(h, self.weight_hh))  # (batch, width)


class Recurrent(nn.Module):
    """One recurrent layer unrolled over time; each call of `cell` (one time step) is a block."""

    def __init__(self, c: Knobs, gen: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        self.kind = c.family
        rnn = c.family == "rnn"
        self.weight_ih = gaussian(c.width, c.width, c.init_scale, gen, dtype) if rnn else None
        if c.family == "rnn":
            self.cell: nn.Module = RNNCell(c, gen, dtype)
        else:
            cls = nn.LSTMCell if c.family == "lstm" else nn.GRUCell
            gates = 4 if c.family == "lstm" else 3
            cell = torch.nn.utils.skip_init(cls, c.width, c.width, bias=False, dtype=dtype)  # type: ignore[no-untyped-call]
            with torch.no_grad():
                cell.weight_ih.copy_(gaussian(gates * c.width, c.width, c.init_scale, gen))
                for g in range(gates):  # each gate's recurrent matrix is scale x orthogonal
                    rows = slice(g * c.width, (g + 1) * c.width)
                    cell.weight_hh[rows].copy_(orthogonal(c.width, c.init_scale, gen))
            self.cell = cell
        self.width = c.width

    def stability_blocks(self) -> list[tuple[str, nn.Module]]:
        return [("cell", self.cell)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]  # x: (batch, seq_len, width)
        h = x.new_zeros(batch, self.width)
        c = x.new_zeros(batch, self.width)
        outputs = []
        if self.weight_ih is not None:
            u = F.linear(x, self.weight_ih)  # (batch, seq_len, width)
            for u_t in u.unbind(1):  # not u[:, t]: its backward would allocate all of u per step
                h = self.cell(u_t, h)
                outputs.append(h)
        elif self.kind == "lstm":
            for x_t in x.unbind(1):
                h, c = self.cell(x_t, (h, c))
                outputs.append(h)
        else:
            for x_t in x.unbind(1):
                h = self.cell(x_t, h)
                outputs.append(h)
        return torch.stack(outputs, dim=1)  # (batch, seq_len, width)


class TransformerBlock(nn.Module):
    """An encoder block (self-attention then MLP), pre-norm or post-norm, nanoGPT style."""

    def __init__(self, c: Knobs, gen: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        d, s = c.width, c.init_scale
        self.heads = 4 if d % 4 == 0 else 1
        self.qkv = gaussian(3 * d, d, s, gen, dtype)
        self.proj = gaussian(d, d, s, gen, dtype)
        self.fc = gaussian(4 * d, d, s, gen, dtype)
        self.fc_out = gaussian(d, 4 * d, s, gen, dtype)
        self.act = ACTIVATION_FNS[c.activation]
        norm = c.norm != "none"
        self.ln1 = nn.LayerNorm(d, dtype=dtype) if norm else nn.Identity()
        self.ln2 = nn.LayerNorm(d, dtype=dtype) if norm else nn.Identity()
        self.pre = c.norm != "post"

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (batch, seq_len, width)
        q, k, v = F.linear(x, self.qkv).split(d, dim=-1)  # type: ignore[no-untyped-call]  # 3 x (batch, seq_len, width)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)  # (batch, heads, seq_len, head_dim)
        return F.linear(y.transpose(1, 2).reshape(b, t, d), self.proj)  # (batch, seq_len, width)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(x, self.fc)), self.fc_out)  # (batch, seq_len, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre:
            x = x + self.attention(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attention(x))
        return self.ln2(x + self.mlp(x))  # type: ignore[no-any-return]


MATRICES = {"mlp": 1, "resmlp": 2, "rnn": 2, "lstm": 8, "gru": 6, "transformer": 12}
"""Weights per layer of each family, in width x width matrices (a transformer's qkv 3, proj 1 and MLP
4 + 4; an LSTM's 4 gates' input and recurrent weights; LayerNorms and the readout are smaller)."""

BUILDERS: dict[str, Block] = {
    "mlp": lambda c, gen, dtype: Stack(c, gen, dtype, Dense),
    "resmlp": lambda c, gen, dtype: Stack(c, gen, dtype, ResBlock),
    "rnn": Recurrent,
    "lstm": Recurrent,
    "gru": Recurrent,
    "transformer": lambda c, gen, dtype: Stack(c, gen, dtype, TransformerBlock),
}


# sigma_w at which a bias-free deep net's backward gain chi = sigma_w^2 E[phi'(h)^2] is 1
# (tanh, linear: 1; ReLU: He's sqrt 2; GELU has no fixed point without bias: He's value).
# the bias-free MLP's mean-field critical sigma_w (chi_1 = 1) for tanh, linear and relu; gelu has
# none (chi_1 -> sigma^2 / 4 for small activations, sigma^2 / 2 for large): sqrt(2) is relu's, ordered
# for gelu. The remedy is re-judged on vanishing (remedies.judged_on), which shows where it is not.
CRITICAL_SCALE = {"tanh": 1.0, "linear": 1.0, "relu": math.sqrt(2), "gelu": math.sqrt(2)}
SEARCH_BASE: dict[str, Scalar] = {"width": 32, "batch_size": 8}  # sized for a search on a CPU


def _readout(k: Knobs, gen: torch.Generator, last: bool) -> Callable[..., torch.Tensor]:
    """The zoo's loss: the fixed random readout per token, or on the last step alone (`last`)."""
    sequence = k.family in RECURRENT or k.family == "transformer"
    shape = (k.batch_size, k.seq_len) if sequence else (k.batch_size,)
    labels = torch.randint(0, NUM_CLASSES, shape, generator=gen)
    if not last:
        return readout_loss(k.width, gen, labels)
    per_step = readout_loss(k.width, gen, labels[:, -1])
    return lambda output, inputs: per_step(output[:, -1], inputs)


# width-sized tensors a block call keeps per row, about twice what autograd saves (the probe keeps
# outputs and their gradients too): saved 1.5-3 on the MLPs and the RNN, 8.2-8.7 on the LSTM and GRU
# cells, 14.2 on a transformer block (its attention saves no seq_len^2 matrix)
SAVED_PER_ROW = {"lstm": 18, "gru": 18, "transformer": 30}


class Family:
    """One zoo family as a Subject (`Family("mlp")`): its knobs come from `families.FAMILIES`."""

    def __init__(self, name: str) -> None:
        knob_specs(name)  # a ConfigError, with a 'did you mean', where `name` is no zoo family
        self.name = name
        self.init_knob: str | None = "init_scale"
        # critical for a bias-free MLP; a guess elsewhere (GELU, the recurrent cells: remedies.critical_init)
        self.critical_note = "its activation's mean-field critical value"

    def __repr__(self) -> str:
        return f"Family({self.name!r})"

    def config(self, **values: Scalar) -> Config:
        return Config.of(self.name, **values)

    def space(self, **fixed: Scalar) -> Space:
        """depth (or seq_len for recurrent families) x init_scale around SEARCH_BASE and `fixed`."""
        first = Axis.range("seq_len", 1, 256) if self.name in RECURRENT else Axis.range("depth", 1, 64)
        if self.name == "transformer":
            first = Axis.range("depth", 1, 24)
            fixed = {"seq_len": 16, **fixed}
        label = "-".join([self.name, *(str(v) for k, v in fixed.items() if k == "norm")])
        return Space(label, self.config(**{**SEARCH_BASE, **fixed}), (first, Axis("init_scale", INIT_SCALES)))

    def build(self, config: Config, last: bool = False) -> Built:
        """The model, inputs and readout loss (per token, or on the last step), all from the seed."""
        k = Knobs.of(config)
        gen = generator(config.run.seed)
        device, dtype = torch.device(config.run.device), torch_dtype(config.run.dtype)
        model = BUILDERS[k.family](k, gen, dtype)  # its weights drawn in float64, held in dtype
        loss = _readout(k, gen, last)
        sequence = k.family in RECURRENT or k.family == "transformer"
        shape = (k.batch_size, k.seq_len) if sequence else (k.batch_size,)
        x = torch.randn(*shape, k.width, generator=gen, dtype=torch.float64)
        if device.type != "cpu":
            model.to(device=device)
        blocks = tuple(model.stability_blocks())  # type: ignore[operator]
        note = "blocks: time steps of the cell" if k.family in RECURRENT else f"blocks: layers ({k.depth})"
        return Built(model, x.to(device=device, dtype=dtype), loss, blocks, note)

    def last_step(self, config: Config) -> Built | None:
        return self.build(config, last=True) if self.name in RECURRENT else None

    def memory_estimate(self, config: Config) -> int:
        """Bytes of float64 activations kept for backward (SAVED_PER_ROW x the rows and width of every
        block call) and of the weights in float64, x4 (weight, gradient, two Adam moments): `--knob
        width=20000` at 8 layers (3.2e9 weights) was built, its activations' 7-59 MiB under the budget,
        and the process killed."""
        k = Knobs.of(config)
        per_block = SAVED_PER_ROW.get(k.family, 6)
        # rows a block's call takes: a recurrent cell's, one step's (its seq_len calls are the blocks:
        # counting every token in each read seq_len^2, 12 GiB for a width-256 RNN at 256 steps that
        # peaks at ~0.3 GiB, skipped as too large)
        tokens = k.batch_size * (k.seq_len if k.family == "transformer" else 1)
        blocks = k.seq_len if k.family in RECURRENT else k.depth
        layers = 1 if k.family in RECURRENT else k.depth  # one recurrent layer, its cell called per step
        weights = MATRICES[k.family] * k.width * k.width * layers
        return 8 * per_block * tokens * k.width * blocks + PER_PARAMETER * 8 * weights

    def critical_init(self, config: Config) -> float:
        return CRITICAL_SCALE[Knobs.of(config).activation] if "activation" in config.values else 1.0

    def variants(self, config: Config) -> dict[str, Config | None]:
        values = config.values
        pre = config.with_knobs(norm="pre") if values.get("norm") not in (None, "pre") else None
        lstm = None
        if self.name == "rnn":
            kept = {k: v for k, v in values.items() if k != "activation"}
            lstm = Config("lstm", tuple(kept.items()), config.run)
        return {"pre-norm": pre, "lstm": lstm}


def targets() -> dict[str, Space]:
    """The searches `stabilitycheck zoo` runs: one per family, and per norm placement of the residual
    ones, sized to finish fast on a CPU."""
    fam = {name: Family(name) for name in ("mlp", "resmlp", "rnn", "lstm", "gru", "transformer")}
    spaces = [
        fam["mlp"].space(),
        fam["resmlp"].space(norm="post"),
        fam["resmlp"].space(norm="pre"),
        fam["rnn"].space(),
        fam["lstm"].space(),
        fam["gru"].space(),
        fam["transformer"].space(norm="post"),
        fam["transformer"].space(norm="pre"),
    ]
    return {s.label: s for s in spaces}


__all__ = ["Family", "dataclasses", "targets"]
