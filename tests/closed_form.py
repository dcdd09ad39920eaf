"""A cheap subject whose growth is a closed-form function of its knobs, for checking the search and
the phase map against an exhaustive grid judged by hand.

`depth` bias-free linear blocks on a width-2 input, each weight init_scale x gain(seed) x identity:
dL/dx = (init_scale x gain(seed)) ** depth x dL/dy exactly, so a seed's growth is that power.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stabilitycheck.config import Config
from stabilitycheck.families import Scalar
from stabilitycheck.space import Space
from stabilitycheck.subject import Built

NAME = "closed/form.py"  # a model-file subject name: its knobs are free
LIMITS_KW = {"grad_norm": None, "divergence": None}  # growth alone: the criterion with a closed form


class ScaledIdentity:
    """The Subject described in the module docstring; `gain(seed)` is 1 unless given, and
    `memory(config)` (bytes, or None) is the memory estimate. Counts the builds per Config."""

    name = NAME
    init_knob = "init_scale"
    critical_note = "its critical value"

    def __init__(
        self,
        gain: Callable[[int], float] = lambda seed: 1.0,
        memory: Callable[[Config], int | None] = lambda config: None,
    ) -> None:
        self.gain, self.memory = gain, memory
        self.builds: dict[Config, int] = {}

    def config(self, **values: Scalar) -> Config:
        return Config.of(NAME, **{"depth": 1, "init_scale": 1.0, **values})

    def space(self) -> Space:
        raise NotImplementedError  # the tests give their spaces

    def growth(self, config: Config) -> float:
        """The closed form: (init_scale x gain(seed)) ** depth."""
        return (float(config.knob("init_scale")) * self.gain(config.run.seed)) ** int(config.knob("depth"))

    def build(self, config: Config) -> Built:
        self.builds[config] = self.builds.get(config, 0) + 1
        scale = float(config.knob("init_scale")) * self.gain(config.run.seed)
        layers = [nn.Linear(2, 2, bias=False) for _ in range(int(config.knob("depth")))]
        with torch.no_grad():
            for layer in layers:
                layer.weight.copy_(scale * torch.eye(2))
        inputs = torch.ones(1, 2)
        return Built(
            nn.Sequential(*layers),
            inputs,
            lambda out, _: out.sum(),
            tuple((str(i), layer) for i, layer in enumerate(layers)),
        )

    def memory_estimate(self, config: Config) -> int | None:
        return self.memory(config)

    def critical_init(self, config: Config) -> Scalar | None:
        return 1.0

    def variants(self, config: Config) -> dict[str, Config | None]:
        return {}

    def last_step(self, config: Config) -> Built | None:
        return None
