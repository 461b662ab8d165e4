"""Checkpointable callables (submitit's ``checkpoint()`` protocol) stopped early: what submitit
does itself, and the seam through which :mod:`hpcdl.preemption` checkpoints one when Slurm preempts
it (submitit only logs that signal). The only code that touches submitit's signal handler.

- **Time limit**: submitit's handler of the time-limit signal (USR2) checkpoints the callable
  and requeues the job (``scontrol requeue``) at most :data:`TIMEOUT_REQUEUES` times.
- **Preemption** (``PreemptMode=REQUEUE``: SIGTERM, ``GraceTime``, SIGKILL, Slurm's requeue):
  :func:`preempt_checkpoint` gives the task of a Checkpointable callable in such a partition
  a :class:`~hpcdl.preemption.PreemptCheckpoint`, and the task calls :func:`bind_checkpoint`.
"""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcdl.preemption import PreemptCheckpoint
from hpcdl.site import SiteProfile
from hpcdl.util import atomic_path, fsync_dir

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
    from submitit.core import job_environment
    from submitit.core.utils import UncompletedJobError

    handler = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if not isinstance(handler, job_environment.SignalHandler):
        return None
    submitit_handler: Any = handler  # its attributes are private: not typed
    # submitit's own time-limit handler in this task calls the module's _checkpoint: make it
    # write the pickle as save() below does (same signature and result, only the write differs)
    job_environment._checkpoint = checkpoint_submission  # type: ignore[attr-defined,assignment]

    def save() -> str:
        delayed = submitit_handler._delayed
        path = submitit_handler._job_paths.submitted_pickle
        why = checkpoint_submission(delayed, path, delayed._timeout_countdown)  # same count
        if why:  # checkpoint() returned None: the job ends, as submitit's does
            raise UncompletedJobError(f"preempted, not resumable: {why}")
        return str(path)

    return handler.env.global_rank, save


def checkpoint_submission(delayed: Any, path: Path, countdown: int) -> str:
    """submitit's ``_checkpoint`` (call the callable's ``checkpoint()``, write the returned
    submission over the job's ``<job id>_submitted.pkl``, which the requeued job loads), with
    the write made safe. submitit's writes a ``.save_tmp`` sibling without fsync, then *removes*
    the pickle and renames: a SIGKILL (Slurm's, at the end of the grace time) between the two
    leaves no pickle at all, a crash after them may leave an empty one, and a failed write (a
    full disk) leaves the ``.save_tmp`` behind, so the next checkpoint fails on its assertion.
    Here: a temporary in the same folder, fsynced, renamed over the old pickle (which stays
    whole until then), the folder fsynced; a failed write removes its temporary and raises.
    Returns why nothing was written (``""``: written), as submitit's does."""
    new = delayed._checkpoint_function()
    if new is None:
        return "checkpoint function returned None"
    new.set_timeout(delayed._timeout_min, countdown)
    write_pickle(path, new)
    return ""


def write_pickle(path: str | Path, obj: Any) -> None:
    """``obj`` cloudpickled to ``path`` atomically and durably (temp, fsync, rename, fsync of
    the folder): readers find the old file or the new one, whole, even after a crash."""
    import cloudpickle

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # closed before the rename
        cloudpickle.dump(obj, f, pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
