"""The on-disk record of submissions, and job states from one batched scheduler query."""

from __future__ import annotations

import fcntl
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from hpcdl.errors import HpcdlError
from hpcdl.job import JobHandle
from hpcdl.site import SiteProfile, available_sites, load_site

STATES = (
    "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
    "PREEMPTED", "OUT_OF_MEMORY", "NODE_FAIL", "REQUEUED", "SUSPENDED", "UNKNOWN",
)  # fmt: skip
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
_ALIASES = {
    "CONFIGURING": "PENDING", "REQUEUE_HOLD": "PENDING", "REQUEUE_FED": "PENDING",
    "RESV_DEL_HOLD": "PENDING", "COMPLETING": "RUNNING", "STAGE_OUT": "RUNNING",
    "SIGNALING": "RUNNING", "RESIZING": "RUNNING", "BOOT_FAIL": "NODE_FAIL",
    "DEADLINE": "TIMEOUT", "REVOKED": "CANCELLED", "SPECIAL_EXIT": "FAILED", "STOPPED": "SUSPENDED",
}  # fmt: skip
REGISTRY_FILE = "registry.jsonl"
_warned_squeue = False


def normalize_state(raw: str) -> str:
    """sacct/squeue state (``CANCELLED by 0``, ``OUT_OF_ME+``) → one of :data:`STATES`."""
    word = raw.strip().split(" ")[0].rstrip("+").upper()
    if word.startswith("OUT_OF_ME"):
        return "OUT_OF_MEMORY"
    word = _ALIASES.get(word, word)
    return word if word in STATES else "UNKNOWN"


# -- the registry ----------------------------------------------------------------------------
@contextmanager
def _locked(root: Path) -> Iterator[Path]:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(root / ".registry.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root / REGISTRY_FILE


def record(site: SiteProfile, handle: JobHandle) -> None:
    """Append one submission to the site's registry."""
    with _locked(site.job_root_path) as path, open(path, "a") as f:
        f.write(handle.model_dump_json() + "\n")


def registry_roots() -> list[Path]:
    """Job roots of every known site profile (several profiles may share one)."""
    roots = []
    for name in available_sites():
        try:
            roots.append(load_site(name).job_root_path)
        except HpcdlError:
            continue
    return list(dict.fromkeys(roots))


def load_handles(roots: Iterable[Path] | None = None) -> list[JobHandle]:
    """Every recorded submission, oldest first."""
    handles: list[JobHandle] = []
    for root in roots if roots is not None else registry_roots():
        path = root / REGISTRY_FILE
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        handles.append(JobHandle.model_validate_json(line))
                    except ValueError:
                        continue  # a torn line from a crashed writer
    handles.sort(key=lambda h: h.submitted_at)
    return handles


def find_handle(job_id: str) -> JobHandle:
    """The recorded submission for ``job_id`` (``123`` or ``123_4`` for an array task)."""
    base = job_id.split("_")[0]
    for handle in reversed(load_handles()):
        if handle.job_id == base or base in handle.local_ids:
            return handle
    raise HpcdlError(f"no job {job_id!r} in the registry (see 'hpcdl status')")


# -- states ----------------------------------------------------------------------------------
def job_states(handles: list[JobHandle]) -> dict[str, dict[str, str]]:
    """``{job_id: {task id: state}}`` with one sacct call for all Slurm jobs (squeue fallback)."""
    out: dict[str, dict[str, str]] = {}
    slurm = [h for h in handles if h.scheduler == "slurm"]
    if slurm:
        live = _slurm_states([h.job_id for h in slurm])
        for h in slurm:
            out[h.job_id] = _expand(h, live)
    for h in handles:
        if h.scheduler == "local":
            out[h.job_id] = {
                (lid if h.array is None else f"{h.job_id}_{i}"): _local_state(h, lid)
                for i, lid in enumerate(h.local_ids)
            }
    return out


def _expand(h: JobHandle, live: dict[str, str]) -> dict[str, str]:
    ids = [h.job_id] if h.array is None else [f"{h.job_id}_{i}" for i in range(h.array)]
    states = {}
    for tid in ids:
        state = live.get(tid) or (live.get(h.job_id) if h.array is not None else None)
        states[tid] = state or _folder_state(Path(h.folder), tid)
    return states


def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Batched sacct; ids missing there (accounting off or lagging) come from one squeue call."""
    states: dict[str, str] = {}
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)]
    proc = _run(cmd)
    if proc is not None and proc.returncode == 0:
        for line in proc.stdout.splitlines():
            jid, _, state = line.partition("|")
            for tid in _expand_array_id(jid):
                states[tid] = normalize_state(state)
    else:
        _warn_squeue(proc)
    missing = [j for j in job_ids if not any(k.split("_")[0] == j for k in states)]
    pending_arrays = [k for k in states if k.endswith("_*")]
    if missing or pending_arrays:
        proc = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(missing or job_ids)])
        if proc is not None and proc.returncode == 0:
            for line in proc.stdout.splitlines():
                jid, _, state = line.partition("|")
                for tid in _expand_array_id(jid):
                    states.setdefault(tid, normalize_state(state))
    return states


def _warn_squeue(proc: subprocess.CompletedProcess[str] | None) -> None:
    global _warned_squeue
    if not _warned_squeue:
        why = "sacct not found" if proc is None else (proc.stderr.strip().splitlines() or ["?"])[0]
        print(f"note: accounting unavailable ({why}); using squeue and job folders")
        _warned_squeue = True


def _expand_array_id(jid: str) -> list[str]:
    """``123_[1-3,7%2]`` → ``123_1 123_2 123_3 123_7``; plain ids unchanged."""
    m = re.match(r"^(\d+)_\[([^\]]+)\]$", jid)
    if not m:
        return [jid]
    base, spec = m[1], m[2].split("%")[0]
    ids = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        ids += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return ids


def _folder_state(folder: Path, tid: str) -> str:
    """A finished job's outcome from submitit's result pickle when the scheduler forgot it."""
    result = folder / f"{tid}_0_result.pkl"
    if result.is_file():
        try:
            with open(result, "rb") as f:
                outcome = pickle.load(f)[0]
        except Exception:
            return "UNKNOWN"
        return "COMPLETED" if outcome == "success" else "FAILED"
    return "UNKNOWN"


def _local_state(h: JobHandle, pid: str) -> str:
    folder = Path(h.folder)
    if (folder / f"{pid}.cancelled").exists():
        return "CANCELLED"
    if _pid_alive(int(pid), h.submitted_at):
        return "RUNNING"
    state = _folder_state(folder, pid)
    return "FAILED" if state == "UNKNOWN" else state


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (the local controller runs under a shell)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _pid_alive(pid: int, started_near: float | None = None) -> bool:
    """Is ``pid`` running (not a zombie) and, if given, started within 2 min of ``started_near``
    (so a recycled pid is not mistaken for the job)?"""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if fields[0] == "Z":
        return False
    if started_near is None:
        return True
    boot = next(
        float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime")
    )  # fmt: skip
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return abs(started - started_near) < 120


def summarize(states: dict[str, str]) -> str:
    """One state for a job: any unfinished task wins, then the worst outcome."""
    values = set(states.values())
    for state in ("RUNNING", "PENDING", "REQUEUED", "SUSPENDED", "PREEMPTED", "UNKNOWN"):
        if state in values:
            return state
    for state in ("NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "FAILED", "CANCELLED"):
        if state in values:
            return state
    return "COMPLETED" if values else "UNKNOWN"


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired as exc:
        raise HpcdlError(f"'{cmd[0]}' did not answer within {timeout:.0f}s") from exc


# -- actions -----------------------------------------------------------------------------------
def cancel(handle: JobHandle, array_task: int | None = None) -> None:
    """Cancel a job (or one array task)."""
    if handle.scheduler == "local":
        ids = handle.local_ids if array_task is None else [handle.local_ids[array_task]]
        for pid in ids:
            (Path(handle.folder) / f"{pid}.cancelled").touch()
            if _pid_alive(int(pid), handle.submitted_at):
                for proc_id in _descendants(int(pid)):
                    with suppress(ProcessLookupError):
                        os.kill(proc_id, signal.SIGINT)
        return
    target = handle.job_id if array_task is None else f"{handle.job_id}_{array_task}"
    proc = _run(["scancel", target])
    if proc is None or proc.returncode != 0:
        why = "scancel not found" if proc is None else proc.stderr.strip()
        raise HpcdlError(f"could not cancel {target}: {why}")


def log_tail(handle: JobHandle, lines: int = 30) -> str:
    """The last lines of task 0's stdout and stderr, for error messages."""
    parts = []
    for path in handle.log_paths():
        if path.is_file():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path}\n" + "\n".join(text))
        else:
            parts.append(f"--- {path} (not written)")
    return "\n".join(parts)


def clean(older_than_days: float, dry_run: bool = False) -> list[JobHandle]:
    """Remove folders and registry entries of finished jobs older than the given age."""
    cutoff = time.time() - older_than_days * 86400
    removed: list[JobHandle] = []
    for root in registry_roots():
        handles = load_handles([root])
        old = [h for h in handles if h.submitted_at < cutoff]
        states = job_states(old) if old else {}
        doomed = {h.job_id for h in old if summarize(states[h.job_id]) in FINISHED}
        if not doomed:
            continue
        gone = [h for h in handles if h.job_id in doomed]
        removed += gone
        if dry_run:
            continue
        with _locked(root) as path:
            keep = [h for h in load_handles([root]) if h.job_id not in doomed]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(h.model_dump_json() + "\n" for h in keep))
            os.replace(tmp, path)
        for h in gone:
            if Path(h.folder).parent == root:
                shutil.rmtree(h.folder, ignore_errors=True)
    return removed
