"""The local back end: jobs are processes on this machine (submitit's local executor); states
come from /proc and submitit's result files, cancelling signals the process tree."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from hpcdl.config import parse_time
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.scheduler.interface import JobHandle, Request, TaskStatus
from hpcdl.scheduler.live import LivePartition
from hpcdl.scheduler.proctree import children_stop_on_sigint, pid_alive, stop_trees
from hpcdl.scheduler.submission import SubmititScheduler, folder_state, setup_lines, task_log_paths
from hpcdl.script_values import chain_local_setup


class LocalScheduler(SubmititScheduler):
    """Processes on this machine, one node, up to the profile's ``max_local_tasks``."""

    name = "local"
    queued = False

    def check(self, request: Request, where: str) -> None:
        site = self.site
        if request.nodes != 1:
            raise ConfigError(
                where, "nodes", f"the local profile runs on one node, got {request.nodes}"
            )
        if request.ntasks_per_node > site.max_local_tasks:
            raise ConfigError(
                where,
                "tasks_per_node",
                f"{request.ntasks_per_node} exceeds the local limit of {site.max_local_tasks}",
            )
        if request.partition is not None:
            raise ConfigError(where, "partition", "the local profile has no partitions")
        if request.dependencies:
            raise ConfigError(where, "dependencies", "the local profile does not support them")
        site.check_array(request.array, where)  # every task is a process here

    def render(self, request: Request, folder: Path | None = None) -> str:
        raise HpcdlError(
            f"site {self.site.name!r} is a local profile: jobs run through submitit's local "
            "executor, there is no sbatch script (pick a Slurm site with --site)"
        )

    def _executor(self, request: Request, folder: Path) -> Any:
        import submitit

        ex = submitit.LocalExecutor(folder=folder, python=request.interpreter(self.site))
        params = self.executor_parameters(request)
        params["setup"] = setup_file(folder, params.get("setup", []))
        ex.update_parameters(**params)
        return ex

    def executor_parameters(self, request: Request) -> dict[str, Any]:
        """The submitit LocalExecutor parameters for ``request``."""
        site = self.site
        return {
            "timeout_min": parse_time(request.time),
            "tasks_per_node": request.launched_tasks_per_node,
            "gpus_per_node": request.gpus_per_node,
            "setup": setup_lines(request, site),  # into setup.sh at submission (setup_file)
            "signal_delay_s": site.preemption.delay_s,
        }

    def _job_id(self, jobs: list[Any]) -> str:
        return str(jobs[0].job_id)  # the controller's pid: the handle's id on this machine

    def _local_ids(self, jobs: list[Any]) -> list[str]:
        return [str(j.job_id) for j in jobs]

    # -- existing jobs ---------------------------------------------------------------------------
    def statuses(self, handles: list[JobHandle]) -> dict[str, dict[str, TaskStatus]]:
        return {
            h.job_id: {
                (lid if h.array is None else f"{h.job_id}_{i}"): TaskStatus(_local_state(h, lid))
                for i, lid in enumerate(h.local_ids)
            }
            for h in handles
        }

    def submit(self, request: Request, test_only: bool = False) -> JobHandle:
        with children_stop_on_sigint():  # else a cancel's SIGINT could not stop the job
            return super().submit(request, test_only)

    def cancel(self, handles: list[JobHandle], array_task: int | None = None) -> None:
        """Stop the jobs' processes and return once they are gone (:func:`stop_trees`). The
        marker file makes the state CANCELLED even after the processes are gone."""
        roots = []
        for handle in handles:
            ids = handle.local_ids if array_task is None else [handle.local_ids[array_task]]
            for pid in ids:
                (Path(handle.folder) / f"{pid}.cancelled").touch()
                if pid_alive(int(pid), handle.submitted_at):
                    roots.append(int(pid))
        stop_trees(roots, last=_is_controller)

    def log_paths(
        self, handle: JobHandle, task: int = 0, array_task: int | None = None
    ) -> tuple[Path, Path]:
        return task_log_paths(handle.folder, handle.local_ids[array_task or 0], task)

    def live_partitions(self) -> dict[str, LivePartition]:
        return {}

    def check_site(self) -> list[str]:
        return []  # no live cluster to disagree with


def setup_file(folder: Path, lines: list[str]) -> list[str]:
    """submitit's local executor runs the setup lines as ``sh -c 'L1 && L2 && python ...'``, so
    every value in them (the site's ``export`` lines, the job's setup) would be in the command
    line that ``ps`` shows every user of the machine. They go into ``setup.sh`` in the private
    job folder instead (as a Slurm job's are in its script), and the command line only sources
    it. Each line is a ``{ ...; }`` group of the same ``&&`` chain: a failing line still stops
    the job, and a ``# comment`` ends at its own line."""
    groups = chain_local_setup([ln for ln in lines if ln.strip()])
    if not groups:
        return []
    path = folder / "setup.sh"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(" && ".join(groups) + "\n")
    return [f". {shlex.quote(str(path))}"]


def _is_controller(pid: int) -> bool:
    """Whether ``pid`` is submitit's local controller (it kills its tasks 1 s after SIGINT:
    :func:`stop_trees` interrupts it after them)."""
    try:
        return b"submitit.local._local" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _local_state(h: JobHandle, pid: str) -> str:
    folder = Path(h.folder)
    if (folder / f"{pid}.cancelled").exists():
        return "CANCELLED"
    if pid_alive(int(pid), h.submitted_at):
        return "RUNNING"
    state = folder_state(folder, pid)
    return "FAILED" if state == "UNKNOWN" else state
