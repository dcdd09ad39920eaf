"""Whether code runs inside a gc callback, where an exception raised is printed and dropped: signal
handlers and alarms that would raise there defer instead (no dependencies, so the CLI's signal
handler can use it before anything heavy is imported)."""

from __future__ import annotations

import gc
from typing import Any


def in_gc_callback(frame: Any) -> bool:
    """Whether `frame` runs inside a gc callback (Hypothesis registers one), up its call chain."""
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False
