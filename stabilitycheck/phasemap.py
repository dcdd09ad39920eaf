"""Phase map: over two knobs, the frontier between stable and exploding configurations (and, when a
vanishing limit is set, vanishing ones), each point judged by its verdict over seeds (`seeds.assess`)
and the frontier traced by `staircase.trace` with O(nx + ny) verdicts instead of nx * ny.

For each y on its grid the frontier is the smallest x whose verdict explodes; explosion is assumed
monotone in x (deeper, longer or larger-scaled explodes more), and checked where the trace looks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stabilitycheck._validation import model_failure
from stabilitycheck.alarms import stop_seen
from stabilitycheck.config import Config
from stabilitycheck.errors import NoLastStep, UsageError
from stabilitycheck.judgement import Judgement
from stabilitycheck.seeds import SeedProbes, assess
from stabilitycheck.space import RUN_AXES, Axis, Space
from stabilitycheck.spread import Spread
from stabilitycheck.staircase import Edge, recheck, trace
from stabilitycheck.subject import Built, Subject
from stabilitycheck.verdicts import Limits
from stabilitycheck.verdicts import judge as judge_seed

LOSSES = ("default", "last")


@dataclass(frozen=True)
class Point:
    """One measured grid point (x, y are grid indices): its verdict over seeds, in short."""

    x: int
    y: int
    exploded: bool  # a criterion other than vanishing fired
    vanished: bool
    criteria: tuple[str, ...]
    growth: Spread
    seeds: int
    fired_seeds: int  # seeds whose own verdict fired on a criterion other than vanishing

    @classmethod
    def of(cls, x: int, y: int, j: Judgement, limits: Limits) -> Point:
        names = j.verdict.names
        vanished = "vanishing" in names
        exploded = any(n != "vanishing" for n in names)
        # a seed that fired on vanishing alone did not explode: the band's 'all seeds' end counted it
        fired = sum(any(n != "vanishing" for n in judge_seed(v, limits).names) for v in j.values)
        return cls(x, y, exploded, vanished, names, j.growth, len(j.seeds), fired)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "criteria": list(self.criteria)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        return cls(**{**d, "criteria": tuple(d["criteria"]), "growth": Spread.from_dict(d["growth"])})


@dataclass(frozen=True)
class PhaseMap:
    """The measured points and frontiers of a two-knob map, with what they cost."""

    label: str
    base: Config
    x: Axis
    y: Axis
    limits: Limits
    loss: str
    init_knob: str | None
    points: tuple[Point, ...]
    explode: tuple[Edge, ...]
    vanish: tuple[Edge, ...] | None
    violations: tuple[str, ...]
    elapsed: float
    interrupted: bool
    stopped: str = ""  # why tracing stopped early other than Ctrl-C: the model's code failed at a point

    @property
    def verdicts(self) -> int:
        """Grid points judged (each a verdict over up to run.seeds seeds)."""
        return len(self.points)

    @property
    def probes(self) -> int:
        """Seeds probed in all."""
        return sum(p.seeds for p in self.points)

    @property
    def grid(self) -> int:
        return len(self.x.values) * len(self.y.values)

    def point(self, x: int, y: int) -> Point | None:
        return next((p for p in self.points if (p.x, p.y) == (x, y)), None)

    def band(self, y: int, vanishing: bool = False) -> tuple[int | None, int | None]:
        """Where the seeds began to fire in row y: the smallest measured x where one of the seeds spent
        fired (exploded, or with `vanishing`, vanished), and where all of them did (None where no
        measured point did). Only the points the trace measured and the seeds their verdicts spent:
        not each seed's own frontier."""
        lim = self.limits.vanishing
        row = sorted((p for p in self.points if p.y == y), key=lambda p: p.x)
        if vanishing and lim is not None:
            some = [p.x for p in row if p.vanished or p.growth.low < 1 / lim]
            every = [p.x for p in row if p.growth.high < 1 / lim]
        else:
            some = [p.x for p in row if p.exploded or p.fired_seeds > 0]
            every = [p.x for p in row if p.exploded and p.fired_seeds == p.seeds]
        return (some[0] if some else None), (every[0] if every else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "base": self.base.to_dict(),
            "x": {"name": self.x.name, "values": list(self.x.values)},
            "y": {"name": self.y.name, "values": list(self.y.values)},
            "limits": vars(self.limits),
            "loss": self.loss,
            "init_knob": self.init_knob,
            "points": [p.to_dict() for p in self.points],
            "explode": [vars(e) for e in self.explode],
            "vanish": None if self.vanish is None else [vars(e) for e in self.vanish],
            "violations": list(self.violations),
            "elapsed": self.elapsed,
            "interrupted": self.interrupted,
            "stopped": self.stopped,
            "verdicts": self.verdicts,
            "probes": self.probes,
            "grid": self.grid,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseMap:
        return cls(
            label=d["label"],
            base=Config.from_dict(d["base"]),
            x=Axis(d["x"]["name"], tuple(d["x"]["values"])),
            y=Axis(d["y"]["name"], tuple(d["y"]["values"])),
            limits=Limits(**d["limits"]),
            loss=d["loss"],
            init_knob=d["init_knob"],
            points=tuple(Point.from_dict(p) for p in d["points"]),
            explode=tuple(Edge(**e) for e in d["explode"]),
            vanish=None if d["vanish"] is None else tuple(Edge(**e) for e in d["vanish"]),
            violations=tuple(d["violations"]),
            elapsed=d["elapsed"],
            interrupted=d["interrupted"],
            stopped=d.get("stopped", ""),
        )


class LastStep:
    """A sequence subject judged on its loss on the last step alone (the through-time growth)."""

    def __init__(self, subject: Subject) -> None:
        if subject.last_step(subject.config()) is None:
            raise UsageError(f"{NoLastStep.said(subject.name)}; drop --loss")
        self.subject = subject
        self.name, self.init_knob = subject.name, subject.init_knob
        self.own: set[Config] = set()  # points judged on the subject's own loss (`build`), any seed

    def build(self, config: Config) -> Built:
        """The subject's last-step build; its own where it has none at this point, kept in `own` for
        the map to say (a model file whose cell is called once, at seq_len 1, or whose calls stop
        forming one chain at some knob value)."""
        built = self.subject.last_step(config)
        if built is None:
            self.own.add(config.with_run(seed=0))
            return self.subject.build(config)
        return built

    def last_step(self, config: Config) -> Built | None:
        """None: judged on its last step already, it has no second reading."""
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.subject, name)


def _axis(given: str | Axis, space: Space) -> Axis:
    """The Axis of a knob: given, or the space's grid of that name."""
    if isinstance(given, Axis):
        axis = given
    else:
        found = [a for a in space.axes if a.name == given]
        if not found:
            raise UsageError(
                f"knob {given!r} has no grid in the space of {space.label}; give one, "
                f"e.g. --knob {given}=1:16 (API: Axis.range({given!r}, 1, 16))"
            )
        axis = found[0]
    if axis.name not in RUN_AXES:
        space.base.knob(axis.name)  # a ConfigError naming the knobs there are
    return axis


def phase_map(
    subject_or_spec: Subject | str,
    *,
    x: str | Axis,
    y: str | Axis,
    space: Space | None = None,
    limits: Limits | None = None,
    seeds: int | None = None,
    loss: str = "default",
    progress: Callable[[str], None] | None = None,
    on_point: Callable[[PhaseMap], None] | None = None,
) -> PhaseMap:
    """Trace the frontier over knobs `x` (the one explosion is monotone in) and `y` around `space`'s
    base Config (default: the subject's space; knobs given as names take that space's grids).
    `loss="last"`: judge a sequence subject on its last step. Ctrl-C returns what was traced, as does
    the model's own code failing at a point (`stopped` says how: the CLI prints and writes the map,
    then exits 2)."""
    from stabilitycheck.subjects import resolve

    subject = resolve(subject_or_spec) if isinstance(subject_or_spec, str) else subject_or_spec
    if loss not in LOSSES:
        raise UsageError(f"loss={loss!r} is not allowed; expected one of {LOSSES}")
    judged: Subject = LastStep(subject) if loss == "last" else subject
    space = space or subject.space()
    xa, ya = (dataclasses.replace(a, values=tuple(a.values)) for a in (_axis(x, space), _axis(y, space)))
    if xa.name == ya.name:
        raise UsageError(f"x and y are both {xa.name!r}; map two different knobs")
    base = space.base if seeds is None else space.base.with_run(seeds=seeds)
    lim = limits or Limits()
    cache: dict[tuple[int, int], Point] = {}
    probes = SeedProbes()  # each (point, seed) probed once: a frontier point's full verdict reuses them

    def measured(what: str) -> dict[int, dict[int, bool]]:
        """Per row, x -> whether each measured point there `what` ('exploded', 'vanished')."""
        rows: dict[int, dict[int, bool]] = {}
        for (i, j), p in cache.items():
            rows.setdefault(j, {})[i] = getattr(p, what)
        return rows

    explode: list[Edge] = []
    vanish: list[Edge] | None = [] if lim.vanishing is not None else None
    notes: list[str] = []
    began = time.monotonic()

    def snapshot(interrupted: bool, stopped: str = "") -> PhaseMap:
        def rows(edges: list[Edge]) -> tuple[Edge, ...]:
            return (*edges, *(Edge(j, None, "untraced") for j in range(len(edges), len(ya.values))))

        return PhaseMap(
            label=space.label,
            base=base,
            x=xa,
            y=ya,
            limits=lim,
            loss=loss,
            init_knob=subject.init_knob,
            points=tuple(cache[k] for k in sorted(cache, key=lambda k: (k[1], k[0]))),
            explode=rows(explode),
            vanish=None if vanish is None else rows(vanish),
            violations=(*notes, *own_loss()),
            elapsed=time.monotonic() - began,
            interrupted=interrupted,
            stopped=stopped,
        )

    def own_loss() -> tuple[str, ...]:
        """A note naming the points a last-step map judged on the model's own loss (LastStep.build)."""
        if not isinstance(judged, LastStep):
            return ()
        own = [(i, j) for i, j in sorted(cache) if base_point(i, j).with_run(seed=0) in judged.own]
        if not own:
            return ()
        shown = ", ".join(f"{xa.name}={xa.values[i]} {ya.name}={ya.values[j]}" for i, j in own[:4])
        return (
            f"{len(own)} point{'s' * (len(own) != 1)} judged on the model's own loss, which has no last step "
            f"beside it there (its block called once, or its calls not one chain): {shown}"
            f"{' ...' * (len(own) > 4)}",
        )

    def base_point(i: int, j: int) -> Config:
        return base.with_knobs(**{xa.name: xa.values[i], ya.name: ya.values[j]})

    def judge(i: int, j: int) -> Point:
        if (i, j) not in cache:
            config = base_point(i, j)
            cache[i, j] = p = Point.of(
                i, j, assess(config, judged, lim, probes, every=False, apart=True), lim
            )
            if progress is not None:
                state = "explodes" if p.exploded else "vanishes" if p.vanished else "stable"
                progress(
                    f"{len(cache)} verdicts of {len(xa.values) * len(ya.values)}: "
                    f"{ya.name}={ya.values[j]} {xa.name}={xa.values[i]} {state} "
                    f"(growth {p.growth.describe()} over {p.seeds} seed{'s' * (p.seeds != 1)})"
                )
            if on_point is not None:
                on_point(snapshot(False))
        return cache[i, j]

    nx, ny = len(xa.values), len(ya.values)
    if progress is not None:
        progress(
            f"mapping {space.label}: {xa.name} ({nx}) x {ya.name} ({ny}), up to {base.run.seeds} seeds each"
        )
    try:
        names = (lambda i: f"{xa.name}={xa.values[i]}", lambda j: f"{ya.name}={ya.values[j]}")
        trace(lambda i, j: judge(i, j).exploded, nx, ny, explode, notes, names)
        if vanish is not None:
            trace(lambda i, j: judge(i, j).vanished, nx, ny, vanish, notes, names, "vanishes")
            # each trace met points of the other's: a row is checked on every point measured in it
            recheck(lambda i, j: judge(i, j).exploded, measured("exploded"), explode, notes, names)
            recheck(lambda i, j: judge(i, j).vanished, measured("vanished"), vanish, notes, names, "vanishes")
        for edge in explode:  # the frontier's point names every criterion it fires on, not the first
            if edge.x is not None:
                config = base_point(edge.x, edge.y)
                cache[edge.x, edge.y] = Point.of(edge.x, edge.y, assess(config, judged, lim, probes), lim)
    except KeyboardInterrupt:
        stop_seen()
        return snapshot(True)
    except (Exception, SystemExit) as exc:  # the model's code failed at a point: what was traced is
        why = model_failure(exc)  # kept (the search skips such a point); a bug of this package or
        if why is None:  # bad input is raised
            raise
        return snapshot(True, why)
    return snapshot(False)


def theory(pm: PhaseMap, vanishing: bool = False) -> tuple[int | None, ...] | None:
    """Per row, the smallest x index whose mean-field growth passes the limit (None: none in range),
    for zoo subjects the theory covers (see meanfield.zoo_growth); None for the rest."""
    from stabilitycheck.meanfield import zoo_growth

    limit = pm.limits.vanishing if vanishing else pm.limits.growth
    if limit is None or pm.base.family is None:
        return None
    out: list[int | None] = []
    for yv in pm.y.values:
        found: int | None = None
        for i, xv in enumerate(pm.x.values):
            g = zoo_growth(pm.base.subject, {**pm.base.values, pm.x.name: xv, pm.y.name: yv})
            if g is None:
                return None
            if (g < 1 / limit) if vanishing else (g > limit):
                found = i
                break
        out.append(found)
    return tuple(out)
