"""Checkpointable callables (submitit's ``checkpoint()`` protocol) stopped early: what submitit
does itself, and the seam through which :mod:`hpcdl.runner` checkpoints one when Slurm preempts
it (submitit only logs that signal). The only code that touches submitit's signal handler.

- **Time limit**: submitit's handler of the time-limit signal (USR2) checkpoints the callable
  and requeues the job (``scontrol requeue``) at most :data:`TIMEOUT_REQUEUES` times.
- **Preemption** (``PreemptMode=REQUEUE``: SIGTERM, ``GraceTime``, SIGKILL, Slurm's requeue):
  :func:`preempt_checkpoint` gives the task of a Checkpointable callable in such a partition
  a :class:`~hpcdl.runner.PreemptCheckpoint`, and the runner calls :func:`bind_checkpoint`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from hpcdl.runner import PreemptCheckpoint
from hpcdl.site import SiteProfile

# How many times submitit requeues a Checkpointable callable that reaches its time limit
# (submitit's own default). Nothing else is requeued at a time limit whatever this says:
# submitit's handler requeues there only callables with ``checkpoint()``, and hpcdl's trainer
# replaces that handler with its own (``job.max_requeues``).
TIMEOUT_REQUEUES = 3
# After a preemption checkpoint: how long past the grace time the task waits for Slurm's SIGKILL
# (Slurm's KillWait, 30 s by default, and message delays) before it decides the signal was no
# preemption and carries on.
KILL_MARGIN_S = 60.0


def preempt_checkpoint(
    site: SiteProfile, partition: str | None, function: Any
) -> PreemptCheckpoint | None:
    """What the task of ``function`` does when Slurm preempts it in ``partition``; ``None``
    unless the callable is Checkpointable and the partition's preemption requeues (otherwise
    nothing would come back to the checkpoint)."""
    part = site.partition(partition) if hasattr(function, "checkpoint") else None
    if part is None or part.preempt_mode != "REQUEUE":
        return None
    grace = site.preemption.grace_time_s if part.grace_time_s is None else part.grace_time_s
    signals = tuple(site.preemption.preempt_signals)
    return PreemptCheckpoint(signals, grace + KILL_MARGIN_S, bind_checkpoint)


def bind_checkpoint() -> tuple[int, Callable[[], str]] | None:
    """In a submitit Slurm task, before SIGTERM gets another handler: this task's global rank
    and the function that checkpoints the running callable into the job's pickle (as submitit's
    own handler does, keeping the job's time-limit count) and returns its path; ``None``
    elsewhere. submitit's handler of SIGTERM is a method of the object that holds the job's
    paths and the running submission."""
    from submitit.core.job_environment import SignalHandler, _checkpoint
    from submitit.core.utils import UncompletedJobError

    handler = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if not isinstance(handler, SignalHandler):
        return None
    submitit_handler: Any = handler  # its attributes are private: not typed

    def save() -> str:
        delayed = submitit_handler._delayed
        path = submitit_handler._job_paths.submitted_pickle
        why = _checkpoint(delayed, path, delayed._timeout_countdown)  # not a timeout: same count
        if why:  # checkpoint() returned None: the job ends, as submitit's does
            raise UncompletedJobError(f"preempted, not resumable: {why}")
        return str(path)

    return handler.env.global_rank, save
