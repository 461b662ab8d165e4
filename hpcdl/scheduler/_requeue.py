"""The Slurm commands a job stopped by a signal needs to go back in the queue (scontrol show job,
sacct, scontrol requeue): :class:`SlurmRequeue`, which :func:`hpcdl.preemption.settle` asks
while it carries out its decision (what to ask, and when to requeue, is decided there)."""

from __future__ import annotations

import re
import time

from hpcdl.errors import HpcdlError
from hpcdl.scheduler.slurm import SlurmScheduler, query, run_command


def cancelled(target: str, settle_s: float = 10.0) -> bool:
    """Whether Slurm says job ``target`` was cancelled (scancel sends SIGTERM too: such a job
    must not come back). slurmctld (``scontrol show job``) is asked first, and asked again while
    it says COMPLETING: right after scancel a job is COMPLETING for a moment, then CANCELLED,
    and sacct still says RUNNING; a sweep worker cancelled in its first seconds read that,
    requeued itself and came back past `hpcdl sweep cancel` (seen on the dev cluster). A
    preempted or timed-out job is still RUNNING when its signal comes. False when the state
    cannot be read."""
    deadline = time.monotonic() + settle_s
    try:
        while True:
            proc = run_command(["scontrol", "-o", "show", "job", target], timeout=30)
            state = job_state(proc.stdout) if proc is not None and proc.returncode == 0 else None
            if state == "CANCELLED":
                return True
            if state != "COMPLETING" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return any(s.state == "CANCELLED" for s in query([target]).values())
    except (HpcdlError, OSError):
        return False


def job_state(scontrol_show_job: str) -> str | None:
    """The ``JobState=`` of ``scontrol -o show job`` output (its first job), or None."""
    found = re.search(r"\bJobState=(\w+)", scontrol_show_job)
    return found.group(1) if found else None


def requeued_by_slurm(target: str) -> bool:
    """Whether Slurm has already put job ``target`` back in the queue (it does so itself when
    one of the job's nodes fails); False when the state cannot be read."""
    try:
        return any(
            s.state in ("PENDING", "REQUEUED", "NODE_FAIL") for s in query([target]).values()
        )
    except (HpcdlError, OSError):
        return False


class SlurmRequeue:
    """:class:`hpcdl.preemption.SlurmControl` on the live cluster (one process per job asks:
    the trainer's rank 0 after its checkpoint, a sweep worker between trials)."""

    def cancelled(self, job: str) -> bool:
        return cancelled(job)

    def requeue(self, job: str) -> None:
        """``scontrol requeue``; HpcdlError with Slurm's answer when refused (a job Slurm
        already requeued itself is "pending execution")."""
        SlurmScheduler().requeue(job)

    def requeued_by_slurm(self, job: str) -> bool:
        return requeued_by_slurm(job)
