"""Judgement: a Config's verdict over its initialisation distribution (seeds.assess makes it), with
what it cost, the spreads over seeds and the measurement of the quantile seed; its JSON form."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stabilitycheck.growthkind import Growth
from stabilitycheck.measurement import Measurement
from stabilitycheck.spread import Spread
from stabilitycheck.verdicts import Verdict


@dataclass(frozen=True)
class Judgement:
    """A Config's verdict over its initialisation distribution, with what it cost and the spreads."""

    verdict: Verdict
    seeds: tuple[int, ...]
    exploded_seeds: int
    growth: Spread
    grad_norm: Spread
    skipped_steps: int
    culprit: str
    kind: Growth
    # a recurrent subject's growth under its own loss, every later token's gradient summed in (None for
    # others): its `growth` is the through-time growth, the loss on the last step (`assess`)
    per_token: Spread | None
    measurement: Measurement  # the seed whose growth is the quantile: its per-block profile is shown
    measured_seed: int  # which seed `measurement` is
    values: tuple[dict[str, float], ...] = ()  # per seed spent, each criterion's value (verdicts.values)
    # True where `measurement` is a recurrent subject's probe under its own loss, which went non-finite
    # (the quantile seed's, or where the verdict fired on it, the first seed's that did), shown for
    # where; else the quantile seed's probe of the growth judged (through time, for a recurrent one)
    own_loss: bool = False
    # the criteria any one seed fired on by itself, in CRITERIA's order (the words of `failures`)
    seeds_fired: tuple[str, ...] = ()

    @property
    def exploded(self) -> bool:
        return self.verdict.exploded

    @property
    def through_time(self) -> Spread | None:
        """The through-time growth (the loss on the last step) where it was measured, the growth
        judged then; None where it was not (no recurrent subject, or a file with no last step)."""
        return self.growth if self.per_token is not None else None

    @property
    def failures(self) -> str:
        """'2 exploded' (a loss that rose beside it included), '2 diverged' where the seeds fired on
        divergence alone (the loss rose: no gradient need have grown), or '2 failed' where on
        vanishing or stall (the gradient shrank or the loss stalled), beside an explosion or not: how
        many seeds failed on their own, worded by what they fired on (worded by the verdict, a stable
        one called a seed that vanished 'exploded'; JSON written before `seeds_fired` still is)."""
        if self.seeds_fired:
            names = set(self.seeds_fired)
            failed = bool(names & {"vanishing", "stall"})
        else:  # JSON written before seeds_fired: worded by its verdict, as it was then
            names = set(self.verdict.names)
            failed = bool(names) and names <= {"vanishing", "stall", "divergence"}
        if names and names <= {"divergence"}:
            word = "diverged"
        elif failed:
            word = "failed"
        else:
            word = "exploded"
        return f"{self.exploded_seeds} {word}"

    def summary(self) -> str:
        """'growth 36 (18-126) over 5 seeds, 2 exploded': what the numbers are ('growth through time'
        where that is the growth judged: `per_token` holds the model's own)."""
        n = len(self.seeds)
        what = "growth through time (loss on the last step)" if self.per_token else "growth"
        return f"{what} {self.growth.describe()} over {n} seed{'s' * (n != 1)}, {self.failures}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.to_dict(),
            "seeds": list(self.seeds),
            "exploded_seeds": self.exploded_seeds,
            "growth": vars(self.growth),
            "grad_norm": vars(self.grad_norm),
            "skipped_steps": self.skipped_steps,
            "culprit": self.culprit,
            "kind": {
                "kind": self.kind.kind,
                "rate": vars(self.kind.rate),
                "exponent": vars(self.kind.exponent),
            },
            "per_token": None if self.per_token is None else vars(self.per_token),
            "through_time": None if self.through_time is None else vars(self.through_time),
            "measurement": self.measurement.to_dict(),
            "measured_seed": self.measured_seed,
            "values": [dict(v) for v in self.values],
            "own_loss": self.own_loss,
            "seeds_fired": list(self.seeds_fired),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Judgement:
        k = d["kind"]
        return cls(
            verdict=Verdict.from_dict(d["verdict"]),
            seeds=tuple(d["seeds"]),
            exploded_seeds=d["exploded_seeds"],
            growth=Spread.from_dict(d["growth"]),
            grad_norm=Spread.from_dict(d["grad_norm"]),
            skipped_steps=d["skipped_steps"],
            culprit=d["culprit"],
            kind=Growth(k["kind"], Spread.from_dict(k["rate"]), Spread.from_dict(k["exponent"])),
            per_token=None if d.get("per_token") is None else Spread.from_dict(d["per_token"]),
            measurement=Measurement.from_dict(d["measurement"]),
            measured_seed=d["measured_seed"],
            values=tuple(
                {k: math.nan if x is None else x for k, x in v.items()} for v in d.get("values", [])
            ),
            own_loss=d.get("own_loss", False),
            seeds_fired=tuple(d.get("seeds_fired", ())),
        )
