"""Findings: the counterexamples a test session records, as the strings its summary shows (rendered
where they were found: a worker has torch loaded already), the summary table, and the Configs a failing
test was called with. Cheap to import: torch and the rest of stabilitycheck load inside the functions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from stabilitycheck.errors import StabilityError
from stabilitycheck.families import Scalar

if TYPE_CHECKING:
    from stabilitycheck.config import Config
    from stabilitycheck.counterexample import Counterexample, SearchResult

SIZE_KNOBS = ("depth", "width", "init_scale", "seq_len")
"""The zoo knobs shown (and summed for the order) when a counterexample does not say which were searched;
other subjects show all their numeric knobs."""
HEADERS = ("#", "test", "target", "device", "dtype", "knobs", "failure", "culprit", "fixed by")
FAILURE_WIDTH = 90


@dataclass(frozen=True)
class Finding:
    """One counterexample recorded in the session, as the strings the summary shows, plus its Config
    and, when there is one, its Counterexample as JSON-ready dicts (Counterexample.to_dict)."""

    test: str
    label: str
    device: str
    dtype: str
    knobs: tuple[tuple[str, Scalar], ...]
    failure: str
    culprit: str
    fixed_by: str
    reproduce: str
    config: dict[str, Any]
    counterexample: dict[str, Any] | None = None

    @property
    def size(self) -> tuple[tuple[str, tuple[int, float | str]], ...]:
        """The order of the summary within a subject: knob by knob as shown, the seed apart, numbers
        before words. A row no larger than another on every knob comes first; a sum of the values
        compared a depth with a width (depth=3 width=1024 after depth=30 width=8)."""
        return tuple(
            (k, (1, str(v)) if isinstance(v, bool | str) else (0, float(v)))
            for k, v in self.knobs
            if k != "seed"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "knobs": [list(k) for k in self.knobs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(**{**data, "knobs": tuple((str(k), v) for k, v in data["knobs"])})


def _knobs(config: Config, names: tuple[str, ...] | None) -> tuple[tuple[str, Scalar], ...]:
    """The knobs a row shows: `names` (a search's axes), else a family's size knobs and activation
    (a linear MLP read as the default tanh without it) and any other knob off its default (an rnn's
    batch_size=2, growth 233 where the default batch reads 3.0), or a file's numeric knobs; and the
    seed when it is not 0 (the reproduction line has every field)."""
    from stabilitycheck.config import Config

    values = config.values
    if names is None and config.family:
        shown = (*SIZE_KNOBS, "activation")
        default = Config.of(config.subject).values
        names = shown + tuple(k for k, v in values.items() if k not in shown and default.get(k) != v)
    elif names is None:
        names = tuple(k for k, v in values.items() if not isinstance(v, str))
    seed: tuple[tuple[str, Scalar], ...] = (("seed", config.run.seed),) if config.run.seed else ()
    return tuple((n, values[n]) for n in names if n in values) + seed


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _short(text: str, width: int = FAILURE_WIDTH) -> str:
    """The table's cell: `text` cut to `width` (the whole text follows under the table)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def failure_text(exc: BaseException) -> str:
    """The header and first detail line of an assert_close-style message (or the first line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return _one_line(" ".join(lines[:2]) if isinstance(exc, StabilityError) else lines[0])


def finding(
    found: SearchResult | Counterexample | Config,
    test: str,
    *,
    failure: str | None = None,
    knobs: tuple[str, ...] | None = None,
    reproduce: str | None = None,
) -> Finding | None:
    """A Finding of a SearchResult (None when it found nothing), a Counterexample, or a failing Config
    (with the `failure` message and the line that `reproduce`s it: a test's own assertion is not the
    verdict, so the default is only a probe of the Config); `knobs` are the knob names to show
    (default: a search's axes)."""
    from stabilitycheck.config import Config
    from stabilitycheck.counterexample import Counterexample, SearchResult
    from stabilitycheck.remedies import fixed_by
    from stabilitycheck.report import reproduction
    from stabilitycheck.reporttable import unverified

    failure = _one_line(failure) if failure else None
    interrupted, cut = False, ""  # a search cut short: its remedies and minimality say so
    if isinstance(found, SearchResult):
        if found.counterexample is None:
            return None
        knobs = knobs or tuple(a.name for a in found.space.axes)
        interrupted = found.interrupted
        cut = unverified(found)
        found = found.counterexample
    if isinstance(found, Counterexample):
        c = found.config
        return Finding(
            test=test,
            label=found.label,
            device=c.run.device,
            dtype=c.run.dtype,
            knobs=_knobs(c, knobs),
            failure=(failure or ", ".join(x.describe() for x in found.judgement.verdict.criteria) or "-")
            + cut,
            culprit=found.culprit,
            fixed_by=fixed_by(found.remedies, interrupted),
            reproduce=reproduction(c, found.limits),
            config=c.to_dict(),
            counterexample=found.to_dict(),
        )
    if isinstance(found, Config):
        return Finding(
            test=test,
            label=found.label(),
            device=found.run.device,
            dtype=found.run.dtype,
            knobs=_knobs(found, knobs),
            failure=failure or "-",
            culprit="-",
            fixed_by="-",
            reproduce=reproduce or reproduction(found),
            config=found.to_dict(),
        )
    raise TypeError(
        f"Expected a SearchResult, Counterexample or Config but got {found!r} (type={type(found).__name__})"
    )


def summary(findings: list[Finding]) -> str:
    """The summary table, smallest first (by subject, then knob by knob: `Finding.size`), then each
    row's test id and reproduction line, and its whole failure text where the table cut it. Rendering
    only: every number was measured where it was found."""
    from tabulate import tabulate

    ordered = sorted(findings, key=lambda f: (f.label, f.size, f.test))
    rows = [
        [
            str(i),
            f.test.rpartition("::")[2],
            f.label,
            f.device,
            f.dtype,
            " ".join(f"{k}={v}" for k, v in f.knobs),
            _short(f.failure),
            f.culprit,
            f.fixed_by,
        ]
        for i, f in enumerate(ordered, 1)
    ]
    table = tabulate(rows, headers=HEADERS, tablefmt="simple", disable_numparse=True)
    lines = [
        f"{i:>3}  {f.test}\n     {f.reproduce}"
        + (f"\n     {f.failure}" if _short(f.failure) != f.failure else "")
        for i, f in enumerate(ordered, 1)
    ]
    return table + "\n\n" + "\n".join(lines)


def leaves(exc: BaseException) -> Iterator[BaseException]:
    inner = getattr(exc, "exceptions", None)  # an ExceptionGroup (Hypothesis's report_multiple_bugs)
    if isinstance(inner, tuple | list):
        for e in inner:
            yield from leaves(e)
    else:
        yield exc


def failing_configs(exc: BaseException, codes: set[Any]) -> list[Config]:
    """The Configs among the arguments (else the locals) of the test's frame in the traceback."""
    from stabilitycheck.config import Config

    tb: TracebackType | None = exc.__traceback__
    configs: list[Config] = []
    while tb is not None:  # the innermost matching frame wins (@given's wrapper shares the test's name)
        frame = tb.tb_frame
        if frame.f_code in codes:
            code, local = frame.f_code, frame.f_locals
            params = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
            found = [local[n] for n in params if isinstance(local.get(n), Config)]
            found = found or [v for v in local.values() if isinstance(v, Config)]
            configs = list(dict.fromkeys(found)) or configs
        tb = tb.tb_next
    return configs
