"""The findings a pytest run records (findings): 'fixed by' names only the remedies judged fixed."""

from __future__ import annotations

from stabilitycheck.verdicts import Limits


def _counterexample(remedies: tuple[object, ...]) -> object:
    from stabilitycheck.config import Config
    from stabilitycheck.counterexample import Counterexample
    from stabilitycheck.seeds import assess

    config = Config.of("mlp", depth=2, width=4, batch_size=1).with_run(seeds=1)
    return Counterexample("mlp", config, assess(config), Limits(), remedies)  # type: ignore[arg-type]


def test_a_remedy_judged_not_fixed_is_not_in_fixed_by() -> None:
    """'fixed by' names the remedies whose re-judged Config stopped exploding (fixed True) alone; a
    remedy measured and still exploding (fixed False) leaves it 'none of' those, as the CLI's table
    says it."""
    from stabilitycheck.config import Config
    from stabilitycheck.findings import finding
    from stabilitycheck.remedies import Remedy

    changed = Config.of("mlp", depth=1)
    cx = _counterexample((Remedy("critical init", changed, False, ("growth",)),))
    got = finding(cx, "t::test")  # type: ignore[arg-type]
    assert got is not None and got.fixed_by == "none of critical init"
