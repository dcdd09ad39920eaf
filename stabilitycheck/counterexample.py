"""What a search returns: the Counterexample (an exploding Config, judged, with its remedies) and the
SearchResult around it; both round-trip through JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stabilitycheck.config import Config
from stabilitycheck.judgement import Judgement
from stabilitycheck.remedies import Remedy
from stabilitycheck.space import Space
from stabilitycheck.verdicts import Limits


@dataclass(frozen=True)
class Counterexample:
    """An exploding Config with its judgement over seeds, the limits used and the remedies tried."""

    label: str
    config: Config
    judgement: Judgement
    limits: Limits
    remedies: tuple[Remedy, ...]

    @property
    def culprit(self) -> str:
        return self.judgement.culprit

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "config": self.config.to_dict(),
            "judgement": self.judgement.to_dict(),
            "limits": vars(self.limits),
            "remedies": [r.to_dict() for r in self.remedies],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Counterexample:
        return cls(
            label=data["label"],
            config=Config.from_dict(data["config"]),
            judgement=Judgement.from_dict(data["judgement"]),
            limits=Limits(**data["limits"]),
            remedies=tuple(Remedy.from_dict(r) for r in data["remedies"]),
        )


@dataclass(frozen=True)
class SearchResult:
    """The outcome of one search: the counterexample (or None) and what it cost; `skipped` holds the
    Configs not probed (too large for free memory, over the time budget, or failing in user code)."""

    space: Space
    counterexample: Counterexample | None
    probes: int
    points: int
    elapsed: float
    largest_stable: Config | None
    largest_stable_judgement: Judgement | None = None
    interrupted: bool = False
    skipped: tuple[tuple[Config, str], ...] = field(default=())
    top_stable: bool = False  # the top corner judged stable: the space is not monotone in its knobs
    minimal: bool = True  # False: interrupted before the descent verified the counterexample 1-minimal
    unjudged: tuple[tuple[Config, str], ...] = ()  # one-step-lower neighbours skipped: minimality unverified
    # a point at or below the counterexample in every knob that failed too, what it read, and the seed
    # it failed on alone (the screen's; None: on the full rule): the criteria are not monotone there,
    # and the point reported is 1-minimal, not the smallest
    below: tuple[Config, str, int | None] | None = None
    last_step_probes: int = 0  # a recurrent subject's through-time probes, which `probes` leaves out
    limits: Limits | None = None  # what it was judged on (a stable row's bracket says where it lies)
    replayed: bool = False  # a stored counterexample judged again (--replay), no search

    @property
    def shown(self) -> Judgement | None:
        """The judgement its row shows: the counterexample's, else the largest stable point's."""
        return self.counterexample.judgement if self.counterexample else self.largest_stable_judgement
