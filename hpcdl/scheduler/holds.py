"""Tasks Slurm holds after their launch failed (a node that died or failed its prolog while
the task started): Slurm requeues such a task *held* (reason ``launch failed requeued held``)
so that it does not fail again at once, and the hold never ends by itself. A sweep's follow-up
job waits ``afterany`` on the array, so one held task stalled the whole sweep (seen in a chaos
run whose node went down at a task's start). The sweep's workers and ``sweep resume`` release
such tasks; a task the user held (``scontrol hold``) is left alone."""

from __future__ import annotations

#: How squeue (``%r``) and sacct/scontrol (``Reason=``) spell the reason.
_FAILED_LAUNCH = "launch failed requeued held"


def held_after_failed_launch(reason: str) -> bool:
    """Whether a pending task's reason is Slurm's hold after a failed launch."""
    return reason.strip().strip("()").replace("_", " ").lower() == _FAILED_LAUNCH


def failed_launches(squeue_rows: str) -> list[str]:
    """The task ids among ``squeue -h -r -t PD -o '%i|%r'`` rows that Slurm holds after a
    failed launch."""
    out = []
    for line in squeue_rows.splitlines():
        task, _, reason = line.partition("|")
        if task.strip() and held_after_failed_launch(reason):
            out.append(task.strip())
    return out
