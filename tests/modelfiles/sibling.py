"""Imports a helper module that sits next to it (the file's directory is on sys.path while importing)."""

from sibling_helper import make_layers  # type: ignore[import-not-found]
from torch import nn


def build(depth: int = 3) -> nn.Module:
    return make_layers(depth)  # type: ignore[no-any-return]
