"""Search: the smallest exploding Config of a Space: Hypothesis finds it, a pass verifies it 1-minimal."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, event, given, note, settings, target
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.database import ExampleDatabase

from stabilitycheck.config import Config
from stabilitycheck.probing import Measurement, probe
from stabilitycheck.remedies import REMEDIES, Remedy
from stabilitycheck.space import Space
from stabilitycheck.subject import Subject
from stabilitycheck.verdicts import Limits, Verdict, verdict

Index = tuple[int, ...]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Counterexample:
    """An exploding Config with what was measured, the culprit block and the remedies tried."""

    label: str
    config: Config
    measurement: Measurement
    verdict: Verdict
    culprit: str
    remedies: tuple[Remedy, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "config": self.config.to_dict(),
            "measurement": self.measurement.to_dict(),
            "verdict": self.verdict.to_dict(),
            "culprit": self.culprit,
            "remedies": [r.to_dict() for r in self.remedies],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Counterexample:
        return cls(
            label=data["label"],
            config=Config.from_dict(data["config"]),
            measurement=Measurement.from_dict(data["measurement"]),
            verdict=Verdict.from_dict(data["verdict"]),
            culprit=data["culprit"],
            remedies=tuple(Remedy.from_dict(r) for r in data["remedies"]),
        )


@dataclass(frozen=True)
class SearchResult:
    """The outcome of one search: the counterexample (or None) and what it cost."""

    space: Space
    counterexample: Counterexample | None
    probes: int
    elapsed: float
    largest_stable: Config | None
    interrupted: bool = False
    too_large: tuple[Config, ...] = field(default=())


def culprit(m: Measurement) -> str:
    """The block to blame: the one that made the first non-finite value, else the one with the largest
    backward gain when some block amplifies the backward signal, else the one with the largest weight
    gradient: the growth was inside a block (an nn.RNN over time shows no gain between blocks).

    gains[i] maps dL/d(out_{i+1}) to dL/d(out_i), so it belongs to the block called at i + 1; for the
    same reason a first non-finite dL/d(out_i) was made by the backward of the call at i + 1 (of the
    loss, after the last call).
    """
    nf = m.first_nonfinite
    if nf is not None:
        if nf.tensor == "activation_grad" and nf.layer in m.activation_names:
            i = m.activation_names.index(nf.layer) + 1
            return m.activation_names[i] if i < len(m.activation_names) else "(loss)"
        return nf.layer
    gain, i = max(((g, i) for i, g in enumerate(m.gains) if not math.isnan(g)), default=(math.nan, -1))
    if gain > 1.0:
        return m.activation_names[i + 1]
    weights = [(v, i) for i, v in enumerate(m.layer_grad_norms) if not math.isnan(v)]
    if weights:
        return m.layer_names[max(weights)[1]]
    return m.activation_names[0] if m.activation_names else (m.layer_names or ("(model)",))[0]


def memory_estimate(c: Config) -> int:
    """Bytes the activations of a probe need, roughly: kept tensors per block x their size."""
    per_block = 12 if c.family == "transformer" else 6  # tensors saved for backward per block
    tokens = c.batch_size * (c.seq_len if c.is_sequence else 1)
    blocks = c.depth * (c.seq_len if c.family in ("rnn", "lstm", "gru") else 1)
    return 8 * per_block * tokens * c.width * blocks


def free_memory(device: str) -> int:
    """Bytes free on the device (CUDA: the driver's figure; CPU: MemAvailable)."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


class Prober:
    """Probes Configs of a Space once each (a cache by grid index) and judges them."""

    def __init__(self, space: Space, subject: Subject | None, limits: Limits, progress: Progress) -> None:
        self.space, self.subject, self.limits, self.progress = space, subject, limits, progress
        self.seen: dict[Index, tuple[Measurement, Verdict] | None] = {}
        self.budget = free_memory(space.base.device) // 2

    def __call__(self, index: Index) -> tuple[Measurement, Verdict] | None:
        """(measurement, verdict) at `index`, or None when the Config is too large to run here."""
        if index not in self.seen:
            config = self.space.config(index)
            if memory_estimate(config) > self.budget:
                self.seen[index] = None
            else:
                m = probe(config, self.subject)
                self.seen[index] = (m, verdict(m, self.limits))
                self.progress(f"{self.space.label}: probe {len(self.seen)} {self._knobs(index)}")
        return self.seen[index]

    def explodes(self, index: Index) -> bool:
        result = self(index)
        return result is not None and result[1].exploded

    def _knobs(self, index: Index) -> str:
        return " ".join(f"{a.name}={a.values[i]}" for a, i in zip(self.space.axes, index, strict=True))

    def largest_stable(self) -> Config | None:
        """The stable Config seen with the largest grid indices (sum, then lexicographic)."""
        stable = [i for i, r in self.seen.items() if r is not None and not r[1].exploded]
        return self.space.config(max(stable, key=lambda i: (sum(i), i))) if stable else None

    def too_large(self) -> tuple[Config, ...]:
        return tuple(self.space.config(i) for i, r in sorted(self.seen.items()) if r is None)


class _Exploded(Exception):
    """Raised inside the Hypothesis property when a Config explodes."""


def _digest(space: Space) -> bytes:
    """A database key per Space, so a stored counterexample replays only in its own search."""
    text = space.base.to_json() + repr([(a.name, a.values) for a in space.axes])
    return hashlib.sha256(text.encode()).digest()


def hypothesis_phase(
    prober: Prober, max_examples: int, seed: int, database: ExampleDatabase | None
) -> Index | None:
    """Run Hypothesis over the grid indices with the property "stable"; the shrunk failure or None.

    Axes are drawn in order of importance, so shortlex shrinking lowers the first ones first;
    `target` on the log growth steers generation towards explosions.
    """
    space = prober.space
    failures: list[Index] = []

    def stable(data: st.DataObject) -> None:
        index = tuple(data.draw(st.integers(0, len(a.values) - 1), label=a.name) for a in space.axes)
        result = prober(index)
        if result is None:
            event("too large to probe")
            return
        m, v = result
        note(f"activation grad norms: {[f'{x:.3g}' for x in m.activation_grad_norms]}")
        if math.isfinite(m.growth) and m.growth > 0:
            target(math.log(m.growth), label="(stabilitycheck) log growth")
        for name in v.names:
            event(f"criterion: {name}")
        if v.exploded:
            failures.append(index)
            raise _Exploded

    stable._hypothesis_internal_add_digest = _digest(space)  # type: ignore[attr-defined]
    run = settings(
        max_examples=max_examples,
        database=database,
        deadline=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
        report_multiple_bugs=False,
        print_blob=False,
    )(hypothesis_seed(seed)(given(st.data())(stable)))
    try:
        run()
    except _Exploded:
        return failures[-1]  # Hypothesis replays the shrunk example last
    return None


def minimize(prober: Prober, index: Index) -> Index:
    """Lower each knob while the Config still explodes (binary search per axis, in axis order),
    until lowering any single knob by one grid step makes it stable: a verified 1-minimal point."""
    current = list(index)
    changed = True
    while changed:
        changed = False
        for k in range(len(current)):
            if current[k] == 0 or not prober.explodes(_at(current, k, current[k] - 1)):
                continue
            lo, hi = 0, current[k] - 1  # hi explodes; find the smallest that does
            while lo < hi:
                mid = (lo + hi) // 2
                if prober.explodes(_at(current, k, mid)):
                    hi = mid
                else:
                    lo = mid + 1
            current[k], changed = hi, True
    return tuple(current)


def _at(index: list[int], k: int, value: int) -> Index:
    return tuple(value if j == k else v for j, v in enumerate(index))


def try_remedies(config: Config, subject: Subject | None, limits: Limits) -> tuple[Remedy, ...]:
    """Re-probe the counterexample with each remedy; report fixed / not fixed as measured."""
    out = []
    for name, remedy in REMEDIES.items():
        changed = remedy(config)
        if changed is None:
            out.append(Remedy(name, None, None))
            continue
        m = probe(changed, subject)
        v = verdict(m, limits)
        out.append(Remedy(name, changed, not v.exploded, v.names, m))
    return tuple(out)


def counterexample(
    label: str, config: Config, subject: Subject | None = None, limits: Limits | None = None
) -> Counterexample:
    """Probe `config` and package it with its culprit and remedies (also used by --replay)."""
    limits = limits or Limits()
    m = probe(config, subject)
    return Counterexample(
        label, config, m, verdict(m, limits), culprit(m), try_remedies(config, subject, limits)
    )


def search(
    space: Space,
    *,
    subject: Subject | None = None,
    limits: Limits | None = None,
    max_examples: int = 100,
    seed: int = 0,
    database: ExampleDatabase | None = None,
    progress: Progress | None = None,
) -> SearchResult:
    """Find the smallest exploding Config of `space`: Hypothesis finds and shrinks (else the top
    corner is tried), then a deterministic pass makes it 1-minimal, then every remedy is re-probed."""
    limits = limits or Limits()
    prober = Prober(space, subject, limits, progress or (lambda _: None))
    start = time.perf_counter()
    found: Index | None = None
    interrupted = False
    try:
        found = hypothesis_phase(prober, max_examples, seed, database)
        if found is None and prober.explodes(space.top()):
            # Hypothesis missed a corner region; in a space where explosions grow with every knob,
            # the top corner explodes whenever anything does, and minimize() descends from it
            found = space.top()
        if found is not None:
            found = minimize(prober, found)
    except KeyboardInterrupt:
        interrupted = True
        failing = [i for i, r in prober.seen.items() if r is not None and r[1].exploded]
        found = min(failing, key=lambda i: (sum(i), i)) if failing else None
    cx = None
    if found is not None:
        config = space.config(found)
        m, v = prober(found) or (None, None)
        assert m is not None and v is not None
        remedies = () if interrupted else try_remedies(config, subject, limits)
        cx = Counterexample(space.label, config, m, v, culprit(m), remedies)
    return SearchResult(
        space=space,
        counterexample=cx,
        probes=len(prober.seen),
        elapsed=time.perf_counter() - start,
        largest_stable=prober.largest_stable(),
        interrupted=interrupted,
        too_large=prober.too_large(),
    )


def sweep(space: Space, *, subject: Subject | None = None, limits: Limits | None = None) -> dict[Index, bool]:
    """Probe every grid point (the exhaustive baseline): index -> exploded."""
    prober = Prober(space, subject, limits or Limits(), lambda _: None)
    return {index: prober.explodes(index) for index in space.grid()}


def boundary(exploded: dict[Index, bool]) -> set[Index]:
    """The grid's 1-minimal exploding points: exploding, and every one-step-lower neighbour is stable."""
    return {
        i
        for i, bad in exploded.items()
        if bad and all(not exploded[_at(list(i), k, i[k] - 1)] for k in range(len(i)) if i[k] > 0)
    }
