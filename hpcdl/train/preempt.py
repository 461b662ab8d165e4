"""Preemption: a signal handler on every rank, a collective stop decision, then requeue.

Slurm sends the preemption signal (``--signal=USR2@delay``; never USR1, which NCCL swallows) to
every task of the job some seconds before the time limit. hpcdl handles it in three steps:

1. every rank installs :class:`PreemptionFlag`, which only sets a flag (no work inside a signal
   handler: the main thread may be in the middle of a collective);
2. at each optimizer-step boundary the trainer all-reduces the flags together with its metrics,
   so all ranks see the same answer at the same step and none is left waiting for another;
3. all ranks write the checkpoint, then rank 0 requeues the job (the exact array task inside an
   array), at most ``max_requeues`` times (``SLURM_RESTART_COUNT`` counts them).

Why not submitit's ``Checkpointable``: submitit's handler runs ``checkpoint()`` on global rank 0
only, inside the signal handler (that is, at an arbitrary point of a step), then requeues and
exits rank 0 alone. A DeepSpeed checkpoint is a collective every rank must enter at the same
step, and ZeRO shards optimizer state over all ranks, so rank 0 cannot save it alone: the other
ranks' state would be lost and rank 0 would hang in the save. Our handler replaces submitit's
(the task function runs after submitit installed its own).
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from hpcdl.errors import HpcdlError


def preemption_signal() -> signal.Signals:
    """The site's preemption signal (``SUBMITIT_PREEMPT_SIGNAL``, as hpcdl.Job exports it), USR2
    by default."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        raise HpcdlError(f"SUBMITIT_PREEMPT_SIGNAL={name!r} is not a signal name") from None


class PreemptionFlag:
    """Set when this rank receives the preemption signal; read at step boundaries."""

    def __init__(self) -> None:
        self.signum = preemption_signal()
        self.requested = False
        signal.signal(self.signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            print(
                f"hpcdl: received {signal.Signals(signum).name}: checkpointing at the next step",
                file=sys.stderr,
                flush=True,
            )
        self.requested = True


def requeue_target() -> str | None:
    """The Slurm job to requeue: ``ARRAYJOB_TASK`` inside an array, else the job id."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def restarts() -> int:
    """How many times Slurm has requeued this job already."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def after_checkpoint(step: int, tag: str, run_dir: str, max_requeues: int, rank: int) -> str:
    """Called on every rank once the preemption checkpoint is complete. Rank 0 requeues the job;
    every rank raises (so the job ends FAILED) if it cannot or must not be requeued."""
    sig = preemption_signal().name
    resume = f"resubmit with run_dir={run_dir} to continue from checkpoint {tag}"
    target = requeue_target()
    if target is None:
        raise HpcdlError(f"stopped by {sig} at step {step} (not a Slurm job, no requeue): {resume}")
    done = restarts()
    if done >= max_requeues:
        raise HpcdlError(
            f"preempted at step {step} after {done} requeue(s), job.max_requeues={max_requeues} "
            f"exhausted: not requeued; {resume}"
        )
    if rank == 0:
        from hpcdl.scheduler import SlurmScheduler  # the target is a Slurm job (SLURM_JOB_ID)

        try:
            SlurmScheduler().requeue(target)
        except HpcdlError as exc:
            raise HpcdlError(f"{exc}; {resume}") from None
        print(
            f"hpcdl: requeued job {target} after step {step} "
            f"(requeue {done + 1} of at most {max_requeues})",
            flush=True,
        )
    return target
