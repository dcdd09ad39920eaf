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


def test_a_finding_of_a_search_cut_short_says_so() -> None:
    """The summary row of an interrupted search: not verified minimal, and its remedies as far as they
    were judged (a review: it read like a finished search's, and 'not tried' after one was)."""
    from stabilitycheck.config import Config
    from stabilitycheck.counterexample import SearchResult
    from stabilitycheck.findings import finding
    from stabilitycheck.remedies import Remedy
    from stabilitycheck.space import Axis, Space

    cx = _counterexample((Remedy("clip", Config.of("mlp", depth=1), False, ("growth",)),))
    space = Space("mlp", cx.config, (Axis.range("depth", 1, 4),))  # type: ignore[attr-defined]
    cut = SearchResult(space, cx, 1, 1, 0.0, None, interrupted=True, minimal=False)  # type: ignore[arg-type]
    got = finding(cut, "t::test")
    assert got is not None and got.failure.endswith(" (interrupted: not verified minimal)")
    assert got.fixed_by == "none of clip (interrupted)"
    whole = finding(SearchResult(space, cx, 1, 1, 0.0, None), "t::test")  # type: ignore[arg-type]
    assert whole is not None and "interrupted" not in whole.failure + whole.fixed_by
