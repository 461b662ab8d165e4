"""hpcdl: deep learning on Slurm supercomputers."""

from hpcdl.errors import ConfigError, HpcdlError

__all__ = ["ConfigError", "HpcdlError"]
__version__ = "0.1.0"
