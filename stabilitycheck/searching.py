"""Search: the smallest exploding Config of a Space. Hypothesis finds any failure (its database replays
old ones first); a deterministic pass then descends to a canonical point and verifies it 1-minimal;
then every remedy is re-judged.

Seeds. The search steers on a screen, one seed alone: Hypothesis' property on the first seed, the
descent on the first seed too where it starts from the top corner on the screen alone, else on the
seed whose growth is the full rule's quantile where it starts (a typical seed, where the first can
be far off), and on the quantile's seed at each answer the full rule finds stable. The full rule
over seeds (seeds.assess) is spent only where a claim is made: the failure the descent starts from
(the top corner only where the screen is stable there, or where the descent's second way needs it),
the descent's answers, the 1-minimality check and the remedies (canonical.canonical). Sound because
the screen only chooses where the full rule is asked: the point reported explodes on the full rule
and each one-step-lower neighbour does not, whatever the screen said. Cheap because a (Config, seed)
is probed once (seeds.SeedProbes): the full rule starts from the screen's probes."""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

from hypothesis import HealthCheck, Phase, event, given, note, settings, target
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.database import ExampleDatabase, InMemoryExampleDatabase

from stabilitycheck._validation import describe, model_failure, raised_at
from stabilitycheck.alarms import ProbeTimeout, stop_seen, time_limit
from stabilitycheck.canonical import Index as Index  # `X as X`: the search's public names
from stabilitycheck.canonical import boundary as boundary
from stabilitycheck.canonical import canonical as canonical
from stabilitycheck.canonical import lower
from stabilitycheck.config import Config
from stabilitycheck.counterexample import Counterexample as Counterexample
from stabilitycheck.counterexample import SearchResult as SearchResult
from stabilitycheck.errors import UsageError
from stabilitycheck.judgement import Judgement
from stabilitycheck.memory import free_memory
from stabilitycheck.remedies import Remedy, candidates, judged_on, why_not
from stabilitycheck.seeds import SeedProbes, assess
from stabilitycheck.space import Space
from stabilitycheck.spread import Spread
from stabilitycheck.subject import Subject
from stabilitycheck.subjects import resolve
from stabilitycheck.verdicts import Limits

Progress = Callable[[str], None]


class Prober:
    """Judges Configs of a Space once each (a cache by grid index): on the full rule over seeds
    (`explodes`, `__call__`) or on one seed alone (`screens`, `screen`: the first, until `steer`
    picks another), which only steers the search; the full rule reuses the screen's probes. A point
    that cannot be judged (too large, too slow, user code failing there) is skipped with the reason."""

    def __init__(
        self, space: Space, subject: Subject, limits: Limits, progress: Progress, timeout: float | None
    ) -> None:
        self.space, self.subject, self.limits, self.progress = space, subject, limits, progress
        self.timeout = timeout
        self.seen: dict[Index, Judgement | str] = {}  # the full rule
        self.first: dict[tuple[Index, int], Judgement | str] = {}  # (index, seed): one seed alone
        self.screen_seed = space.base.run.seed  # the first seed, until `steer`
        self.cache = SeedProbes()
        self.probes = 0  # per-seed probes run to judge points (each (Config, seed) once)
        self.budget = free_memory(space.base.run.device) // 2

    @property
    def points(self) -> int:
        """Grid points judged so far, on one seed or the full rule."""
        return len(self.seen.keys() | {index for index, _ in self.first})

    def __call__(self, index: Index) -> Judgement | str:
        """The Judgement at `index` on the full rule, or why it was skipped."""
        if index not in self.seen:
            skipped = self.first.get((index, self.space.base.run.seed))  # the full rule's first seed
            config = self.space.config(index)
            if not isinstance(skipped, str):
                self._starts(index, "")
            self.seen[index] = skipped if isinstance(skipped, str) else self._judge(config)
            self._show(index, self.seen[index], "")
        return self.seen[index]

    def screen(self, index: Index) -> Judgement | str:
        """The full rule's Judgement where known, else the screen seed's (a one-seed Judgement)."""
        if index in self.seen or self.space.config(index).run.seeds == 1:
            return self(index)  # one seed: the screen is the full rule
        key = (index, self.screen_seed)
        if key not in self.first:
            self._starts(index, f" (seed {key[1]} alone)")
            self.first[key] = self._judge(self.space.config(index).with_run(seed=key[1], seeds=1))
            self._show(index, self.first[key], f" (seed {key[1]} alone)")
        return self.first[key]

    def steer(self, index: Index) -> None:
        """Screen from now on with the seed whose growth is the full rule's quantile at `index`: its
        crossings lie near the quantile's, where the first seed's can be far off (one seed's growth
        is off its 5-seed median by up to 55x on a GRU). Its probe there is reused, not rerun."""
        got = self(index)
        if isinstance(got, Judgement):
            self.screen_seed = got.measured_seed

    def _starts(self, index: Index, how: str) -> None:
        """Say which point is being judged: building a large one (its memory estimate builds the
        model too) can take minutes, which read as a hang after the search's first line."""
        counted = index in self.seen or any(i == index for i, _ in self.first)  # as `points` counts
        n = self.points + (not counted)
        self.progress(f"{self.space.label}: point {n}{self._at(index)}{how}: judging")

    def _at(self, index: Index) -> str:
        """' depth=12 width=8': the point's knobs for a progress line ('' where every knob is fixed)."""
        knobs = self.knobs(index)
        return f" {knobs}" if knobs else ""

    def _show(self, index: Index, got: Judgement | str, how: str) -> None:
        shown = got.summary() if isinstance(got, Judgement) else f"skipped: {got}"
        self.progress(f"{self.space.label}: point {self.points}{self._at(index)}{how}: {shown}")

    def _judge(self, config: Config, every: bool = False) -> Judgement | str:
        before = self.cache.made
        try:
            return self._assess(config, every)
        finally:
            self.probes += self.cache.made - before

    def complete(self, index: Index) -> Judgement | str:
        """The full rule's Judgement at `index` with every criterion's verdict known (the report's, as
        a fresh assess() gives it): the search's points stop once whether they explode is known."""
        got = self(index)
        if not isinstance(got, Judgement) or not got.exploded:  # a stable verdict knows every criterion
            return got
        full = self._judge(self.space.config(index), every=True)
        return full if isinstance(full, Judgement) else got

    def _assess(self, config: Config, every: bool) -> Judgement | str:
        try:
            with time_limit(self.timeout):  # the memory estimate builds the model too: within the budget
                need = self.subject.memory_estimate(config)
                if need is not None and need > self.budget:
                    return (
                        f"too large ({need / 2**20:.0f} MiB estimated, {self.budget / 2**20:.0f} MiB allowed)"
                    )
                return assess(config, self.subject, self.limits, self.cache, every=every)
        except ProbeTimeout:
            return f"too slow (over the {self.timeout:g} s probe budget)"
        except (Exception, SystemExit) as exc:
            why = model_failure(exc)
            if why is None:
                raise  # bad input, or a bug of this package: never a skipped point
            return why

    def explodes(self, index: Index) -> bool:
        got = self(index)
        return isinstance(got, Judgement) and got.exploded

    def screens(self, index: Index) -> bool:
        got = self.screen(index)
        return isinstance(got, Judgement) and got.exploded

    def knobs(self, index: Index) -> str:
        return " ".join(f"{a.name}={a.values[i]}" for a, i in zip(self.space.axes, index, strict=True))

    def largest_stable(self, full: bool = False) -> Index | None:
        """The stable index judged with the largest grid indices (sum, then lexicographic); the full
        rule's judgement where there is one. With `full`, among the points the full rule judged alone
        (beside a counterexample: a point stable on the screen's seed alone was given as the largest
        stable one, where all seeds exploded, growth 1.6e3 for 21.7)."""
        judged = self.seen if full else self.judged()
        stable = [i for i, r in judged.items() if isinstance(r, Judgement) and not r.exploded]
        return max(stable, key=lambda i: (sum(i), i)) if stable else None

    def judged(self) -> dict[Index, Judgement | str]:
        """Every point judged: the full rule's judgement, else a seed's alone."""
        return {**{index: got for (index, _), got in self.first.items()}, **self.seen}

    def skipped(self) -> tuple[tuple[Config, str], ...]:
        return tuple(
            (self.space.config(i), r) for i, r in sorted(self.judged().items()) if isinstance(r, str)
        )


OFF_SOURCE = 2**52 + 1_000_003
"""Where grid indices are drawn from (index + OFF_SOURCE): Hypothesis draws 5% of its integers from
the literals in the source of the local modules loaded (this package's under an editable install, a
model file's, whatever the caller imported), so indices drawn from 0 made the path depend on what
was imported and how the package was installed (the zoo's GRU search ended stable from the command
line, at seq_len=221 from Python). No literal lies this far from 0, and Hypothesis' own constants
(powers of 2, 10 and factorials, each +-1) are not in reach of a grid's size: the seed alone decides."""


class _Exploded(Exception):
    """Raised inside the Hypothesis property when a Config explodes."""


def _digest(space: Space) -> bytes:
    """A database key per Space, so a stored counterexample replays only in its own search."""
    text = space.base.to_json() + repr([(a.name, list(a.values[:3]), len(a.values)) for a in space.axes])
    return hashlib.sha256(text.encode()).digest()


def hypothesis_phase(
    prober: Prober, max_examples: int, seed: int, database: ExampleDatabase | None, confirm: bool = True
) -> Index | None:
    """Run Hypothesis over the grid indices with the property "stable" on the first seed (the screen);
    a failure or None. `confirm`: a failure must also explode on the full rule over seeds.

    Axes are drawn in order of importance, so shortlex shrinking lowers the first ones first;
    `target` on the first seed's log growth steers generation towards explosions. No shrinking: the
    canonical pass that follows finds the smallest point deterministically.
    """
    space = prober.space
    prober.screen_seed = space.base.run.seed  # whatever seed a descent before it was steered to
    failures: list[Index] = []

    def stable(data: st.DataObject) -> None:
        index = tuple(
            data.draw(st.integers(OFF_SOURCE, OFF_SOURCE + len(a.values) - 1), label=a.name) - OFF_SOURCE
            for a in space.axes
        )
        got = prober.screen(index)
        if isinstance(got, str):
            event("skipped")
            return
        note(f"activation grad norms: {[f'{x:.3g}' for x in got.measurement.activation_grad_norms]}")
        if math.isfinite(got.growth.mid) and got.growth.mid > 0:
            target(math.log(got.growth.mid), label="(stabilitycheck) log growth")
        for name in got.verdict.names:
            event(f"criterion: {name}")
        if got.exploded and (not confirm or prober.explodes(index)):
            failures.append(index)
            raise _Exploded

    stable._hypothesis_internal_add_digest = _digest(space)  # type: ignore[attr-defined]
    run = settings(
        max_examples=max_examples,
        database=database,
        deadline=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target),
        report_multiple_bugs=False,
        print_blob=False,
    )(hypothesis_seed(seed)(given(st.data())(stable)))
    try:
        run()
    except _Exploded:
        return failures[0]
    return None


def _failure(
    prober: Prober, max_examples: int, seed: int, database: ExampleDatabase | None, top: bool
) -> Index | None:
    """Where the descent starts: Hypothesis' failure (confirmed on the full rule unless the top corner
    explodes, `top`), else the top corner where it explodes (Hypothesis missed a corner region), else
    the point a stable row stands on, where it explodes on the full rule; None where none does."""
    found = hypothesis_phase(prober, max_examples, seed, database, confirm=not top)
    if found is None and top:
        return prober.space.top()
    if found is None and (stable := prober.largest_stable()) is not None:
        # the point a stable row stands on is judged on the full rule, as a top corner the screen
        # finds stable is (which may be skipped: the model rejecting its largest knob values)
        return stable if prober.explodes(stable) else None
    return found


MEASURED = ("grad_norm", "divergence", "stall")  # criteria a remedy also reads beside the growth


def try_remedies(
    config: Config,
    subject: Subject,
    limits: Limits,
    probes: SeedProbes | None = None,
    fired: Sequence[str] = (),
) -> Iterator[Remedy]:
    """Re-judge the counterexample with each remedy (on vanishing too: remedies.judged_on); yields
    fixed / not fixed as measured, or not judged where the model's code fails with the remedy (a
    model file raising at the critical init: the whole search stopped there, exit 2, its
    counterexample lost). `fired`: the counterexample's criteria, the first of MEASURED among them
    read under each remedy too (a stall fixed by warmup read the growth at init alone)."""
    judged = judged_on(limits)
    own = next((c for c in fired if c in MEASURED), None)
    for name, changed in candidates(config, subject).items():
        if changed is None:
            yield Remedy(name, None, None, why=why_not(name, config, subject))
            continue
        try:
            j = assess(changed, subject, judged, probes)
        except (Exception, SystemExit) as exc:
            why = model_failure(exc)
            if why is None:
                raise  # bad input, or a bug of this package: never a remedy left unjudged
            yield Remedy(name, changed, None, skipped=why)
            continue
        q = changed.run.quantile
        spread = None if own is None else Spread.of([v[own] for v in j.values], q)
        measured = "" if spread is None else f"{own} {spread.describe()}"
        n = len(j.seeds)
        over = f"q={q:g} over {n} seed{'s' * (n != 1)}" + (
            ", through time" if j.through_time is not None else ""
        )
        yield Remedy(
            name, changed, not j.exploded, j.verdict.names, j.growth.describe(), measured=measured, over=over
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
    timeout: float | None = None,
    on_result: Callable[[SearchResult], None] | None = None,
) -> SearchResult:
    """Find the smallest exploding Config of `space`: the top corner is judged (on the full rule where
    the screen is stable there), Hypothesis finds a failure (where the top corner is stable, one
    exploding on the full rule), the canonical pass makes it the smallest and 1-minimal (starting
    again from a failure on the full rule where the top corner exploded on the screen alone), then
    every remedy is re-judged.
    `on_result` gets the result as soon as the counterexample is known, then after each remedy, so an
    interrupted run still has it. Ctrl-C returns what was found, marked interrupted. `database` None:
    one in memory, for this search alone (Hypothesis generates differently with a database than
    without one, so a fresh directory and None give the same path)."""
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf
    ):  # 0 would disarm the timer, a negative one raise from setitimer mid-search
        raise UsageError(f"search: timeout must be seconds > 0 (None: no limit), got timeout={timeout!r}")
    database = database if database is not None else InMemoryExampleDatabase()
    limits = limits or Limits()
    subject = subject or resolve(space.base.subject)
    prober = Prober(space, subject, limits, progress or (lambda _: None), timeout)
    start = time.perf_counter()
    found: Index | None = None
    interrupted = False
    remedies: list[Remedy] = []

    def result(cx: Counterexample | None) -> SearchResult:
        stable = prober.largest_stable(full=cx is not None)  # else maybe one seed's, said as such
        judged = prober.judged().get(stable) if stable is not None else None
        corner = prober.seen.get(space.top())  # judged stable, not skipped: the space is not monotone
        return SearchResult(
            space=space,
            counterexample=cx,
            probes=prober.probes,
            points=prober.points,
            elapsed=time.perf_counter() - start,
            largest_stable=space.config(stable) if stable is not None else None,
            largest_stable_judgement=judged if isinstance(judged, Judgement) else None,
            interrupted=interrupted,
            skipped=prober.skipped(),
            top_stable=isinstance(corner, Judgement) and not corner.exploded,
            minimal=not rough,
            unjudged=unjudged,
            below=_failing_below(prober, at) if cx is not None and at is not None else None,
            last_step_probes=prober.cache.made_last,
            limits=limits,
        )

    cx: Counterexample | None = None
    at: Index | None = None  # cx's grid index
    rough = False  # the counterexample is the smallest exploding point seen, not a verified one
    unjudged: tuple[tuple[Config, str], ...] = ()
    try:
        # the descent starts from the top corner where it explodes on the screen (its full rule
        # asked only if the descent needs it) or on the full rule, else from `found`, which must then
        # explode on the full rule: Hypothesis confirms each failure there, looking on past one that
        # does not, in one run of max_examples examples (a first run that stopped at the screen's
        # first failure, then a second from the start, could spend twice as many)
        top = prober.screens(space.top()) or prober.explodes(space.top())
        found = _failure(prober, max_examples, seed, database, top)
        if found is not None:
            found = canonical(prober, found)
            if found is None:  # the top corner exploded on the screen's seed alone, not on all seeds
                found = _failure(prober, max_examples, seed, database, top=False)
                found = canonical(prober, found, screened_top=False) if found is not None else None
        if found is not None:
            unjudged = _unjudged(prober, found)
            config = space.config(found)
            judged = prober.complete(found)
            assert isinstance(judged, Judgement)
            cx, at = Counterexample(space.label, config, judged, limits, ()), found
            if on_result:
                on_result(result(cx))
            for remedy in try_remedies(config, subject, limits, prober.cache, judged.verdict.names):
                remedies.append(remedy)
                cx = replace(cx, remedies=tuple(remedies))
                if on_result:
                    on_result(result(cx))
    except KeyboardInterrupt:
        stop_seen()
        interrupted = True
        if cx is None:  # the smallest explosion seen on all seeds, else on the screen's seed alone
            seen = prober.judged()  # (the top corner is screened first: it may be all there is)
            exploded = [i for i, r in seen.items() if isinstance(r, Judgement) and r.exploded]
            failing = [i for i in exploded if i in prober.seen] or exploded
            if failing:
                best = min(failing, key=lambda i: (sum(i), i))
                judged = seen[best]
                assert isinstance(judged, Judgement)
                config = space.config(best)
                if best not in prober.seen:  # one seed's: its config says so, and reproduces it
                    config = config.with_run(seed=judged.seeds[0], seeds=1)
                cx, rough = Counterexample(space.label, config, judged, limits, ()), True
                at = best
    return result(cx)


def _failing_below(prober: Prober, at: Index) -> tuple[Config, str, int | None] | None:
    """The smallest point judged at or below the counterexample's index `at` in every knob, not `at`,
    that failed, what it read, and the screen's seed where it failed on that alone (None: on the full
    rule): a criterion that is not monotone in the knobs (a stall limit firing at depth 1 and again
    from 21; the descent verified 21 1-minimal)."""
    judged = prober.judged()
    failing = [
        i
        for i, got in judged.items()
        if i != at and all(a <= b for a, b in zip(i, at, strict=True))
        if isinstance(got, Judgement) and got.exploded
    ]
    if not failing:
        return None
    index = min(failing, key=lambda i: (sum(i), i))
    got = judged[index]
    assert isinstance(got, Judgement)
    return prober.space.config(index), got.summary(), None if index in prober.seen else got.seeds[0]


def _unjudged(prober: Prober, index: Index) -> tuple[tuple[Config, str], ...]:
    """The one-step-lower neighbours of the point at `index` that were skipped (the model raised
    there, or was too large or slow): the descent took them as not exploding, unverified."""
    judged = prober.judged()
    return tuple((prober.space.config(b), why) for b in lower(index) if isinstance(why := judged.get(b), str))


def sweep(space: Space, *, subject: Subject | None = None, limits: Limits | None = None) -> dict[Index, bool]:
    """Judge every grid point (the exhaustive baseline): index -> exploded."""
    prober = Prober(space, subject or resolve(space.base.subject), limits or Limits(), lambda _: None, None)
    return {index: prober.explodes(index) for index in space.grid()}


def check(subject: Subject, config: Config, *others: Config) -> None:
    """Probe `config` once before a search (then each of `others` while they all fail): a model that
    cannot run at any of them is a one-line UsageError naming the subject, its knobs at `config` and
    the failure there; one that runs at any is searched, and the points where it fails are skipped
    with the reason (a model raising at the lowest corner alone is no usage error). What is not the
    model's failure (_validation.model_failure: a bug of this package) is raised as it is. One the memory
    estimate puts over the search's budget is not built (`--knob depth=100000000` allocated for
    minutes): the search skips it as too large, and says so where it skips all."""
    from stabilitycheck.configprobe import probe

    first: UsageError | None = None
    cause: BaseException | None = None  # the model's own exception behind `first`: --debug shows it
    budget = free_memory(config.run.device) // 2
    for tried in (config, *others):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a meta build's warnings: the probe's say the same
            need = subject.memory_estimate(tried)
        if need is not None and need > budget:
            continue
        try:
            with warnings.catch_warnings(record=True) as said:  # a model's warnings on its way to an
                warnings.simplefilter("always")  # error it runs into are that error's noise: dropped
                probe(tried.with_run(seeds=1), subject)
            for w in said:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            return
        except UsageError as exc:
            if first is None:
                first, cause = UsageError(f"{exc} (with {tried.describe()})"), exc
        except (Exception, SystemExit) as exc:
            if model_failure(exc) is None:  # a bug of this package: never read as the model's failure
                raise
            what = (
                f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else f"raised {describe(exc)}"
            )
            hint = (
                "the model type may not accept these knob values (set others with --knob)"
                if tried.subject.startswith("hf:")
                else "its code may not accept these knob values (narrow SPACE or --knob), or its inputs "
                "(batch(), example_input or the ones inferred) may not match what forward() expects"
            )
            if first is None:
                first, cause = (
                    UsageError(
                        f"{tried.subject}: running the model with {tried.describe()} {what}{raised_at(exc)}; "
                        f"{hint}"
                    ),
                    exc,
                )
    if first is not None:
        raise first from cause
