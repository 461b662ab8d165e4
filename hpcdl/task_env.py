"""What a task knows of itself from its environment: which scheduler task it is, and which
signals its site uses. One answer for the runner, the trainer, a sweep's workers and the
requeue decision (they used to work each out on their own)."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

from hpcdl.errors import HpcdlError


def task_id(env: Mapping[str, str] | None = None, local: bool = True) -> str | None:
    """Which scheduler task this process belongs to: ``ARRAYJOB_TASK`` inside a Slurm array,
    the Slurm job id otherwise, submitit's local job id on the local profile (unless ``local``
    is false: only Slurm tasks can be requeued); None outside any job. The one answer to
    "which task am I" for journals, slots, requeues and events."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return env["SLURM_JOB_ID"]
    return env.get("SUBMITIT_LOCAL_JOB_ID") if local else None


def signal_of(name: str) -> signal.Signals:
    """``TERM``, ``SIGTERM``, ``usr2`` ... as a signal; HpcdlError for anything else."""
    try:
        return signal.Signals[f"SIG{str(name).upper().removeprefix('SIG')}"]
    except KeyError:
        raise HpcdlError(f"preemption signal {name!r} is not a signal name") from None


def time_limit_signal() -> signal.Signals:
    """The site's time-limit signal (``SUBMITIT_PREEMPT_SIGNAL``, as the batch script exports
    it; USR2 by default): sent before the time limit, and what submitit's own handler catches."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    try:
        return signal_of(name)
    except HpcdlError:
        raise HpcdlError(f"SUBMITIT_PREEMPT_SIGNAL={name!r} is not a signal name") from None
