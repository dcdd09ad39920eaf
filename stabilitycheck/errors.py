"""Exception types: usage errors (the caller's input is wrong) versus findings."""

from __future__ import annotations


class StabilityCheckError(Exception):
    """Base class of every error stabilitycheck raises on purpose."""


class UsageError(StabilityCheckError):
    """Bad input from the user (arguments, knobs, model file): exit code 2, one line."""


class UserCodeError(UsageError):
    """The user's own code (a model file's factory, batch, loss or forward) failed: a usage error before
    a search starts; at one point of a search, that point is skipped and the reason reported."""


class ConfigError(UsageError, ValueError):
    """A Config or Space field holds a value outside what is allowed."""


class StabilityError(AssertionError):
    """An invariant failed: the message carries the numbers, like torch.testing.assert_close."""
