"""Remedies: known fixes for exploding gradients, each a change of Config re-judged to see if it helps.
Run-level remedies (clipping, warmup, float32) apply to every subject; the init remedy to the subject's
init knob; architecture remedies (pre-norm, LSTM in place of RNN) come from the subject itself."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from stabilitycheck.config import Config
from stabilitycheck.families import Scalar
from stabilitycheck.subject import Subject
from stabilitycheck.verdicts import Limits

CLIP_NORM = 1.0


@dataclass(frozen=True)
class Remedy:
    """A remedy tried on a counterexample: `config` is None (and nothing was probed) where it does not
    apply; `fixed` says whether the re-judged Config stopped exploding, `growth` what it measured
    (the growth spread over seeds, of a recurrent subject its through-time growth, on which growth
    and vanishing are judged);
    `skipped` why the remedied model could not be judged (its code raised there), `fixed` then None;
    `why` why it does not apply, where `config` is None (`why_not`)."""

    name: str
    config: Config | None
    fixed: bool | None
    still_fires: tuple[str, ...] = ()
    growth: str = ""
    skipped: str = ""
    why: str = ""
    measured: str = ""  # the counterexample's own criterion where it is not the growth: 'stall 0.05 (..)'
    over: str = ""  # what those spreads are: 'q=0.5 over 3 seeds', ', through time' where it was so

    def describe(self) -> str:
        """'float32: fixed at growth 98.4 (53.1-166)': the verdict, and where measured the growth it
        was judged on, quantile (min-max) over seeds, so that a fix near the limit reads as one (a
        float16 counterexample 'fixed by float32' at the depth where float32 explodes one block
        lower); first the counterexample's own criterion where that is not the growth
        ('warmup: fixed at stall 0.0499 (0.0383-0.128), growth 0.705 (0.554-1.16)': it read the
        growth at init alone); then what the spreads are, `over` ('(q=0.5 over 3 seeds, through
        time)')."""
        if self.config is None:
            return f"{self.name}: n/a ({self.why})" if self.why else f"{self.name}: n/a"
        if self.skipped:
            return f"{self.name}: not judged ({self.skipped})"
        verdict = "fixed" if self.fixed else f"not fixed ({', '.join(self.still_fires)})"
        shown = ", ".join(x for x in (self.measured, f"growth {self.growth}" if self.growth else "") if x)
        over = f" ({self.over})" if shown and self.over else ""
        return f"{self.name}: {verdict}" + (f" at {shown}{over}" if shown else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": None if self.config is None else self.config.to_dict(),
            "fixed": self.fixed,
            "still_fires": list(self.still_fires),
            "growth": self.growth,
            "skipped": self.skipped,
            "why": self.why,
            "measured": self.measured,
            "over": self.over,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Remedy:
        config = None if data["config"] is None else Config.from_dict(data["config"])
        fires, growth, skipped = tuple(data["still_fires"]), data.get("growth", ""), data.get("skipped", "")
        why, measured, over = data.get("why", ""), data.get("measured", ""), data.get("over", "")
        return cls(data["name"], config, data["fixed"], fires, growth, skipped, why, measured, over)


def judged_on(limits: Limits) -> Limits:
    """The limits a remedy is re-judged on: the search's, with vanishing judged at the growth limit
    (growth < 1/100 by default) where no vanishing limit is set: a remedy that turns the explosion
    into a vanishing gradient (an init that is not critical for the model: bias-free GELU at sqrt(2),
    a tanh RNN with input drive at 1) has not fixed it."""
    return limits if limits.vanishing is not None else replace(limits, vanishing=limits.growth)


def clip(c: Config, s: Subject) -> Config | None:
    """Norm clipping at 1.0 during the optimiser steps (only meaningful when there are steps)."""
    return c.with_run(clip=CLIP_NORM) if c.run.steps > 0 and c.run.clip is None else None


def critical_init(c: Config, s: Subject) -> Config | None:
    """The subject's init knob at its critical value: a model's own designed init; for the zoo, the
    bias-free MLP's mean-field point (chi_1 = 1: tanh and linear at 1, ReLU at sqrt(2)). Elsewhere the
    same value is a guess that can undershoot: GELU at sqrt(2) is ordered (chi_1 -> 1/2 as the
    activations shrink; bias-free GELU has no critical scale), a tanh RNN at 1 with its input drive
    shrinks the gradient x0.63 per step. Re-judged on vanishing (judged_on), it then says so."""
    value = init_value(c, s)
    target = None if value is None else s.critical_init(c)
    if target is None or value == target:
        return None
    init = str(s.init_knob)
    if init in c.values:
        return c.with_knobs(**{init: target})
    return replace(c, knobs=(*c.knobs, (init, target)))  # a Config naming some knobs alone: added


def init_value(c: Config, s: Subject) -> Scalar | None:
    """The value of the subject's init knob in `c`, its default where `c` does not give it (a Config of
    a model file naming some knobs alone: assert_stable said 'no init knob' of a file at its critical
    init_scale, where the CLI, whose Configs name every knob, said it is there); None without one."""
    if s.init_knob is None:
        return None
    return c.values[s.init_knob] if s.init_knob in c.values else s.config().values.get(s.init_knob)


def warmup(c: Config, s: Subject) -> Config | None:
    """A linear learning-rate warmup over the probed steps."""
    return c.with_run(warmup=c.run.steps) if c.run.steps > 1 and c.run.warmup == 0 else None


def float32(c: Config, s: Subject) -> Config | None:
    """float32 in place of float16/bfloat16 or autocast: enough range for what overflowed."""
    reduced = c.run.dtype in ("float16", "bfloat16") or c.run.amp != "none"
    return c.with_run(dtype="float32", amp="none") if reduced else None


RUN_REMEDIES: dict[str, Callable[[Config, Subject], Config | None]] = {
    "clip": clip,
    "critical-init": critical_init,
    "warmup": warmup,
    "float32": float32,
}


def why_not(name: str, c: Config, s: Subject) -> str:
    """Why the remedy `name` does not apply to `c` (its function gave None), in a few words: a user
    reading 'critical-init: n/a' could not tell an init already critical from a knob not found."""
    run = c.run
    if name == "clip":
        return "no optimiser steps: --steps N" if run.steps == 0 else "clipping already: --clip"
    if name == "warmup":
        return "fewer than 2 optimiser steps: --steps N" if run.steps <= 1 else "a warmup already"
    if name == "float32":
        return f"{run.dtype} already, no autocast"
    if name == "critical-init":
        if init_value(c, s) is None:
            return "no init knob: a model file names it, INIT = 'knob'"
        target = s.critical_init(c)
        if target is None:
            return f"no critical value known for {s.init_knob}"
        return f"{s.init_knob} is at {target}, {s.critical_note}"
    return "does not apply to this model"


def candidates(c: Config, s: Subject) -> dict[str, Config | None]:
    """Every remedy's changed Config (None where it does not apply), architecture ones included."""
    out = {name: fn(c, s) for name, fn in RUN_REMEDIES.items()}
    out.update(s.variants(c))
    return out


def fixed_by(remedies: Sequence[Remedy], interrupted: bool = False) -> str:
    """The 'fixed by' cell of a counterexample, in the CLI's table and the pytest summary alike: the
    remedies that fixed it; else 'none of ...' (those judged), 'not judged: ...' (every one tried
    failed in the model's code: Remedy.skipped), or 'none applies' (none is for this subject); of an
    `interrupted` search, the same of those judged before it, '(interrupted)', else 'not tried
    (interrupted)'."""
    fixed = [r.name for r in remedies if r.fixed]
    attempted = [r.name for r in remedies if r.config is not None and not r.skipped]
    unjudged = [r.name for r in remedies if r.skipped]
    if interrupted:
        judged = ", ".join(fixed) or (f"none of {', '.join(attempted)}" if attempted else "")
        return f"{judged} (interrupted)" if judged else "not tried (interrupted)"
    if fixed:
        return ", ".join(fixed)
    if attempted:
        return f"none of {', '.join(attempted)}"
    return f"not judged: {', '.join(unjudged)}" if unjudged else "none applies"
