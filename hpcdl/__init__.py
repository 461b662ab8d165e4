"""hpcdl: deep learning on Slurm supercomputers."""

import importlib
from typing import Any

from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.site import SiteProfile, load_site

__all__ = [
    "ConfigError",
    "HpcdlError",
    "Job",
    "JobHandle",
    "Run",
    "SiteProfile",
    "Sweep",
    "load_site",
]
__version__ = "0.1.0"

# Imported on first use: Optuna and torch are slow to import for the CLI, and importing a lower
# layer (``import hpcdl.scheduler``) must not pull in the layers above it through this package.
_LAZY = {
    "Job": "hpcdl.job",
    "JobHandle": "hpcdl.scheduler",
    "Sweep": "hpcdl.hpo",
    "Run": "hpcdl.train.run",
}


def __getattr__(name: str) -> Any:
    """``hpcdl.Job``, ``hpcdl.JobHandle``, ``hpcdl.Sweep`` and ``hpcdl.Run`` on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpcdl' has no attribute {name!r}")
