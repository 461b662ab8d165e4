"""The Slurm back end. :func:`run_command` is the only place hpcdl runs a Slurm command (sbatch,
sacct, squeue, scancel, scontrol, sinfo); submitit itself runs sbatch for submissions."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.scheduler.base import JobHandle, Request, TaskStatus
from hpcdl.scheduler.core import (
    SubmititScheduler,
    first_error_line,
    folder_state,
    submitit_command,
    task_log_paths,
)
from hpcdl.scheduler.hostlist import expand_hostlist
from hpcdl.scheduler.live import SINFO_FORMAT, LivePartition, parse_partitions
from hpcdl.scheduler.states import expand_array_id, normalize_state
from hpcdl.util import get_logger

log = get_logger(__name__)
_warned_squeue = False


def run_command(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str] | None:
    """Run one Slurm command; ``None`` when it is not installed here. A command that hangs (a
    slurmctld that does not answer) raises instead of blocking the caller forever."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        raise HpcdlError(f"'{' '.join(cmd)}' did not answer within {timeout:.0f}s") from None


def _why(proc: subprocess.CompletedProcess[str] | None, cmd: str) -> str:
    return f"{cmd} not found" if proc is None else proc.stderr.strip()


def _output(cmd: list[str]) -> str:
    """stdout of a command that must succeed (for ``hpcdl site check|import``)."""
    proc = run_command(cmd)
    if proc is None:
        raise ConfigError("", "", f"'{cmd[0]}' not found: run this on a login node of the cluster")
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["no output"])[0]
        raise ConfigError("", "", f"'{' '.join(cmd)}' failed: {msg}")
    return proc.stdout


class SlurmScheduler(SubmititScheduler):
    """Batch jobs through sbatch (rendered by submitit); states from one sacct call."""

    name = "slurm"
    queued = True

    # -- requests --------------------------------------------------------------------------------
    def check(self, request: Request, where: str) -> None:
        request.check_partition(self.site, where)

    def render(self, request: Request, folder: Path | None = None) -> str:
        from submitit.slurm.slurm import _make_sbatch_string

        site = self.site
        params = request.slurm_parameters(site)
        if request.array:
            params["map_count"] = request.array
        folder = folder or site.job_root_path / "<job-folder>"
        command = submitit_command(request.interpreter(site), folder)
        return _make_sbatch_string(command=command, folder=folder, **params)

    def _preflight(self, request: Request, test_only: bool) -> None:
        if shutil.which("sbatch") is None:
            raise HpcdlError(f"site {self.site.name!r} uses Slurm but 'sbatch' is not on PATH")
        if test_only:
            sbatch_test_only(self.render(request))

    def _executor(self, request: Request, folder: Path) -> Any:
        import submitit

        ex = submitit.SlurmExecutor(
            folder=folder, python=request.interpreter(self.site), max_num_timeout=0
        )
        ex.update_parameters(**request.slurm_parameters(self.site))
        return ex

    def _job_id(self, jobs: list[Any]) -> str:
        return str(jobs[0].job_id).split("_")[0]  # an array's id without the task

    # -- existing jobs ---------------------------------------------------------------------------
    def statuses(self, handles: list[JobHandle]) -> dict[str, dict[str, TaskStatus]]:
        live = query([h.job_id for h in handles]) if handles else {}
        return {h.job_id: _expand(h, live) for h in handles}

    def cancel(self, handles: list[JobHandle], array_task: int | None = None) -> None:
        targets = [h.job_id if array_task is None else f"{h.job_id}_{array_task}" for h in handles]
        if not targets:
            return
        proc = run_command(["scancel", *targets])  # one call for every job
        if proc is None or proc.returncode != 0:
            raise HpcdlError(f"could not cancel {', '.join(targets)}: {_why(proc, 'scancel')}")

    def log_paths(
        self, handle: JobHandle, task: int = 0, array_task: int | None = None
    ) -> tuple[Path, Path]:
        jid = handle.job_id if handle.array is None else f"{handle.job_id}_{array_task or 0}"
        return task_log_paths(handle.folder, jid, task)

    def requeue(self, target: str) -> None:
        proc = run_command(["scontrol", "requeue", target], timeout=60)
        if proc is None or proc.returncode != 0:
            raise HpcdlError(f"scontrol requeue {target} failed: {_why(proc, 'scontrol')}")

    def throttle(self, handle: JobHandle, parallelism: int) -> None:
        cmd = ["scontrol", "update", f"JobId={handle.job_id}", f"ArrayTaskThrottle={parallelism}"]
        proc = run_command(cmd)
        if proc is None or proc.returncode != 0:
            raise HpcdlError(f"scontrol refused the new throttle: {_why(proc, 'scontrol')}")

    # -- the live cluster ------------------------------------------------------------------------
    def live_partitions(self) -> dict[str, LivePartition]:
        """Partitions from ``scontrol show partition`` and per-node resources from one ``sinfo``."""
        nodes = _output(["sinfo", "-h", "-N", "-o", SINFO_FORMAT])
        return parse_partitions(nodes, _output(["scontrol", "show", "partition", "-o"]))


def sbatch_test_only(script: str) -> str:
    """Ask Slurm whether it would accept the script (``sbatch --test-only``); its answer."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(script)
    try:
        proc = run_command(["sbatch", "--test-only", f.name])
    finally:
        os.unlink(f.name)
    if proc is None or proc.returncode != 0:
        why = "sbatch not found" if proc is None else proc.stderr
        raise HpcdlError(f"sbatch --test-only rejected the job: {first_error_line(why)}")
    return proc.stderr.strip()


def hostnames(nodelist: str) -> list[str]:
    """The nodes of an allocation: ``scontrol show hostnames`` when present (not in every
    container), else hpcdl's own hostlist parser (``ValueError`` if it cannot read the list)."""
    try:
        proc = run_command(["scontrol", "show", "hostnames", nodelist], timeout=20)
    except HpcdlError:
        proc = None
    if proc is not None and proc.returncode == 0 and proc.stdout.split():
        return proc.stdout.split()
    return expand_hostlist(nodelist)


# -- states ----------------------------------------------------------------------------------------
def _expand(h: JobHandle, live: dict[str, TaskStatus]) -> dict[str, TaskStatus]:
    """Every task of ``h``; tasks the scheduler forgot get their state from the job folder."""
    ids = [h.job_id] if h.array is None else [f"{h.job_id}_{i}" for i in range(h.array)]
    out = {}
    for tid in ids:
        status = live.get(tid) or (live.get(h.job_id) if h.array is not None else None)
        out[tid] = status or TaskStatus(folder_state(h.folder, tid))
    return out


def query(job_ids: list[str]) -> dict[str, TaskStatus]:
    """Batched sacct; ids missing there (accounting off or lagging) come from one squeue call."""
    found: dict[str, TaskStatus] = {}
    proc = run_command(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Reason", "-j", ",".join(job_ids)])  # fmt: skip
    if proc is not None and proc.returncode == 0:
        _parse_rows(proc.stdout, found, overwrite=True)
    else:
        _warn_squeue(proc)
    missing = [j for j in job_ids if not any(k.split("_")[0] == j for k in found)]
    pending_arrays = [k for k in found if k.endswith("_*")]
    # sacct keeps the reason of its last update (``Dependency``); squeue has the live one
    # (``DependencyNeverSatisfied``), so pending jobs are asked there too.
    pending = sorted({k.split("_")[0] for k, s in found.items() if s.state == "PENDING"})
    if missing or pending_arrays or pending:
        ids = ",".join(
            dict.fromkeys([*(missing or job_ids if pending_arrays else missing), *pending])
        )
        proc = run_command(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ids])
        if proc is not None and proc.returncode == 0:
            _parse_rows(proc.stdout, found, overwrite=False)
    return found


def _parse_rows(text: str, found: dict[str, TaskStatus], overwrite: bool) -> None:
    """``JOBID|STATE|REASON`` lines (sacct -P, squeue -o) into ``found``."""
    for line in text.splitlines():
        jid, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        state = normalize_state(state)
        status = TaskStatus(state, _reason(reason) if state == "PENDING" else "")
        for tid in expand_array_id(jid):
            if overwrite or tid not in found or found[tid].state == "PENDING":
                found[tid] = status


def _reason(raw: str) -> str:
    raw = raw.strip()
    return "" if raw in {"", "None", "(null)"} else raw


def _warn_squeue(proc: subprocess.CompletedProcess[str] | None) -> None:
    global _warned_squeue
    if not _warned_squeue:
        why = "sacct not found" if proc is None else (proc.stderr.strip().splitlines() or ["?"])[0]
        log.warning("note: accounting unavailable (%s); using squeue and job folders", why)
        _warned_squeue = True
