"""assert_stable: the invariant over a whole Config or Space, whose error carries the Counterexample (the
pytest plugin records it in the session summary). Cheap to import: the search loads when it is called."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stabilitycheck.errors import StabilityError, UsageError
from stabilitycheck.measurement import shown

if TYPE_CHECKING:
    from stabilitycheck.config import Config
    from stabilitycheck.counterexample import Counterexample
    from stabilitycheck.space import Space
    from stabilitycheck.verdicts import Limits


class Unstable(StabilityError):
    """assert_stable's error: the message shows the Counterexample, which it also carries."""

    def __init__(self, counterexample: Counterexample, knobs: tuple[str, ...] | None = None) -> None:
        from stabilitycheck.report import reproduction

        cx = counterexample
        self.stability_counterexample, self.stability_knobs = cx, knobs
        remedies = "; ".join(r.describe() for r in cx.remedies) or "not tried"
        super().__init__(
            "\n".join(
                (
                    f"{cx.label} explodes: {', '.join(c.describe() for c in cx.judgement.verdict.criteria)}",
                    f"Seeds: {cx.judgement.summary()}",
                    f"Config: {cx.config.describe()}",
                    f"Culprit: {shown(cx.culprit)}",
                    f"Remedies: {remedies}",
                    f"Reproduce: {reproduction(cx.config, cx.limits)}",
                )
            )
        )


def assert_stable(
    target: Config | Space, limits: Limits | None = None, *, max_examples: int = 60, seed: int = 0
) -> None:
    """Raise Unstable when `target` explodes: a Config is judged over its seeds, a Space searched for its
    smallest exploding Config (use a Space in plain tests, not inside @given). The plugin records it."""
    __tracebackhide__ = True
    from stabilitycheck.config import Config
    from stabilitycheck.counterexample import Counterexample
    from stabilitycheck.searching import search, try_remedies
    from stabilitycheck.seeds import assess
    from stabilitycheck.space import Space
    from stabilitycheck.subjects import resolve
    from stabilitycheck.verdicts import Limits

    if not isinstance(target, Config | Space):
        raise UsageError(
            f"assert_stable takes a Config or a Space, got {type(target).__name__}; e.g. "
            "assert_stable(Config.of('mlp', depth=8)); for a module of your own, probe_module(model, ...)"
        )
    limits = limits or Limits()
    if isinstance(target, Space):
        result = search(target, limits=limits, max_examples=max_examples, seed=seed)
        if result.counterexample is not None and not result.interrupted:
            raise Unstable(result.counterexample, tuple(a.name for a in target.axes))
        if result.interrupted:  # the search keeps what it found and returns; the test must not pass
            stop = KeyboardInterrupt()
            stop.stability_counterexample = result  # type: ignore[attr-defined]  # the plugin records it
            raise stop
        return
    subject = resolve(target.subject)
    j = assess(target, subject, limits)
    if j.exploded:
        remedies = tuple(try_remedies(target, subject, limits, fired=j.verdict.names))
        raise Unstable(Counterexample(target.label(), target, j, limits, remedies))
