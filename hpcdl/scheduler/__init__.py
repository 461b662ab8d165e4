"""Where jobs run: one :class:`Scheduler` interface with a Slurm and a local back end (laid out
like submitit's ``core`` / ``slurm`` / ``local``), the :class:`JobHandle` a submission returns, and
the on-disk registry of submissions.

Only this package runs Slurm commands and knows submitit's internals. ``Job.submit`` checks a
request and hands it to :func:`get_scheduler` (the back end the site profile names); any process
follows the job through its handle, without the profile::

    handle = Job(command=["python", "train.py"], site="devcluster").submit()
    handle.state(), handle.statuses(), handle.wait(600), handle.cancel()
    job_statuses(load_handles())  # one sacct call for every recorded Slurm job
"""

from typing import Any

from hpcdl.scheduler._requeue import SlurmRequeue
from hpcdl.scheduler.interface import (
    JobHandle,
    Scheduler,
    TaskStatus,
    backend_for,
    cancel_jobs,
    get_scheduler,
    job_states,
    job_statuses,
    log_tail,
)
from hpcdl.scheduler.live import import_site as _draft_profile
from hpcdl.scheduler.local import LocalScheduler
from hpcdl.scheduler.registry import (
    clean,
    find_handle,
    find_task,
    load_handles,
    recent_handles,
    record,
    registry_roots,
)
from hpcdl.scheduler.slurm import SlurmScheduler
from hpcdl.scheduler.states import FINISHED, STATES, summarize
from hpcdl.scheduler.submission import setup_lines
from hpcdl.site import SiteProfile

__all__ = [
    "FINISHED",
    "STATES",
    "JobHandle",
    "LocalScheduler",
    "Scheduler",
    "SlurmRequeue",
    "SlurmScheduler",
    "TaskStatus",
    "backend_for",
    "cancel_jobs",
    "check_site",
    "clean",
    "find_handle",
    "find_task",
    "get_scheduler",
    "import_site",
    "job_states",
    "job_statuses",
    "load_handles",
    "log_tail",
    "recent_handles",
    "record",
    "registry_roots",
    "setup_lines",
    "summarize",
]


def check_site(profile: SiteProfile) -> list[str]:
    """Every disagreement between a profile and its live cluster (none for a local profile)."""
    return get_scheduler(profile).check_site()


def import_site(name: str) -> dict[str, Any]:
    """A draft profile named ``name`` from the Slurm cluster this machine talks to."""
    slurm = SlurmScheduler()
    return _draft_profile(name, slurm.live_partitions(), slurm.live_config())
