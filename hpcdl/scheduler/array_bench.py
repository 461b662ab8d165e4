"""``hpcdl bench array``'s Slurm side: the raw ``sbatch --array --wrap`` it measures hpcdl
against, the wait for every task of an array (from sacct), and the table. The hpcdl arrays
themselves are submitted by the command (``hpcdl.cli.bench_array``) as any user's jobs."""

from __future__ import annotations

import shlex
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpcdl.errors import HpcdlError
from hpcdl.scheduler.accounting import task_times
from hpcdl.scheduler.slurm import run_command
from hpcdl.scheduler.states import FINISHED, normalize_state
from hpcdl.site import SiteProfile

#: What every task of every path runs (the issue's measurement: a tiny Python command).
COMMAND = ["python3", "-c", "pass"]


def tiny_task() -> None:
    """The callable array's task: nothing, so its cost is the Python path's own."""


@dataclass
class PathResult:
    """One path's run: wall seconds from before its submission to its last task's end as seen
    by sacct, and how many tasks ran exactly once and completed."""

    path: str
    job_ids: list[str]
    wall_s: float
    tasks: int
    completed_once: int
    submit_s: float = 0.0  # of wall_s: until the submission returned (hpcdl: check, folder, sbatch)
    ratio: float = 0.0  # raw's wall / this wall (1.0: as fast as Slurm alone)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def submit_raw(site: SiteProfile, n: int, throttle: int, folder: Path) -> str:
    """``sbatch --array=0-N-1%T --wrap COMMAND`` on the site's default partition; its id."""
    part = site.partition(None)
    assert part is not None
    folder.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--array=0-{n - 1}%{throttle}", f"--partition={part.name}",
           "--time=10", "--job-name=bench-raw", f"--output={folder}/%A_%a.out",
           "--wrap", shlex.join(COMMAND)]  # fmt: skip
    proc = run_command(cmd, timeout=120)
    if proc is None or proc.returncode != 0:
        why = "sbatch not found" if proc is None else proc.stderr.strip()
        raise HpcdlError(f"raw sbatch failed: {why}")
    return proc.stdout.strip().split(";")[0]


def wait_tasks(job_ids: list[str], n: int, timeout: float, poll: float = 0.5) -> int:
    """Poll sacct until all ``n`` tasks of these jobs have finished; how many of them ran exactly
    once and completed. Cancels the jobs and raises with their states after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in task_times(job_ids) if "[" not in r.task]  # a pending range: one row
        finished = {r.task for r in rows if normalize_state(r.state) in FINISHED}
        if len(finished) >= n:
            runs: dict[str, int] = {}
            for r in rows:
                runs[r.task] = runs.get(r.task, 0) + (1 if r.ran else 0)
            ok = {r.task for r in rows if normalize_state(r.state) == "COMPLETED"}
            return sum(1 for task in ok if runs.get(task) == 1)
        if time.monotonic() > deadline:
            run_command(["scancel", *job_ids])
            states = sorted({normalize_state(r.state) for r in rows})
            raise HpcdlError(
                f"bench array: jobs {','.join(job_ids)}: {len(finished)} of {n} tasks finished "
                f"after {timeout:.0f}s (states {', '.join(states) or 'none yet'}); cancelled"
            )
        time.sleep(poll)


def median_run(runs: list[PathResult]) -> PathResult:
    """One path's rounds as one row: the median wall and submission times, the fewest tasks
    that ran once (every round must have run every task once)."""
    return PathResult(
        runs[0].path, [j for r in runs for j in r.job_ids],
        statistics.median(r.wall_s for r in runs), runs[0].tasks,
        min(r.completed_once for r in runs), statistics.median(r.submit_s for r in runs),
    )  # fmt: skip


def render(results: list[PathResult], n: int, throttle: int, site: str, repeat: int = 1) -> list[str]:  # fmt: skip
    """The side-by-side table (80 columns); ratios against the raw run (the first)."""
    rounds = f", median of {repeat} rounds" if repeat > 1 else ""
    out = [f"bench array: {n} tasks, throttle {throttle}, site {site}{rounds}",
           f"each task: {shlex.join(COMMAND)}",
           "path                              wall s  submit s  tasks/s  vs raw  ran once",
           "--------------------------------  ------  --------  -------  ------  ---------"]  # fmt: skip
    for r in results:
        rate = r.tasks / r.wall_s if r.wall_s > 0 else 0.0
        out.append(f"{r.path:<32}  {r.wall_s:>6.1f}  {r.submit_s:>8.1f}  {rate:>7.1f}  "
                   f"{r.ratio:>6.2f}  {r.completed_once:>5}/{r.tasks}")  # fmt: skip
    return out
