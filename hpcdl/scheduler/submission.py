"""What both back ends share: submission through submitit, and the only code that knows
submitit's internals (its job folder layout: log and result-pickle file names, the submission
script). submitit is pinned in pyproject.toml because this layout is not public API."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import secrets
import shlex
import shutil
import stat
import sys
import time
from abc import abstractmethod
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from hpcdl import containers
from hpcdl.errors import HpcdlError
from hpcdl.scheduler.arrays import ArrayPart, PartPlan, plan_parts
from hpcdl.scheduler.interface import JobHandle, Request, Scheduler
from hpcdl.scheduler.registry import ensure_job_root, record, registry_roots
from hpcdl.site import SiteProfile
from hpcdl.task_runner import Task
from hpcdl.util import atomic_write_json, get_logger, share_umask

log = get_logger(__name__)


class SubmititScheduler(Scheduler):
    """A back end whose jobs are submitit executors' jobs in a private job folder."""

    def submit(self, request: Request, test_only: bool = False) -> JobHandle:
        # Under the site's umask (077 unless share: group): the job folder, submitit's pickles
        # and script, and the job itself (a local job inherits it, sbatch passes it on as
        # SLURM_UMASK), so logs, checkpoints and W&B runs are private whatever the caller's.
        with share_umask(self.site.share):
            return self._submit(request, test_only)

    def _submit(self, request: Request, test_only: bool) -> JobHandle:
        site = self.site
        self._preflight(request, test_only)
        folder = new_job_folder(site, request.name)
        try:  # the code snapshot (if any) goes into the folder before anything is rendered
            request = request.staged(site, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        direct = self.direct(request)  # a command run straight from its script (Slurm)
        executor: Any = None if direct else self._executor(request, folder)
        plans = self.plan(request)
        parts: list[ArrayPart] = []
        first: list[Any] = []  # the first part's submitit jobs (the handle's id)
        job_id = ""
        # submitit prints sbatch's error to stderr before it raises it: the error below says it
        # once; anything printed by a submission that succeeded is passed on after it
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):
                if direct:
                    job_id = self._submit_direct(request, folder, plans, parts)
                elif not plans:
                    first = [executor.submit(_recorded(request.task(site)))]
                # one batch (one Slurm array) per part; tasks keep global indices
                for plan in [] if direct else plans:
                    if len(plans) > 1:
                        self._configure_part(executor, request, plan, parts)
                    with executor.batch():
                        jobs = [executor.submit(_recorded(request.task(site, plan.offset + j))) for j in range(plan.count)]  # fmt: skip
                    first = first or jobs
                    part = ArrayPart(job_id=self._job_id(jobs), offset=plan.offset, count=plan.count,
                                     lane=plan.lane, throttle=plan.throttle)  # fmt: skip
                    parts.append(part)
        except Exception as exc:  # submitit raises bare exceptions carrying sbatch's message
            self._abort([p.job_id for p in parts])  # no half-submitted job stays queued
            shutil.rmtree(folder, ignore_errors=True)
            raise HpcdlError(f"submission failed: {first_error_line(exc)}") from None
        sys.stderr.write(printed.getvalue())
        job_id = job_id or self._job_id(first)
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
            tasks_per_node=(
                request.launched_tasks_per_node if request.min_nodes is not None else None
            ),
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

    def direct(self, request: Request) -> bool:
        """Whether the request's tasks run straight from the batch script, without a Python
        runner (the Slurm back end: ``hpcdl.scheduler.direct``)."""
        return False

    def _submit_direct(
        self, request: Request, folder: Path, plans: list[PartPlan], parts: list[ArrayPart]
    ) -> str:
        """Queue a :meth:`direct` request (each part appended to ``parts`` once queued); the id
        of its first Slurm job."""
        raise HpcdlError(f"the {self.name} back end runs every task through submitit")

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


def _recorded(task: Any) -> Any:
    """The task, made to write its outcome record (:func:`record_outcome`) when it ends."""
    return replace(task, outcome=record_outcome) if isinstance(task, Task) else task


def outcome_name(job_id: str, task: int) -> str:
    """A task's outcome record beside submitit's result pickle (same job id and task)."""
    return f"{job_id}_{task}_outcome.json"


def record_outcome(outcome: str) -> None:
    """In a submitit task: write its outcome (``success``/``error``, what submitit's result
    pickle says) as JSON, which :func:`folder_state` reads without running anything."""
    try:
        from submitit import JobEnvironment

        paths = JobEnvironment().paths
        job_id = str(paths.job_id)  # submitit types it optional; inside a task it is set
        record = {"outcome": outcome, "job_id": job_id, "task": paths.task_id}
        atomic_write_json(paths.folder / outcome_name(job_id, paths.task_id), record)
    except Exception as exc:  # not under submitit, or the folder is gone: status says UNKNOWN
        log.warning("outcome not recorded: %s", exc)


def new_job_folder(site: SiteProfile, name: str) -> Path:
    """A fresh, private folder under the site's job root: 0700 (0750 with ``share: group``)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "job"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = ensure_job_root(site)
    folder = root / f"{stamp}-{slug}-{secrets.token_hex(3)}"
    mode = 0o750 if site.share == "group" else 0o700
    folder.mkdir(mode=mode)
    os.chmod(folder, mode)  # mkdir's mode passes through the umask
    return folder


def task_log_paths(folder: str | Path, job_id: str, task: int) -> tuple[Path, Path]:
    """submitit's (stdout, stderr) file names for one task of job ``job_id``."""
    folder = Path(folder)
    return folder / f"{job_id}_{task}_log.out", folder / f"{job_id}_{task}_log.err"


def folder_state(folder: str | Path, job_id: str) -> str:
    """A finished job's outcome (``COMPLETED``/``FAILED``), for when the scheduler forgot the
    job; ``UNKNOWN`` without a readable one.

    From the JSON record each task writes beside submitit's result (:func:`record_outcome`):
    reading it runs no code, whoever wrote the folder a registry or sweep record names. Only
    folders of an older hpcdl lack it; their result pickle is loaded only when
    :func:`_trusted_result` vouches for it (unpickling runs whatever the pickle says)."""
    folder = Path(folder)
    outcome = _read_outcome(folder / outcome_name(job_id, 0))
    if outcome is None:
        data = _trusted_result(folder, f"{job_id}_0_result.pkl")
        if data is None:
            return "UNKNOWN"
        try:
            outcome = pickle.loads(data)[0]  # submitit writes ("success" | "error", value)
        except Exception:
            return "UNKNOWN"
    return "COMPLETED" if outcome == "success" else "FAILED"


def _read_outcome(path: Path) -> str | None:
    """``success``/``error`` from an outcome record; None if missing or unreadable."""
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read(65536))
    except (OSError, ValueError):
        return None
    outcome = record.get("outcome") if isinstance(record, dict) else None
    return outcome if outcome in ("success", "error") else None


def _trusted_result(folder: Path, name: str) -> bytes | None:
    """The bytes of submitit's result pickle ``name``, or None unless both the folder and the
    file are this user's and writable by nobody else (checked on the opened descriptors, no
    symlink followed at either name) and the folder sits directly in a known job root: a
    pickle anyone else could have written or swapped is never loaded."""
    try:
        real = folder.resolve(strict=True)
    except OSError:
        return None
    if not os.path.lexists(real / name):  # before loading every profile for its job root
        return None
    if real.parent not in {r.resolve() for r in registry_roots()}:
        return None
    try:
        dfd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _owned_private(os.fstat(dfd)):
            return None
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            return f.read() if stat.S_ISREG(st.st_mode) and _owned_private(st) else None
    except OSError:
        return None
    finally:
        os.close(dfd)


def _owned_private(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def submitit_command(python: str, folder: Path) -> str:
    """The line in the batch script that unpickles and runs the task (submitit's runner)."""
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def first_error_line(exc: object) -> str:
    """The most telling line of a command's error output (the first mentioning an error)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return (errs or lines or ["unknown error"])[0]
