"""hpcdl: deep learning on Slurm supercomputers."""

from typing import Any

from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.job import Job, JobHandle
from hpcdl.site import SiteProfile, load_site

__all__ = ["ConfigError", "HpcdlError", "Job", "JobHandle", "SiteProfile", "Sweep", "load_site"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``hpcdl.Sweep`` is imported on first use (Optuna is slow to import for the CLI)."""
    if name == "Sweep":
        from hpcdl.hpo import Sweep

        return Sweep
    raise AttributeError(f"module 'hpcdl' has no attribute {name!r}")
