"""The on-disk record of submissions: one ``registry.jsonl`` per job root, appended under a lock."""

from __future__ import annotations

import fcntl
import grp
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.scheduler.arrays import global_index
from hpcdl.scheduler.interface import JobHandle, job_states
from hpcdl.scheduler.states import FINISHED, summarize
from hpcdl.site import SiteProfile, available_sites, load_site
from hpcdl.util import (
    append_jsonl,
    atomic_write_text,
    get_logger,
    read_jsonl,
    read_jsonl_tail,
    share_umask,
)

REGISTRY_FILE = "registry.jsonl"
# The names new_job_folder gives: STAMP-SLUG-HEX. clean deletes nothing else.
JOB_FOLDER_NAME = re.compile(r"\d{8}-\d{6}-[A-Za-z0-9_.-]*-?[0-9a-f]{6}")
log = get_logger(__name__)


def ensure_job_root(site: SiteProfile) -> Path:
    """The site's job root, created private (0700; 0750 with ``share: group``, given the
    profile's ``share_group`` and set-group-ID so what is made below inherits the group).
    An existing root is left as it is: its owner or the admins chose its mode."""
    root = site.job_root_path
    if root.is_dir():
        return root
    with share_umask(site.share):
        root.mkdir(parents=True, exist_ok=True)
    if site.share_group is not None:
        try:
            gid = grp.getgrnam(site.share_group).gr_gid
        except KeyError:
            raise ConfigError(
                site.name, "share_group", f"no group {site.share_group!r} on this machine"
            ) from None
        os.chown(root, -1, gid)
        os.chmod(root, 0o2750)
    return root


def _open_private(path: Path, flags: int) -> int:
    """Open (creating 0600) a file of the registry without following a symlink at its name;
    one an older hpcdl left readable by others is made private."""
    fd = os.open(path, flags | os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, 0o600)
    return fd


@contextmanager
def _locked(root: Path) -> Iterator[Path]:
    with share_umask():
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(_open_private(root / ".registry.lock", os.O_APPEND), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root / REGISTRY_FILE


def record(site: SiteProfile, handle: JobHandle) -> None:
    """Append one submission to the site's registry (a private file: 0600)."""
    ensure_job_root(site)
    with _locked(site.job_root_path) as path:
        os.close(_open_private(path, os.O_APPEND))  # created 0600, made so if an old one was not
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


def recent_handles(n: int, roots: Iterable[Path] | None = None) -> list[JobHandle]:
    """The ``n`` newest submissions, oldest first, as ``load_handles()[-n:]`` but reading only
    the end of each registry: lines are appended as jobs are submitted, so a root's newest are
    its last lines. At 100,000 entries parsing every line was 1.3 s of ``hpcdl status``."""
    handles: list[JobHandle] = []
    for root in roots if roots is not None else registry_roots():
        handles += read_jsonl_tail(root / REGISTRY_FILE, n, JobHandle.model_validate_json)
    handles.sort(key=lambda h: h.submitted_at)
    return handles[-n:] if n > 0 else []


def _parse(path: Path, lines: list[bytes]) -> list[JobHandle]:
    """The lines' submissions; a line that is not one (torn by a crash) is skipped and said,
    as :func:`read_jsonl` does for the whole file."""
    out, bad = [], 0
    for line in lines:
        if line.strip():
            try:
                out.append(JobHandle.model_validate_json(line))
            except ValueError:
                bad += 1
    if bad:
        log.warning("%s: skipped %d unreadable line(s) (cut short by a crash?)", path, bad)
    return out


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
    for handle in reversed(_mentioning(base)):
        if handle.job_id == base or base in handle.local_ids:
            return handle, local
        if any(p.job_id == base for p in handle.parts):
            return handle, global_index(handle.parts, base, local)
    raise HpcdlError(f"no job {job_id!r} in the registry (see 'hpcdl status')")


def _mentioning(text: str) -> list[JobHandle]:
    """Every submission whose registry line holds ``"text"`` (quoted, as ids are written),
    oldest first: a byte search over the file, and only those lines parsed."""
    needle = json.dumps(text).encode()
    handles: list[JobHandle] = []
    for root in registry_roots():
        path = root / REGISTRY_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        lines = [line for line in data.split(b"\n") if needle in line]
        handles += _parse(path, lines)
    handles.sort(key=lambda h: h.submitted_at)
    return handles


def clean(older_than_days: float, dry_run: bool = False) -> list[JobHandle]:
    """Remove folders and registry entries of finished jobs older than the given age. A line
    whose folder is not one :func:`deletable_folder` accepts is kept and named in a warning:
    nothing is deleted for it."""
    cutoff = time.time() - older_than_days * 86400
    removed: list[JobHandle] = []
    for root in registry_roots():
        handles = load_handles([root])
        old = [h for h in handles if h.submitted_at < cutoff]
        states = job_states(old) if old else {}
        folders: dict[str, Path | None] = {}  # None: the folder is gone, only the line goes
        for h in old:
            if summarize(states[h.job_id]) not in FINISHED:
                continue
            folder = deletable_folder(root, h.folder)
            if folder is None and not os.path.lexists(h.folder):
                folders[h.job_id] = None
            elif folder is None:
                log.warning(
                    "clean: not deleting job %s: its folder %r is not one of hpcdl's job folders "
                    "directly in the job root %s (outside it, a symlink, or not this user's); "
                    "registry line: %s",
                    h.job_id, h.folder, root, h.model_dump_json(),
                )  # fmt: skip
                continue
            folders[h.job_id] = folder
        if not folders:
            continue
        gone = [h for h in handles if h.job_id in folders]
        removed += gone
        if dry_run:
            continue
        with _locked(root) as path, share_umask():
            keep = [h for h in load_handles([root]) if h.job_id not in folders]
            atomic_write_text(path, "".join(h.model_dump_json() + "\n" for h in keep))
        for folder in folders.values():
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    return removed


def deletable_folder(root: Path, folder: str) -> Path | None:
    """The job folder a registry line names, resolved, if ``clean`` may delete it: a real
    folder (no symlink at its name), owned by this user, named as :data:`JOB_FOLDER_NAME`,
    directly in the resolved job root; ``None`` for anything else (``ROOT/..``, a path outside,
    a symlink to anywhere, the sweeps folder). The registry is text anyone with write access
    to it can shape: its paths decide nothing on their own."""
    path = Path(folder)
    if not path.is_absolute():
        return None
    try:
        st = os.lstat(path)
        real_root = root.resolve(strict=True)
    except OSError:
        return None
    real = path.resolve()
    if (
        not stat.S_ISDIR(st.st_mode)  # a symlink's lstat is a link, never a folder
        or st.st_uid != os.geteuid()
        or real.parent != real_root
        or not JOB_FOLDER_NAME.fullmatch(real.name)
    ):
        return None
    return real
