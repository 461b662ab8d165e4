"""What both back ends share: submission through submitit, and the only code that knows
submitit's internals (its job folder layout: log and result-pickle file names, the submission
script). submitit is pinned in pyproject.toml because this layout is not public API."""

from __future__ import annotations

import os
import pickle
import re
import secrets
import shlex
import shutil
import time
from abc import abstractmethod
from datetime import datetime
from pathlib import Path
from typing import Any

from hpcdl import containers
from hpcdl.errors import HpcdlError
from hpcdl.scheduler.arrays import ArrayPart, PartPlan, plan_parts
from hpcdl.scheduler.base import JobHandle, Request, Scheduler
from hpcdl.scheduler.registry import record
from hpcdl.site import SiteProfile


class SubmititScheduler(Scheduler):
    """A back end whose jobs are submitit executors' jobs in a private job folder."""

    def submit(self, request: Request, test_only: bool = False) -> JobHandle:
        site = self.site
        self._preflight(request, test_only)
        folder = new_job_folder(site, request.name)
        try:  # the code snapshot (if any) goes into the folder before anything is rendered
            request = request.staged(site, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        executor = self._executor(request, folder)
        plans = self.plan(request)
        parts: list[ArrayPart] = []
        first: list[Any] = []  # the first part's submitit jobs (the handle's id)
        try:
            if not plans:
                first = [executor.submit(request.task(site))]
            for plan in plans:  # one batch (one Slurm array) per part; tasks keep global indices
                if len(plans) > 1:
                    self._configure_part(executor, request, plan, parts)
                with executor.batch():
                    jobs = [executor.submit(request.task(site, plan.offset + j)) for j in range(plan.count)]  # fmt: skip
                first = first or jobs
                part = ArrayPart(job_id=self._job_id(jobs), offset=plan.offset, count=plan.count,
                                 lane=plan.lane, throttle=plan.throttle)  # fmt: skip
                parts.append(part)
        except Exception as exc:  # submitit raises bare exceptions carrying sbatch's message
            self._abort([p.job_id for p in parts])  # no half-submitted job stays queued
            shutil.rmtree(folder, ignore_errors=True)
            raise HpcdlError(f"submission failed: {first_error_line(exc)}") from None
        job_id = self._job_id(first)
        first_script = folder / f"{job_id}_submission.sh"  # a split array's: its first part's
        script = (
            first_script if first_script.is_file() else next(folder.glob("*_submission.sh"), None)
        )
        handle = JobHandle(
            job_id=job_id,
            name=request.name,
            site=site.name,
            scheduler=self.name,
            folder=str(folder),
            script=str(script) if script else None,
            array=request.array,
            tasks=request.nodes * request.launched_tasks_per_node,
            submitted_at=time.time(),
            local_ids=self._local_ids(first),
            parts=parts if len(parts) > 1 else [],
        )
        record(site, handle)
        return handle

    def plan(self, request: Request) -> list[PartPlan]:
        """The Slurm arrays an array request becomes (none for a single job)."""
        if not request.array:
            return []
        return plan_parts(request.array, self.site.max_array_size, request.throttle)

    def _configure_part(
        self, executor: Any, request: Request, plan: PartPlan, done: list[ArrayPart]
    ) -> None:
        """Set the executor's parameters for one part of a split array (``done``: the parts
        submitted so far)."""
        raise HpcdlError(f"the {self.name} back end cannot split arrays")

    def _abort(self, job_ids: list[str]) -> None:
        """Cancel parts already queued when a later part's submission fails."""

    def _preflight(self, request: Request, test_only: bool) -> None:
        """Checks before a folder is made (the Slurm back end asks ``sbatch --test-only``)."""
        if test_only:
            raise HpcdlError("--test-only needs a Slurm site")

    @abstractmethod
    def _executor(self, request: Request, folder: Path) -> Any:
        """A configured submitit executor writing into ``folder``."""

    @abstractmethod
    def _job_id(self, jobs: list[Any]) -> str:
        """The id the handle records for these submitit jobs."""

    def _local_ids(self, jobs: list[Any]) -> list[str]:
        return []


def setup_lines(request: Request, site: SiteProfile) -> list[str]:
    """Shell lines run before the tasks start, in both back ends: the site's modules, setup and
    environment presets, the container runtime's, submitit's preemption signal, then the job's."""
    lines = site.module_lines() + list(site.setup) + site.env_lines()
    lines += containers.setup_lines(site.container)
    if site.preemption.signal != "USR2":
        lines.append(f"export SUBMITIT_PREEMPT_SIGNAL={site.preemption.signal}")
    return lines + list(request.setup)


def new_job_folder(site: SiteProfile, name: str) -> Path:
    """A fresh, private (0700) folder under the site's job root."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "job"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = site.job_root_path
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder = root / f"{stamp}-{slug}-{secrets.token_hex(3)}"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def task_log_paths(folder: str | Path, job_id: str, task: int) -> tuple[Path, Path]:
    """submitit's (stdout, stderr) file names for one task of job ``job_id``."""
    folder = Path(folder)
    return folder / f"{job_id}_{task}_log.out", folder / f"{job_id}_{task}_log.err"


def folder_state(folder: str | Path, job_id: str) -> str:
    """A finished job's outcome from submitit's result pickle (``COMPLETED``/``FAILED``), for
    when the scheduler forgot the job; ``UNKNOWN`` without a readable result."""
    result = Path(folder) / f"{job_id}_0_result.pkl"
    if not result.is_file():
        return "UNKNOWN"
    try:
        with open(result, "rb") as f:
            outcome = pickle.load(f)[0]  # submitit writes ("success" | "error", value)
    except Exception:
        return "UNKNOWN"
    return "COMPLETED" if outcome == "success" else "FAILED"


def submitit_command(python: str, folder: Path) -> str:
    """The line in the batch script that unpickles and runs the task (submitit's runner)."""
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def first_error_line(exc: object) -> str:
    """The most telling line of a command's error output (the first mentioning an error)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return (errs or lines or ["unknown error"])[0]
