"""A user's model file as a Subject: `path/model.py[:factory]` turned into (model, inputs, loss).

The file is imported like pytest imports a test file (it runs the user's code) and searched, in order,
for (1) a factory `build(**knobs) -> nn.Module` (or the `:factory` named in the spec) with optional
`SPACE`, `batch(model, **knobs)`, `loss(output, inputs)` and `INIT`; (2) a module-level `model` and
`example_input`, whose knob is `seq_len` when the file sets `SEQ_DIM`. Every failure to find or use
these is a `ModelFileError`: one line naming the file, what was wrong and what to do.

The init knob: `INIT = "name"` (or `("name", critical_value)`), else a parameter named init_scale,
initializer_range, init_std, initializer_factor or init_gain (critical value: its default), else a
knob `init_scale` that multiplies every weight of rank >= 2 after the model's own init (critical 1.0).
"""

from __future__ import annotations

from stabilitycheck.modelfile.convention import find
from stabilitycheck.modelfile.importer import ModelFileError, check_path, import_file, split_spec
from stabilitycheck.modelfile.subject import ModelFile


def load(spec: str) -> ModelFile:
    """Import `path/model.py[:factory]` (running the user's code) and return it as a Subject."""
    given, attr = split_spec(spec)
    path = check_path(given)
    module = import_file(path, given)
    name, is_factory = find(given, attr, module)
    return ModelFile(given, name, module, is_factory=is_factory)


__all__ = ["ModelFile", "ModelFileError", "load"]
