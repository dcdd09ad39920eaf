"""resolve(spec) -> Subject: the one place a name becomes a Subject (zoo family, model file, HF type).

A model file is imported once per process: later lookups of the same file return the same Subject
(under the path as typed this time, for its label and messages).
"""

from __future__ import annotations

import copy
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
    if what == "hf":
        from stabilitycheck.hf import HFModel

        if spec not in _loaded:
            _loaded[spec] = HFModel(spec[3:])
        return _loaded[spec]
    from stabilitycheck.modelfile import load
    from stabilitycheck.modelfile.importer import split_spec

    given, attr = split_spec(spec)
    key = f"{Path(given).resolve()}:{attr}" if attr else str(Path(given).resolve())
    if key not in _loaded:
        subject = load(spec)
        _loaded[key] = _loaded[subject.name] = subject  # by its name too: what a Config holds
    return _as_typed(_loaded[key], given)


def _as_typed(subject: Subject, given: str) -> Subject:
    """A loaded model file under the path typed this time (relative or absolute): its label and
    messages say the path as typed (they said whichever spelling loaded it first); not run again."""
    from stabilitycheck.modelfile.subject import ModelFile

    if isinstance(subject, ModelFile) and subject.given != given:
        twin = copy.copy(subject)
        twin.given = given
        return twin
    return subject
