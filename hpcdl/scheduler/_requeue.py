"""Whether and how a job stopped by a signal goes back in the queue: one decision for the
trainer (after its checkpoint) and a sweep worker (between trials); the Slurm commands it needs
(sacct, scontrol requeue) stay in this package."""

from __future__ import annotations

from hpcdl.errors import HpcdlError
from hpcdl.scheduler.slurm import SlurmScheduler, query
from hpcdl.task_env import time_limit_signal


def cancelled(target: str) -> bool:
    """Whether Slurm's accounting says job ``target`` was cancelled (scancel sends SIGTERM too:
    such a job must not come back). False when the state cannot be read."""
    try:
        return any(s.state == "CANCELLED" for s in query([target]).values())
    except (HpcdlError, OSError):
        return False


def requeued_by_slurm(target: str) -> bool:
    """Whether Slurm has already put job ``target`` back in the queue (it does so itself when
    one of the job's nodes fails); False when the state cannot be read."""
    try:
        return any(
            s.state in ("PENDING", "REQUEUED", "NODE_FAIL") for s in query([target]).values()
        )
    except (HpcdlError, OSError):
        return False


def requeue_job(target: str, sig: str) -> str:
    """Put Slurm job ``target``, stopped by ``sig``, back in the queue (one process per job
    calls this; the trainer after its checkpoint, a sweep worker between trials):
    ``"requeued"``; ``"cancelled"`` when scancel stopped it (scancel sends SIGTERM too: such a
    job must not come back); ``"already"`` when Slurm requeued it itself (a node failure).
    Raises :class:`HpcdlError` when the requeue fails otherwise."""
    if sig != time_limit_signal().name and cancelled(target):
        return "cancelled"
    try:
        SlurmScheduler().requeue(target)
    except HpcdlError as exc:
        if "pending execution" not in str(exc) and not requeued_by_slurm(target):
            raise
        return "already"
    return "requeued"
