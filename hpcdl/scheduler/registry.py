"""The on-disk record of submissions: one ``registry.jsonl`` per job root, appended under a lock."""

from __future__ import annotations

import fcntl
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcdl.errors import HpcdlError
from hpcdl.scheduler.arrays import global_index
from hpcdl.scheduler.base import JobHandle, job_states
from hpcdl.scheduler.states import FINISHED, summarize
from hpcdl.site import SiteProfile, available_sites, load_site
from hpcdl.util import append_jsonl, atomic_write_text, read_jsonl

REGISTRY_FILE = "registry.jsonl"


@contextmanager
def _locked(root: Path) -> Iterator[Path]:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(root / ".registry.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root / REGISTRY_FILE


def record(site: SiteProfile, handle: JobHandle) -> None:
    """Append one submission to the site's registry."""
    with _locked(site.job_root_path) as path:
        append_jsonl(path, handle.model_dump(mode="json"))  # whole line, even after a torn one


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
        # a torn line from a crashed writer is skipped, and said once
        handles += read_jsonl(root / REGISTRY_FILE, JobHandle.model_validate_json)
    handles.sort(key=lambda h: h.submitted_at)
    return handles


def find_handle(job_id: str) -> JobHandle:
    """The recorded submission for ``job_id`` (``123`` or ``123_4`` for an array task; any
    part's id of a split array finds the whole job)."""
    return find_task(job_id)[0]


def find_task(job_id: str) -> tuple[JobHandle, int | None]:
    """The submission for ``ID`` or ``ID_TASK`` and the global array index it names (None for a
    whole job): ``FIRST_1500`` is task 1500, a later part's ``PART_3`` is that part's offset + 3."""
    base, _, task = job_id.partition("_")
    if task and not task.isdigit():
        raise HpcdlError(f"{job_id!r} is not a job id (ID or ARRAYID_TASK)")
    local = int(task) if task else None
    for handle in reversed(load_handles()):
        if handle.job_id == base or base in handle.local_ids:
            return handle, local
        if any(p.job_id == base for p in handle.parts):
            return handle, global_index(handle.parts, base, local)
    raise HpcdlError(f"no job {job_id!r} in the registry (see 'hpcdl status')")


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
            atomic_write_text(path, "".join(h.model_dump_json() + "\n" for h in keep))
        for h in gone:
            if Path(h.folder).parent == root:
                shutil.rmtree(h.folder, ignore_errors=True)
    return removed
