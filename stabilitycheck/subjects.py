"""resolve(spec) -> Subject: the one place a name becomes a Subject (zoo family, model file, HF type).

A model file is imported once per process: later lookups of the same file return the same Subject.
"""

from __future__ import annotations

from pathlib import Path

from stabilitycheck.config import kind
from stabilitycheck.subject import Subject

_loaded: dict[str, Subject] = {}


def resolve(spec: str) -> Subject:
    """The Subject `spec` names: 'mlp' (a zoo family), 'path/model.py[:factory]', or 'hf:gpt2'."""
    what = kind(spec)
    if what == "zoo":
        from stabilitycheck.zoo import Family

        return Family(spec)
    if spec in _loaded:
        return _loaded[spec]
    if what == "hf":
        from stabilitycheck.hf import HFModel

        subject: Subject = HFModel(spec[3:])
    else:
        from stabilitycheck.modelfile import load
        from stabilitycheck.modelfile.importer import split_spec

        given, attr = split_spec(spec)
        key = f"{Path(given).resolve()}:{attr}" if attr else str(Path(given).resolve())
        if key in _loaded:
            return _loaded[key]
        subject = load(spec)
        _loaded[key] = subject
    _loaded[spec] = _loaded[subject.name] = subject
    return subject
