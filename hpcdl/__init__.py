"""hpcdl: deep learning on Slurm supercomputers."""

from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.job import Job, JobHandle
from hpcdl.site import SiteProfile, load_site

__all__ = ["ConfigError", "HpcdlError", "Job", "JobHandle", "SiteProfile", "load_site"]
__version__ = "0.1.0"
