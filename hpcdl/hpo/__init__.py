"""Hyper-parameter sweeps as Slurm job arrays, on Optuna's samplers, pruners and journal storage."""

from hpcdl.hpo.spec import SweepSpec, load_spec
from hpcdl.hpo.sweep import Sweep

__all__ = ["Sweep", "SweepSpec", "load_spec"]
