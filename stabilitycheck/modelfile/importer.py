"""Find a user's model file and import it like pytest imports a test file (it runs the user's code)."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import sys
import traceback
from pathlib import Path
from types import ModuleType

import torch

from stabilitycheck._validation import describe
from stabilitycheck.errors import UserCodeError

_counter = itertools.count()


class ModelFileError(UserCodeError):
    """The user's model file cannot be loaded or used: one line naming the file and the fix."""


def split_spec(spec: str) -> tuple[str, str | None]:
    """`path/model.py:factory` -> (path, factory); a spec without `:name` gives (spec, None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".py") and tail and "/" not in tail and "\\" not in tail:
        return head, tail
    return spec, None


def check_path(given: str) -> Path:
    """`given` as the path of an existing .py file, else a one-line UsageError saying what to pass."""
    path = Path(given)
    example = "e.g. `stabilitycheck examples/mlp.py` or `stabilitycheck model.py:build`"
    if not path.exists():
        if given.endswith(":") and Path(given[:-1]).is_file():  # `model.py:`: the file is there
            raise ModelFileError(f"{given}: no factory name after ':'; {example}")
        raise ModelFileError(f"{given}: no such file; expected a path to a Python model file, {example}")
    if not path.is_file() or path.suffix != ".py":
        raise ModelFileError(f"{given}: not a .py file; expected a Python model file, {example}")
    return path.resolve()


def _line_in(exc: BaseException, path: Path) -> int | None:
    """The line of `path` where the exception was raised (the deepest frame in that file)."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return lines[-1] if lines else None


def import_file(path: Path, given: str, seeded: bool = True) -> ModuleType:
    """Run the file as a fresh module (its directory on sys.path meanwhile, torch seeded to 0; or, not
    `seeded`, drawing from torch's generator as the caller left it: a module-level model drawn again
    for each seed of a verdict)."""
    name = f"stabilitycheck_modelfile_{next(_counter)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{given}: cannot be imported as a Python module; expected a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling in the user's code look themselves up here
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        with torch.random.fork_rng(devices=[]) if seeded else contextlib.nullcontext():
            if seeded:
                torch.manual_seed(0)
            spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        inside = exc.filename and Path(exc.filename) != path
        where = f"{given} (in {exc.filename}:{exc.lineno})" if inside else f"{given}:{exc.lineno}"
        raise ModelFileError(
            f"{where}: syntax error: {exc.msg}; the model file must be valid Python (try `python {given}`)"
        ) from None
    except SystemExit as exc:
        del sys.modules[name]
        raise ModelFileError(
            f"{given}: the file called sys.exit({exc.code!r}) on import; "
            "put script code under `if __name__ == '__main__':`"
        ) from None
    except Exception as exc:
        del sys.modules[name]
        line = _line_in(exc, path)
        where = f"{given}:{line}" if line else given
        raise ModelFileError(
            f"{where}: importing the file raised {describe(exc)}; "
            f"it must import without error (try `python {given}`)"
        ) from None
    finally:
        if sys.path and sys.path[0] == folder:
            del sys.path[0]
        elif folder in sys.path:
            sys.path.remove(folder)
    return module


def top_level_names(module: ModuleType) -> list[str]:
    """The public names the file itself defines (imports left out), for 'found these' messages."""
    names = []
    for key, value in vars(module).items():
        if key.startswith("_") or isinstance(value, ModuleType) or type(value).__module__ == "__future__":
            continue
        defined = inspect.isfunction(value) or inspect.isclass(value)  # an instance is the file's own
        owner = getattr(value, "__module__", module.__name__) if defined else module.__name__
        if owner == module.__name__:
            names.append(key)
    return names
