"""The built-in Subjects: mlp, resmlp, rnn, lstm, gru and transformer, in mean-field parametrisation.

Every weight matrix is N(0, init_scale**2 / fan_in); recurrent matrices are init_scale x an
orthogonal matrix (spectral radius exactly init_scale); biases are absent or zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from stabilitycheck.config import Config
from stabilitycheck.errors import ConfigError
from stabilitycheck.subject import NUM_CLASSES, Built, generator, readout_loss, torch_dtype

Activation = Callable[[torch.Tensor], torch.Tensor]
ACTIVATION_FNS: dict[str, Activation] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "linear": lambda x: x,
    "gelu": F.gelu,
}


def gaussian(rows: int, cols: int, scale: float, gen: torch.Generator) -> nn.Parameter:
    """A (rows, cols) weight drawn from N(0, scale**2 / cols) in float64."""
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return nn.Parameter(w * (scale / cols**0.5))


def orthogonal(n: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    """scale x a random orthogonal (n, n) matrix: every singular value equals scale."""
    return nn.init.orthogonal_(torch.empty(n, n, dtype=torch.float64), gain=scale, generator=gen)


class Dense(nn.Module):
    """y = act(W x), the block of the plain MLP."""

    def __init__(self, width: int, scale: float, act: Activation, gen: torch.Generator) -> None:
        super().__init__()
        self.weight = gaussian(width, width, scale, gen)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.linear(x, self.weight))  # (batch, width)


class ResBlock(nn.Module):
    """x + W2 act(W1 x) with LayerNorm before the branch (pre), after the sum (post) or none."""

    def __init__(self, c: Config, gen: torch.Generator) -> None:
        super().__init__()
        self.w1 = gaussian(c.width, c.width, c.init_scale, gen)
        self.w2 = gaussian(c.width, c.width, c.init_scale, gen)
        self.act = ACTIVATION_FNS[c.activation]
        self.mode = c.norm
        self.ln = nn.LayerNorm(c.width, dtype=torch.float64) if c.norm != "none" else nn.Identity()

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

    def __init__(self, c: Config, block: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(block() for _ in range(c.depth))
        pre = c.norm == "pre" and c.family != "mlp"
        self.ln_f = nn.LayerNorm(c.width, dtype=torch.float64) if pre else nn.Identity()

    def stability_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"layers.{i}", m) for i, m in enumerate(self.layers)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x)  # type: ignore[no-any-return]


class RNNCell(nn.Module):
    """h_t = act(u_t + W_hh h_{t-1}) where u_t = W_ih x_t is computed once for all t."""

    def __init__(self, c: Config, gen: torch.Generator) -> None:
        super().__init__()
        self.weight_hh = nn.Parameter(orthogonal(c.width, c.init_scale, gen))
        self.act = ACTIVATION_FNS[c.activation]

    def forward(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.act(u + F.linear(h, self.weight_hh))  # (batch, width)


class Recurrent(nn.Module):
    """One recurrent layer unrolled over time; each call of `cell` (one time step) is a block."""

    def __init__(self, c: Config, gen: torch.Generator) -> None:
        super().__init__()
        self.kind = c.family
        self.weight_ih = gaussian(c.width, c.width, c.init_scale, gen) if c.family == "rnn" else None
        if c.family == "rnn":
            self.cell: nn.Module = RNNCell(c, gen)
        else:
            cls = nn.LSTMCell if c.family == "lstm" else nn.GRUCell
            gates = 4 if c.family == "lstm" else 3
            cell = torch.nn.utils.skip_init(cls, c.width, c.width, bias=False, dtype=torch.float64)
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

    def __init__(self, c: Config, gen: torch.Generator) -> None:
        super().__init__()
        d, s = c.width, c.init_scale
        self.heads = 4 if d % 4 == 0 else 1
        self.qkv = gaussian(3 * d, d, s, gen)
        self.proj = gaussian(d, d, s, gen)
        self.fc = gaussian(4 * d, d, s, gen)
        self.fc_out = gaussian(d, 4 * d, s, gen)
        self.act = ACTIVATION_FNS[c.activation]
        norm = c.norm != "none"
        self.ln1 = nn.LayerNorm(d, dtype=torch.float64) if norm else nn.Identity()
        self.ln2 = nn.LayerNorm(d, dtype=torch.float64) if norm else nn.Identity()
        self.pre = c.norm != "post"

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (batch, seq_len, width)
        q, k, v = F.linear(x, self.qkv).split(d, dim=-1)  # 3 x (batch, seq_len, width)
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


BUILDERS: dict[str, Callable[[Config, torch.Generator], nn.Module]] = {
    "mlp": lambda c, gen: Stack(c, lambda: Dense(c.width, c.init_scale, ACTIVATION_FNS[c.activation], gen)),
    "resmlp": lambda c, gen: Stack(c, lambda: ResBlock(c, gen)),
    "rnn": Recurrent,
    "lstm": Recurrent,
    "gru": Recurrent,
    "transformer": lambda c, gen: Stack(c, lambda: TransformerBlock(c, gen)),
}


def build(config: Config) -> Built:
    """Build the zoo model of `config.family` with its inputs and readout loss, all from the seed."""
    if config.family not in BUILDERS:
        raise ConfigError(
            f"Config.family={config.family!r} is not a zoo family; expected one of {tuple(BUILDERS)}"
        )
    gen = generator(config.seed)
    model = BUILDERS[config.family](config, gen)
    shape = (config.batch_size, config.seq_len) if config.is_sequence else (config.batch_size,)
    loss = readout_loss(config.width, gen, torch.randint(0, NUM_CLASSES, shape, generator=gen))
    x = torch.randn(*shape, config.width, generator=gen, dtype=torch.float64)
    device, dtype = torch.device(config.device), torch_dtype(config.dtype)
    model.to(device=device, dtype=dtype)
    blocks = tuple(model.stability_blocks())  # type: ignore[operator]
    return Built(model=model, inputs=x.to(device=device, dtype=dtype), loss_fn=loss, blocks=blocks)


class Zoo:
    """The zoo as a Subject: `config.family` picks the builder."""

    name = "zoo"

    def build(self, config: Config) -> Built:
        return build(config)
