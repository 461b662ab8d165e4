"""How many tasks (ranks) a job started with. A job of one node count has the tasks its handle
says; an elastic job (``nodes: MIN-MAX``) has ``NNodes × tasks per node`` of the count Slurm
gave its (last) start, which its handle cannot know at submission: it records the largest
count, and ``hpcdl logs --task N`` and ``hpcdl attach`` would take ranks that never ran."""

from __future__ import annotations

from hpcdl.scheduler.arrays import ArrayPart, slurm_task_id
from hpcdl.scheduler.interface import JobHandle
from hpcdl.scheduler.slurm import run_command
from hpcdl.util import get_logger

log = get_logger(__name__)


def tasks_of_start(sacct_rows: str, tasks_per_node: int) -> int | None:
    """The task count of a start from ``squeue -h -o %T|%D`` or ``sacct -X -n -P -o
    State,NNodes`` rows of one job or array task: NNodes × ``tasks_per_node`` of its row; None
    while it is pending (the request then, not an allocation) or when there is no row."""
    for line in sacct_rows.splitlines():
        state, _, nodes = line.strip().partition("|")
        if not state or state.split()[0] == "PENDING":
            continue
        if nodes.strip().isdigit() and int(nodes) > 0:
            return int(nodes) * tasks_per_node
    return None


def slurm_id(handle: JobHandle, array_task: int | None) -> str:
    """Slurm's id of the job, or of one array task by its global index."""
    if handle.array is None or array_task is None:
        return handle.job_id
    parts = handle.parts or [ArrayPart(job_id=handle.job_id, offset=0, count=handle.array)]
    part = next((p for p in parts if p.offset <= array_task < p.offset + p.count), parts[0])
    return slurm_task_id(part, array_task - part.offset)


def started_tasks(handle: JobHandle, array_task: int | None = None) -> int:
    """The tasks the job (or array task) runs or ran with: its handle's count, or for an
    elastic Slurm job the count of the nodes it got. Until it starts (or when accounting does
    not answer) the largest count: there is no log of any rank yet to refuse."""
    if handle.tasks_per_node is None or handle.scheduler != "slurm":
        return handle.tasks
    target = slurm_id(handle, array_task)
    # squeue while it is queued or running (sacct lags its start by seconds: PENDING|0), sacct
    # once it has left the queue; both as State|NNodes
    for cmd in (["squeue", "-h", "-o", "%T|%D", "-j", target],
                ["sacct", "-X", "-n", "-P", "-o", "State,NNodes", "-j", target]):  # fmt: skip
        proc = run_command(cmd)
        if proc is None or proc.returncode != 0:  # squeue: a job it has forgotten is an error
            continue
        if proc.stdout.strip():
            return tasks_of_start(proc.stdout, handle.tasks_per_node) or handle.tasks
    log.warning("cannot read the node count of elastic job %s from squeue or sacct", target)
    return handle.tasks
