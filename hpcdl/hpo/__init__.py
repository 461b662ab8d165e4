"""Hyper-parameter sweeps as Slurm job arrays, on Optuna's samplers, pruners and journal storage."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcdl.hpo.spec import SweepSpec, load_spec
    from hpcdl.hpo.sweep import Sweep

__all__ = ["Sweep", "SweepSpec", "load_spec"]

# Imported on first use: a sweep worker unpickles hpcdl.hpo.worker, and this package's import
# comes first; the submitting side (Sweep: its lifecycle, jobs, final job, accounting) is not
# the worker's, and every worker process paid for it before its first claim (issue 25).
_LAZY = {"Sweep": "hpcdl.hpo.sweep", "SweepSpec": "hpcdl.hpo.spec", "load_spec": "hpcdl.hpo.spec"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpcdl.hpo' has no attribute {name!r}")
