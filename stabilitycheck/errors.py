"""Exception types: usage errors (the caller's input is wrong) versus findings; and the 'did you mean'
their messages give."""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class StabilityCheckError(Exception):
    """Base class of every error stabilitycheck raises on purpose."""


class UsageError(StabilityCheckError):
    """Bad input from the user (arguments, knobs, model file): exit code 2, one line."""


class UserCodeError(UsageError):
    """The user's own code (a model file's factory, batch, loss or forward) failed: a usage error before
    a search starts; at one point of a search, that point is skipped and the reason reported."""


class NoLastStep(UsageError):
    """A last-step probe of a subject that has none (not a sequence subject, or a model file whose loss
    is on its last step already)."""

    @staticmethod
    def said(name: str) -> str:
        """The one line saying so, for the probe's error and the map's."""
        return (
            f"{name} has no last-step loss (only recurrent zoo families do, and model files whose blocks "
            "are called per step along one chain beside a loss on more than its last call)"
        )


class ConfigError(UsageError, ValueError):
    """A Config or Space field holds a value outside what is allowed."""


class StabilityError(AssertionError):
    """An invariant failed: the message carries the numbers, like torch.testing.assert_close."""


def no_trainable(who: str = "") -> UsageError:
    """The one error for a model with no parameter that requires grad, from `who` (watch, an invariant;
    none from probe_module, which a Config's probe and the CLI reach too): nothing to differentiate, and
    where to look."""
    return UsageError(
        f"{who}{': ' * bool(who)}the model has no parameters that require grad, so there is no gradient to "
        "measure; check "
        "requires_grad (a frozen model), or that its layers are registered as submodules (an nn.ModuleList, "
        "not a Python list)"
    )


def did_you_mean(value: object, choices: Sequence[str], prefix: str = "") -> str:
    """' (did you mean 'x'?)' naming the choice closest to `value` (difflib's ratio, 0.6 or more: a
    transposition, 'detph' for 'depth', or a slip, 'mpl' for 'mlp'), written after `prefix` ('hf:'),
    or '' where none is close."""
    close = difflib.get_close_matches(str(value).lower(), list(choices), n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""
