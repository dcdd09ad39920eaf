"""Strict JSON: what every JSON output of the package is written with (reports, maps, the watch log)."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any


def strict_json(data: Any, *, indent: int | None = 2) -> str:
    """JSON any strict parser reads: NaN is written null and +-Inf +-1e999 (a number too large for a
    double, which parsers read as +-Infinity), not the bare NaN/Infinity tokens Python writes. The
    from_dict readers take null in a float field back as NaN. `indent` None: one line, keys in the
    order given (a JSONL row)."""
    mark = f"inf-{uuid.uuid4().hex}"  # a string no value holds, swapped for the number after dumping

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None if math.isnan(x) else ("+" if x > 0 else "-") + mark
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    text = json.dumps(clean(data), indent=indent, sort_keys=indent is not None, allow_nan=False)
    return text.replace(f'"+{mark}"', "1e999").replace(f'"-{mark}"', "-1e999")
