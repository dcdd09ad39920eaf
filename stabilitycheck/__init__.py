"""stabilitycheck: property-based tests and diagnostics for exploding gradients in PyTorch.

The public API is re-exported lazily, so `import stabilitycheck` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "stabilitycheck.config",
    "Run": "stabilitycheck.config",
    "assess": "stabilitycheck.seeds",
    "Judgement": "stabilitycheck.seeds",
    "resolve": "stabilitycheck.subjects",
    "phase_map": "stabilitycheck.phasemap",
    "PhaseMap": "stabilitycheck.phasemap",
    "StabilityCheckError": "stabilitycheck.errors",
    "UsageError": "stabilitycheck.errors",
    "ConfigError": "stabilitycheck.errors",
    "StabilityError": "stabilitycheck.errors",
    "Measurement": "stabilitycheck.measurement",
    "NonFinite": "stabilitycheck.measurement",
    "probe": "stabilitycheck.configprobe",
    "probe_module": "stabilitycheck.probing",
    "Limits": "stabilitycheck.verdicts",
    "Space": "stabilitycheck.space",
    "Axis": "stabilitycheck.space",
    "search": "stabilitycheck.searching",
    "SearchResult": "stabilitycheck.counterexample",
    "Counterexample": "stabilitycheck.counterexample",
    "load": "stabilitycheck.modelfile",
    "Verdict": "stabilitycheck.verdicts",
    "verdict": "stabilitycheck.verdicts",
    "watch": "stabilitycheck.watching",
    "Watcher": "stabilitycheck.watching",
    "SpikeRule": "stabilitycheck.spikes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stabilitycheck' has no attribute {name!r}")
