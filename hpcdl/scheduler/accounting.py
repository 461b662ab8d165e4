"""Slurm's accounting of finished tasks (``sacct``): when each ran and for how long (the
benchmarks, the lifecycle), and what each held and used (``hpcdl report``, ``status
--efficiency``; the figures are computed in :mod:`hpcdl.scheduler.efficiency`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from hpcdl.errors import HpcdlError
from hpcdl.scheduler.efficiency import USAGE_FIELDS, Usage, parse_rows, usages
from hpcdl.scheduler.slurm import run_command


@dataclass(frozen=True)
class TaskTimes:
    """One allocation (a task of an array, or a job): start, end and ``ElapsedRaw`` seconds."""

    task: str
    state: str
    start: datetime | None
    end: datetime | None
    elapsed_s: int
    nodes: str = ""

    @property
    def ran(self) -> bool:
        """It got nodes: sacct gives a task cancelled while pending a start time too (the
        cancel's), but no node list."""
        return self.nodes not in ("", "None assigned")


def task_times(job_ids: list[str]) -> list[TaskTimes]:
    """One row per allocation of these jobs (array tasks one by one; a requeued task's earlier
    runs included, as sacct ``--duplicates`` lists them)."""
    if not job_ids:
        return []
    cmd = ["sacct", "-X", "-n", "-P", "--duplicates", "-o", "JobID,State,Start,End,ElapsedRaw,NodeList",
           "-j", ",".join(job_ids)]  # fmt: skip
    proc = run_command(cmd)
    if proc is None or proc.returncode != 0:
        why = "sacct not found" if proc is None else proc.stderr.strip()
        raise HpcdlError(f"cannot read Slurm's accounting: {why}")
    rows = []
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) != 6:
            continue
        task, state, start, end, elapsed, nodes = parts
        rows.append(TaskTimes(task, state.split()[0] if state else "", _when(start), _when(end),
                              int(elapsed or 0), nodes))  # fmt: skip
    return rows


def tasks_that_ran(job_ids: list[str]) -> set[str]:
    """Tasks of these jobs that Slurm started on nodes at least once (empty when accounting is
    unavailable: callers then fall back to what the tasks wrote themselves)."""
    try:
        return {row.task for row in task_times(job_ids) if row.ran}
    except HpcdlError:
        return set()


def _when(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # "Unknown", "None": not started or not ended yet
        return None


def job_usage(job_ids: list[str]) -> list[Usage]:
    """What each allocation of these jobs held and used (:mod:`hpcdl.scheduler.efficiency`):
    one sacct call, steps included (their gathered figures), a requeued task's runs each."""
    if not job_ids:
        return []
    cmd = [
        "sacct",
        "-n",
        "-P",
        "--duplicates",
        "-o",
        ",".join(USAGE_FIELDS),
        "-j",
        ",".join(job_ids),
    ]
    proc = run_command(cmd)
    if proc is None or proc.returncode != 0:
        why = "sacct not found" if proc is None else proc.stderr.strip()
        raise HpcdlError(f"cannot read Slurm's accounting: {why}")
    return usages(parse_rows(proc.stdout))
