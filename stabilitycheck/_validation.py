"""Small helpers for one-line error messages about user values and user exceptions."""

from __future__ import annotations

import tempfile
from pathlib import Path

from stabilitycheck.errors import StabilityCheckError, UsageError, UserCodeError

MAX_MESSAGE = 300  # characters kept of a user exception's message


def one_line(text: str) -> str:
    """Whitespace collapsed and cut to MAX_MESSAGE characters, so a message stays one line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_MESSAGE else flat[: MAX_MESSAGE - 3] + "..."


def describe(exc: BaseException) -> str:
    """`Type: message` of an exception, on one line."""
    message = one_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def raised_at(exc: BaseException) -> str:
    """' at FILE:LINE in FUNC': the innermost frame of `exc` outside torch and stabilitycheck (the
    user's code, or a library it calls), or '' when it was raised in those alone."""
    import os
    import sys
    import traceback

    ours = [m for m in (sys.modules.get("torch"), sys.modules.get("stabilitycheck")) if m and m.__file__]
    dirs = tuple(os.path.dirname(m.__file__ or "") + os.sep for m in ours)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(dirs)]
    return f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""


def model_raised(exc: BaseException) -> str:
    """'the model raised Type: message at FILE:LINE in FUNC': why a point was skipped or a run stopped
    where the model's own code failed there."""
    return f"the model raised {describe(exc)}{raised_at(exc)}"


def model_failure(exc: BaseException) -> str | None:
    """Why a point cannot be judged where `exc` is the model's doing: its code failed (a
    UserCodeError, an exception raised outside this package), called sys.exit or ran out of memory;
    None where it is bad input or a bug of this package, which the caller raises. The search, its
    remedies and the map read failures by this one rule."""
    if isinstance(exc, UserCodeError):
        return str(exc)
    if isinstance(exc, SystemExit):
        return f"the model called sys.exit({exc.code!r})"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return f"out of memory ({describe(exc)})"
    if isinstance(exc, StabilityCheckError) or not isinstance(exc, Exception) or raised_here(exc):
        return None
    return model_raised(exc)


def raised_here(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc` is this package's own code: a bug of it, never a point
    skipped as the model's failure."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


_PACKAGE = Path(__file__).resolve().parent


def article(value: object) -> str:
    """The type of `value` with its article: 'an int', 'a str'; None as 'None'."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def knob_value(name: str, value: object, default: int | float) -> int | float | None:
    """`value` as the type of a numeric knob's `default`: an int knob takes integral numbers only, a
    float knob any number; None where it is no such number (knob_refusal says why)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(default, float):
            return float(value)
        if float(value).is_integer():
            return int(value)
    return None


def knob_refusal(name: str, value: object, default: int | float) -> str:
    """Why knob_value refused `value`, and an example of what it takes."""
    return f"knob {name}={value!r} is not {article(default)}; expected e.g. {name}={default!r}"


def is_number(value: object) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_image(flag: str, image: Path) -> None:
    """matplotlib is installed and writes `image`'s format (told by its suffix); else a one-line
    UsageError naming `flag`, before any work rather than when the image is drawn at the end."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(f"{flag} needs matplotlib: pip install 'stabilitycheck[plot]'") from None
    kinds = Figure().canvas.get_supported_filetypes()
    if image.suffix.lstrip(".").lower() not in kinds:
        raise UsageError(
            f"{flag} {image}: matplotlib cannot write {image.suffix or 'a file without a suffix'}; "
            "name it .png, .pdf or .svg"
        )


def writable(path: Path) -> bool:
    """A file can be made in the path's folder (where the atomic write makes its temporary one) and
    the path is no directory: tried, since permission bits say nothing of /proc or a read-only mount."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() or path.is_dir():
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
