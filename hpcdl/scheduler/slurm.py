"""The Slurm back end. :func:`run_command` is the only place hpcdl runs a Slurm command (sbatch,
sacct, squeue, scancel, scontrol, sinfo); submitit itself runs sbatch for submissions."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.scheduler._sbatch import check_partition, sbatch_quoting, slurm_parameters
from hpcdl.scheduler.arrays import (
    ArrayPart,
    PartPlan,
    describe,
    expand_dependency,
    lane_shares,
    lanes_of,
    locate,
    slurm_task_id,
)
from hpcdl.scheduler.checkpointable import TIMEOUT_REQUEUES
from hpcdl.scheduler.direct import direct_script, why_not_direct, write_command_file
from hpcdl.scheduler.holds import failed_launches
from hpcdl.scheduler.interface import JobHandle, Request, TaskStatus
from hpcdl.scheduler.live import SINFO_FORMAT, LivePartition, parse_config, parse_partitions
from hpcdl.scheduler.live import check_site as compare_with_live
from hpcdl.scheduler.registry import load_handles
from hpcdl.scheduler.state_rows import ASK_SQUEUE, parse_state_rows, settle_requeued
from hpcdl.scheduler.states import FINISHED
from hpcdl.scheduler.submission import (
    SubmititScheduler,
    first_error_line,
    folder_state,
    submitit_command,
    task_log_paths,
)
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
        self.site.check_array(request.array, where)  # before a plan of many sbatch calls
        check_partition(request, self.site, where)

    def render(self, request: Request, folder: Path | None = None) -> str:
        from submitit.slurm.slurm import _make_sbatch_string

        site = self.site
        params = self._parameters(request)
        plans = self.plan(request)
        folder = folder or site.job_root_path / "<job-folder>"
        if self.direct(request):  # a split array's script is its first part's
            script = direct_script(request, self.site, folder, params, plans[0] if plans else None)
        else:
            if plans:
                params["map_count"] = plans[0].count
                if plans[0].throttle:
                    params["array_parallelism"] = plans[0].throttle
            command = submitit_command(request.interpreter(site), folder)
            script = sbatch_quoting(_make_sbatch_string(command=command, folder=folder, **params))
        head, _, rest = script.partition("\n")
        notes = describe(plans, request.array or 0, site.max_array_size)
        return "\n".join([head, *notes, rest]) if notes else script

    def sbatch_parameters(self, request: Request) -> dict[str, Any]:
        """The submitit SlurmExecutor parameters ``request`` becomes on this site."""
        return self._parameters(request)

    def _parameters(self, request: Request) -> dict[str, Any]:
        """The request's sbatch parameters, its dependencies on split arrays expanded to every
        part (from the registry: ``afterany:FIRST`` waits for all of them)."""
        params = slurm_parameters(request, self.site)
        if params.get("dependency"):
            split = {h.job_id: h.parts for h in load_handles() if h.parts}
            params["dependency"] = expand_dependency(params["dependency"], split)
        return params

    # -- command jobs run straight from their script (hpcdl.scheduler.direct) ---------------------
    def direct(self, request: Request) -> bool:
        return why_not_direct(request, self.site) is None

    def _submit_direct(
        self, request: Request, folder: Path, plans: list[PartPlan], parts: list[ArrayPart]
    ) -> str:
        params = self._parameters(request)
        write_command_file(request.task(self.site), folder)  # its values: the script has none
        if not plans:
            return _sbatch_file(direct_script(request, self.site, folder, params, None), folder)
        for plan in plans:  # as _configure_part: each part after its lane's previous one
            deps = [params["dependency"]] if params.get("dependency") else []
            if plan.after is not None:
                deps.append(f"afterany:{parts[plan.after].job_id}")
            script = direct_script(request, self.site, folder, params, plan, ",".join(deps) or None)
            parts.append(ArrayPart(job_id=_sbatch_file(script, folder), offset=plan.offset,
                                   count=plan.count, lane=plan.lane, throttle=plan.throttle))  # fmt: skip
        return parts[0].job_id

    def _preflight(self, request: Request, test_only: bool) -> None:
        if shutil.which("sbatch") is None:
            raise HpcdlError(f"site {self.site.name!r} uses Slurm but 'sbatch' is not on PATH")
        if test_only:
            self.test_only(request)

    def test_only(self, request: Request) -> str:
        return sbatch_test_only(self.render(request))

    def _executor(self, request: Request, folder: Path) -> Any:
        ex = _executor_class()(  # time-limit requeues: Checkpointable callables only
            folder=folder, python=request.interpreter(self.site), max_num_timeout=TIMEOUT_REQUEUES
        )
        params = self._parameters(request)
        self._dependency: str | None = params.get("dependency")  # each part adds its own
        ex.update_parameters(**params)
        return ex

    def _configure_part(
        self, executor: Any, request: Request, plan: PartPlan, done: list[ArrayPart]
    ) -> None:
        deps = [self._dependency] if self._dependency else []
        if plan.after is not None:  # the previous part of its lane (see hpcdl.scheduler.arrays)
            deps.append(f"afterany:{done[plan.after].job_id}")
        update: dict[str, Any] = {"dependency": ",".join(deps) or None}
        if plan.throttle:
            update["array_parallelism"] = plan.throttle
        executor.update_parameters(**update)

    def _abort(self, job_ids: list[str]) -> None:
        if job_ids:
            run_command(["scancel", *job_ids])

    def _job_id(self, jobs: list[Any]) -> str:
        return str(jobs[0].job_id).split("_")[0]  # an array's id without the task

    # -- existing jobs ---------------------------------------------------------------------------
    def statuses(self, handles: list[JobHandle]) -> dict[str, dict[str, TaskStatus]]:
        live = query([j for h in handles for j in _part_ids(h)]) if handles else {}
        return {h.job_id: _expand(h, live) for h in handles}

    def cancel(self, handles: list[JobHandle], array_task: int | None = None) -> None:
        targets = []
        for h in handles:  # every part of a split array, or the part holding the task
            if array_task is None:
                targets += _part_ids(h)
            elif h.array is None:
                targets.append(f"{h.job_id}_{array_task}")
            else:
                targets.append(slurm_task_id(*locate(_parts(h), array_task)))
        if not targets:
            return
        proc = run_command(["scancel", *targets])  # one call for every job
        if proc is None or proc.returncode != 0:
            raise HpcdlError(f"could not cancel {', '.join(targets)}: {_why(proc, 'scancel')}")

    def log_paths(
        self, handle: JobHandle, task: int = 0, array_task: int | None = None
    ) -> tuple[Path, Path]:
        if handle.array is None:
            return task_log_paths(handle.folder, handle.job_id, task)
        jid = slurm_task_id(*locate(_parts(handle), array_task or 0))
        return task_log_paths(handle.folder, jid, task)

    def requeue(self, target: str) -> None:
        proc = run_command(["scontrol", "requeue", target], timeout=60)
        if proc is None or proc.returncode != 0:
            raise HpcdlError(f"scontrol requeue {target} failed: {_why(proc, 'scontrol')}")

    def cancel_pending(self, job_id: str) -> None:
        proc = run_command(["scancel", "--state=PENDING", job_id])
        if proc is None or proc.returncode != 0:
            raise HpcdlError(
                f"could not cancel the pending tasks of {job_id}: {_why(proc, 'scancel')}"
            )

    def release_failed_launches(self, job_ids: list[str]) -> list[str]:
        proc = run_command(
            ["squeue", "-h", "-r", "-t", "PD", "-o", "%i|%r", "-j", ",".join(job_ids)]
        )
        held = failed_launches(proc.stdout) if proc is not None and proc.returncode == 0 else []
        if held and ((p := run_command(["scontrol", "release", *held])) is None or p.returncode):
            raise HpcdlError(f"scontrol release {' '.join(held)} failed: {_why(p, 'scontrol')}")
        return held

    def throttle(self, handle: JobHandle, parallelism: int) -> None:
        """A split array's lanes share the new throttle as at submission (hpcdl.scheduler.arrays);
        parts that already finished are left alone (scontrol refuses them)."""
        groups: dict[int, list[str]] = {parallelism: [handle.job_id]}
        if handle.parts:
            lanes = lanes_of(handle.parts)
            if parallelism < lanes:
                raise HpcdlError(
                    f"job {handle.job_id} runs {lanes} Slurm arrays side by side: "
                    f"its throttle must be at least {lanes}"
                )
            shares, live = lane_shares(parallelism, lanes), query(_part_ids(handle))
            groups = {}
            for p in handle.parts:
                states = [s.state for k, s in live.items() if k.split("_")[0] == p.job_id]
                if p.count > 1 and not all(s in FINISHED for s in states):
                    groups.setdefault(shares[p.lane], []).append(p.job_id)
        for share, ids in groups.items():
            cmd = ["scontrol", "update", f"JobId={','.join(ids)}", f"ArrayTaskThrottle={share}"]
            proc = run_command(cmd)
            if proc is None or proc.returncode != 0:
                raise HpcdlError(f"scontrol refused the new throttle: {_why(proc, 'scontrol')}")

    # -- the live cluster ------------------------------------------------------------------------
    def live_partitions(self) -> dict[str, LivePartition]:
        """Partitions from ``scontrol show partition`` and per-node resources from one ``sinfo``."""
        nodes = _output(["sinfo", "-h", "-N", "-o", SINFO_FORMAT])
        return parse_partitions(nodes, _output(["scontrol", "show", "partition", "-o"]))

    def live_config(self) -> dict[str, str]:
        """``scontrol show config``: the cluster's limits (MaxArraySize, ...)."""
        return parse_config(_output(["scontrol", "show", "config"]))

    def check_site(self) -> list[str]:
        return compare_with_live(self.site, self.live_partitions(), self.live_config())


def _executor_class() -> type:
    """submitit's SlurmExecutor writing its batch scripts through :func:`sbatch_quoting`
    (made on first use: submitit is imported only when a job is submitted)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        import submitit
        import submitit.slurm.slurm as submitit_slurm

        class _Executor(submitit.SlurmExecutor):  # type: ignore[misc]
            def _make_submission_file_text(self, command: str, uid: str) -> str:
                return sbatch_quoting(super()._make_submission_file_text(command, uid))

            def _internal_process_submissions(self, delayed_submissions: list[Any]) -> Any:
                # submitit submits an array through a plain ``SlurmExecutor(folder,
                # max_num_timeout)`` it makes itself: without this, an array lost the quoting
                # above (a backslash reached Slurm as nothing) and the interpreter line (a
                # container's). Submissions run in one thread, so the swap is seen by no other.
                def same_executor(folder: Any, max_num_timeout: int) -> Any:
                    return _Executor(folder, max_num_timeout=max_num_timeout, python=self.python)

                plain = submitit_slurm.SlurmExecutor
                setattr(submitit_slurm, "SlurmExecutor", same_executor)  # noqa: B010
                try:
                    return super()._internal_process_submissions(delayed_submissions)
                finally:
                    setattr(submitit_slurm, "SlurmExecutor", plain)  # noqa: B010

        _EXECUTOR = _Executor
    return _EXECUTOR


_EXECUTOR: type | None = None


def _sbatch_file(script: str, folder: Path) -> str:
    """Queue ``script`` as submitit does (a temporary name, then ``ID_submission.sh`` with the
    temporary name left as a link to it); the job id. sbatch's refusal is raised as its own
    message (the submission's caller turns it into one line)."""
    tmp = folder / f".submission_file_{uuid.uuid4().hex}.sh"
    tmp.write_text(script)
    proc = run_command(["sbatch", "--parsable", str(tmp)], timeout=120)
    if proc is None or proc.returncode != 0:
        raise RuntimeError(_why(proc, "sbatch") or "sbatch failed")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise RuntimeError(f"sbatch answered {proc.stdout.strip()!r}, not a job id")
    final = folder / f"{job_id}_submission.sh"
    tmp.rename(final)
    tmp.symlink_to(final)
    return job_id


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


# -- states ----------------------------------------------------------------------------------------
def _parts(h: JobHandle) -> list[ArrayPart]:
    """An array's Slurm arrays: its recorded parts, or itself as the only one."""
    return h.parts or [ArrayPart(job_id=h.job_id, offset=0, count=h.array or 1)]


def _part_ids(h: JobHandle) -> list[str]:
    return [p.job_id for p in h.parts] or [h.job_id]


def _expand(h: JobHandle, live: dict[str, TaskStatus]) -> dict[str, TaskStatus]:
    """Every task of ``h``, keyed by global index (``FIRSTID_i`` for all parts of a split
    array); tasks the scheduler forgot get their state from the job folder."""
    if h.array is None:
        return {h.job_id: live.get(h.job_id) or TaskStatus(folder_state(h.folder, h.job_id))}
    out = {}
    for part in _parts(h):
        for local in range(part.count):
            sid = slurm_task_id(part, local)
            status, whole = live.get(sid), live.get(part.job_id)  # pending arrays: one row
            if status is None and whole is not None and whole.state in FINISHED:
                # right after the tasks end, sacct may list only the array's own row (its last
                # task's state) before the other tasks': their records know better
                recorded = folder_state(h.folder, sid)
                status = TaskStatus(recorded) if recorded != "UNKNOWN" else None
            out[f"{h.job_id}_{part.offset + local}"] = status or whole or TaskStatus(folder_state(h.folder, sid))  # fmt: skip
    return out


def query(job_ids: list[str]) -> dict[str, TaskStatus]:
    """Batched sacct; ids missing there (accounting off or lagging) come from one squeue call."""
    found: dict[str, TaskStatus] = {}
    proc = run_command(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Reason", "-j", ",".join(job_ids)])  # fmt: skip
    if proc is not None and proc.returncode == 0:
        parse_state_rows(proc.stdout, found, overwrite=True)
    else:
        _warn_squeue(proc)
    missing = [j for j in job_ids if not any(k.split("_")[0] == j for k in found)]
    pending_arrays = [k for k in found if k.endswith("_*")]
    # sacct keeps the reason of its last update (``Dependency``); squeue has the live one
    # (``DependencyNeverSatisfied``, or held after a failed launch while sacct says REQUEUED).
    pending = sorted({k.split("_")[0] for k, s in found.items() if s.state in ASK_SQUEUE})
    if missing or pending_arrays or pending:
        ids = ",".join(
            dict.fromkeys([*(missing or job_ids if pending_arrays else missing), *pending])
        )
        proc = run_command(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ids])
        # squeue fails on ids of which none is queued any more: none is listed, then
        if proc is not None and (proc.returncode == 0 or "Invalid job id" in proc.stderr):
            rows = proc.stdout if proc.returncode == 0 else ""
            parse_state_rows(rows, found, overwrite=False)
            settle_requeued(found, rows)
    return found


def _warn_squeue(proc: subprocess.CompletedProcess[str] | None) -> None:
    global _warned_squeue
    if not _warned_squeue:
        why = "sacct not found" if proc is None else (proc.stderr.strip().splitlines() or ["?"])[0]
        log.warning("note: accounting unavailable (%s); using squeue and job folders", why)
        _warned_squeue = True
