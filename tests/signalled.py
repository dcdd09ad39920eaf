"""A subprocess stopped by SIGTERM at a point it marks: the marker file synchronises the test with
the run, so the signal never lands before or after the part under test on a loaded machine."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any


def stopped_when_marked(
    proc: subprocess.Popen[Any], marker: Path | None, timeout: float = 120
) -> tuple[Any, Any]:
    """Wait until `marker` exists (or the process ended, or `timeout` passed), send SIGTERM, and return
    what communicate() gives; `marker` None sends nothing. The process is never left running."""
    try:
        if marker is not None:
            deadline = time.monotonic() + timeout
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=timeout)
    finally:
        proc.kill()  # never left running, whatever failed above
