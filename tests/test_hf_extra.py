"""The Hugging Face subject without transformers installed: one line naming the extra."""

from __future__ import annotations

import sys

import pytest

from stabilitycheck.errors import UsageError
from stabilitycheck.hf import HFModel


def test_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    for model_type in ("gpt2", "llama"):
        with pytest.raises(UsageError) as err:
            HFModel(model_type)  # resolve() caches subjects: build one afresh
        assert str(err.value) == f"hf:{model_type} needs the optional extra: pip install 'stabilitycheck[hf]'"
