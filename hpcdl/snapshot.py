"""Code snapshots: the code a job runs, copied into its job folder at submission.

Without a snapshot, tasks run in the live working tree, so editing ``train.py`` while a
1,000-task array waits changes the tasks that start later. With ``snapshot: git`` the files git
tracks in the repository holding the working directory (as they are on disk, uncommitted edits
included) are copied to ``JOB_FOLDER/code``; with ``snapshot: rsync`` the whole tree is copied
by rsync minus ``exclude``. Tasks then start in the copy, with the copy on ``PYTHONPATH`` ahead
of the original, and the job folder records the commit and the uncommitted diff
(``snapshot.json``, ``snapshot.diff``). git and rsync are not Slurm commands: this module runs
them on the submitting machine, never inside a job.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.util import get_logger

log = get_logger(__name__)

MODES = ("git", "rsync", "none")
# What a copy of a project should not carry: VCS data, environments, caches, data and outputs
# (rsync patterns: a bare name matches at any depth, a leading "/" anchors at the top).
DEFAULT_EXCLUDE = (
    ".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".ipynb_checkpoints", "node_modules", "data", "runs", "outputs", "wandb",
)  # fmt: skip
CODE_DIR = "code"  # JOB_FOLDER/code: the copy
RECORD = "snapshot.json"  # JOB_FOLDER/snapshot.json: mode, source, commit, counts
DIFF = "snapshot.diff"  # JOB_FOLDER/snapshot.diff: `git diff HEAD` at submission
LARGE_BYTES = 200 * 2**20  # a copy this big is probably carrying data: say so


class Snapshot(BaseModel):
    """``snapshot: git|rsync|none``, or ``{mode: ..., exclude: [...]}`` to change the excludes."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["git", "rsync", "none"] = "none"
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in MODES:
                raise ValueError(f"must be {', '.join(MODES[:-1])} or {MODES[-1]}")
            return {"mode": v}
        return v

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for pat in v:
            if not pat.strip() or "\n" in pat or pat.startswith(("+", "-")):
                raise ValueError(f"invalid exclude pattern {pat!r} (use a name or a /path)")
        return v


@dataclass(frozen=True)
class Source:
    """Where a snapshot copies from: the repository holding the working directory (or the
    working directory itself outside git for rsync), and the working directory inside it."""

    root: Path
    rel: PurePosixPath  # the working directory, relative to root
    git: bool  # root is a git work tree
    parent: Path | None = None  # the job folder whose copy this is (a job submitted by a job)


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise HpcdlError(f"code snapshot: {cmd[0]!r} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise HpcdlError(f"code snapshot: '{shlex.join(cmd)}' took over {timeout:.0f}s") from None


def _git(root: Path, *args: str) -> str:
    proc = _run(["git", *args], root)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no output"])[0]
        raise HpcdlError(f"code snapshot: 'git {' '.join(args)}' failed in {root}: {why}")
    return proc.stdout


def source(spec: Snapshot, workdir: Path, where: str = "job") -> Source:
    """Check that ``spec`` can snapshot ``workdir``; one-line ConfigError naming ``snapshot``."""
    workdir = workdir.resolve()
    if not workdir.is_dir():
        raise ConfigError(where, "snapshot", f"working directory {str(workdir)!r} does not exist")
    code = next((d for d in [workdir, *workdir.parents] if _is_copy(d)), None)
    if code is not None:  # submitted from a snapshotted job (a sweep's next round): the same code
        rel = PurePosixPath(workdir.relative_to(code).as_posix())
        return Source(code, rel, git=False, parent=code.parent)
    if spec.mode == "rsync" and shutil.which("rsync") is None:
        raise ConfigError(
            where, "snapshot", "rsync is not on PATH (install rsync, or use snapshot: git)"
        )
    top = None
    if shutil.which("git") is not None:
        proc = _run(["git", "rev-parse", "--show-toplevel"], workdir)
        top = Path(proc.stdout.strip()).resolve() if proc.returncode == 0 else None
    elif spec.mode == "git":
        raise ConfigError(where, "snapshot", "git is not on PATH (use snapshot: rsync)")
    if top is None and spec.mode == "git":
        raise ConfigError(
            where,
            "snapshot",
            f"git: {workdir} is not inside a git repository (use snapshot: rsync, or none)",
        )
    root = top or workdir
    return Source(root, PurePosixPath(workdir.relative_to(root).as_posix()), top is not None)


def _is_copy(path: Path) -> bool:
    return path.name == CODE_DIR and (path.parent / RECORD).is_file()


def _excluded(rel: PurePosixPath, patterns: list[str]) -> bool:
    """rsync's rule for our patterns: a name matches any path component; a pattern with a
    slash matches consecutive components (a leading slash: from the top); either way a matched
    folder takes everything under it along, and a trailing slash is ignored."""
    parts = rel.parts
    for pat in patterns:
        pat = pat.rstrip("/")
        if "/" not in pat:
            if any(fnmatch.fnmatchcase(p, pat) for p in parts):
                return True
            continue
        anchored, pat_parts = pat.startswith("/"), PurePosixPath(pat.lstrip("/")).parts
        n = len(pat_parts)
        starts = [0] if anchored else range(len(parts) - n + 1)
        for s in starts:
            window = parts[s : s + n]
            if len(window) == n and all(map(fnmatch.fnmatchcase, window, pat_parts)):
                return True
    return False


def _copy_tracked(src: Source, dest: Path, exclude: list[str]) -> None:
    out = _git(src.root, "ls-files", "-z", "--cached", "--recurse-submodules")
    for name in sorted(set(filter(None, out.split("\0")))):
        rel = PurePosixPath(name)
        path = src.root / name
        if _excluded(rel, exclude) or not (path.is_file() or path.is_symlink()):
            continue  # excluded, deleted in the working tree, or a submodule's folder
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            os.symlink(os.readlink(path), target)
        else:
            shutil.copy2(path, target)  # keeps the executable bit


def _rsync(src: Source, dest: Path, exclude: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    args = [f"--exclude={pat}" for pat in exclude]
    proc = _run(["rsync", "-a", *args, f"{src.root}/", f"{dest}/"], src.root, timeout=1800)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no output"])[0]
        raise HpcdlError(f"code snapshot: rsync failed: {why}")


def _inside(path: Path, root: Path) -> PurePosixPath | None:
    try:
        return PurePosixPath(path.resolve().relative_to(root).as_posix())
    except ValueError:
        return None


def git_state(src: Source) -> tuple[str | None, str, int]:
    """(commit or None before the first commit, ``git diff HEAD``, untracked file count)."""
    if src.parent is not None:  # a copy of a copy: what the first one recorded
        recorded = src.parent / DIFF
        commit = json.loads((src.parent / RECORD).read_text()).get("commit")
        return commit, recorded.read_text() if recorded.is_file() else "", 0
    if not src.git:
        return None, "", 0
    proc = _run(["git", "rev-parse", "--verify", "-q", "HEAD"], src.root)
    commit = proc.stdout.strip() if proc.returncode == 0 else None
    diff = _git(src.root, "diff", "--binary", "HEAD") if commit else ""
    untracked = _git(src.root, "ls-files", "-z", "--others", "--exclude-standard")
    return commit, diff, len(list(filter(None, untracked.split("\0"))))


def describe(spec: Snapshot, src: Source, folder: Path) -> str:
    """One comment line for the batch script: which code the tasks will run."""
    commit, diff, _ = git_state(src)
    at = f" at commit {commit[:12]}" if commit else (" (no commit yet)" if src.git else "")
    dirty = f" + uncommitted changes ({DIFF})" if diff else ""
    what = "tracked files" if spec.mode == "git" else "rsync copy"
    if src.parent is not None:
        what = "the copy the submitting job runs"
    return (
        f"# hpcdl code snapshot: {spec.mode} ({what}) of {src.root}{at}{dirty}, copied at "
        f"submission to {folder / CODE_DIR}; tasks run in {workdir_in(src, folder)}"
    )


def workdir_in(src: Source, folder: Path) -> Path:
    return folder / CODE_DIR / src.rel


def take(spec: Snapshot, src: Source, folder: Path) -> dict[str, Any]:
    """Copy the code into ``folder/code`` and record it; the record (``snapshot.json``)."""
    started = time.monotonic()
    dest = folder / CODE_DIR
    exclude = list(spec.exclude)
    inner = _inside(folder, src.root)  # a job root inside the project: never copy it into itself
    if inner is not None:
        exclude.append(f"/{inner.as_posix()}")
    if src.parent is not None:
        shutil.copytree(src.root, dest, symlinks=True)  # already tracked files minus excludes
    elif spec.mode == "git":
        dest.mkdir(parents=True, exist_ok=True)
        _copy_tracked(src, dest, exclude)
    else:
        _rsync(src, dest, exclude)
    commit, diff, untracked = git_state(src)
    if diff:
        (folder / DIFF).write_text(diff)
    files = [p for p in dest.rglob("*") if p.is_file() and not p.is_symlink()]
    size = sum(p.stat().st_size for p in files)
    record = {
        "mode": spec.mode,
        "source": str(src.root),
        "copy_of": str(src.parent) if src.parent else None,
        "workdir": src.rel.as_posix(),
        "commit": commit,
        "dirty": bool(diff),
        "diff": DIFF if diff else None,
        "untracked_not_copied": untracked if spec.mode == "git" else 0,
        "files": len(files),
        "bytes": size,
        "exclude": exclude,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.monotonic() - started, 3),
    }
    (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    if size > LARGE_BYTES:
        log.warning(
            "note: the code snapshot of %s is %d MiB: add data folders to snapshot.exclude",
            src.root,
            size // 2**20,
        )
    return record


def setup_lines(spec: Snapshot, src: Source, folder: Path) -> list[str]:
    """Shell lines, after the job's own setup: say which snapshot runs, start in it, and put it
    on PYTHONPATH ahead of the original (entries pointing into the source tree are mapped into
    the copy, then the copy's top and its ``src/``, so editable installs resolve to the copy)."""
    code = folder / CODE_DIR
    mapped = []
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        rel = _inside(Path(entry), src.root) if entry else None
        if rel is not None:
            mapped.append(code / rel)
    mapped += [code] + ([code / "src"] if (src.root / "src").is_dir() else [])
    path = os.pathsep.join(shlex.quote(str(p)) for p in dict.fromkeys(mapped))
    return [
        describe(spec, src, folder),
        f"cd {shlex.quote(str(workdir_in(src, folder)))}",
        f"export PYTHONPATH={path}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"export HPCDL_SNAPSHOT_SOURCE={shlex.quote(str(src.root / src.rel))}",
    ]


def missing(argv: list[str] | None, workdir: Path) -> str | None:
    """The program or ``python SCRIPT`` a command names by a relative path that the copy lacks
    (an untracked or excluded file); ``None`` when nothing is missing."""
    if not argv:
        return None
    names = [argv[0]] if "/" in argv[0] and not argv[0].startswith("/") else []
    if Path(argv[0]).name.startswith("python") and len(argv) > 1 and argv[1].endswith(".py"):
        names.append(argv[1])
    return next((n for n in names if not (workdir / n).exists()), None)


def check(spec: Snapshot, cwd: str | None, where: str) -> None:
    """Before queueing: the tools a snapshot needs are here (and a repository for ``git``)."""
    if spec.mode != "none":
        source(spec, Path(cwd or Path.cwd()), where)


def stage(
    spec: Snapshot, cwd: str | None, folder: Path, argv: list[str] | None, copy: bool = True
) -> tuple[Path, list[str]]:
    """Snapshot the code of the job's working directory ``cwd`` into ``folder`` (only described
    when ``copy`` is false, as for ``render``): the task's working directory in the copy and the
    setup lines that start there."""
    src = source(spec, Path(cwd or Path.cwd()))
    task_cwd = workdir_in(src, folder)
    if copy:
        take(spec, src, folder)
        name = missing(argv, task_cwd)
        if name is not None:
            why = "untracked: git add it" if spec.mode == "git" else "excluded"
            raise ConfigError(
                "job",
                "snapshot",
                f"{name!r} is not in the {spec.mode} snapshot ({why}, or change snapshot.exclude)",
            )
    return task_cwd, setup_lines(spec, src, folder)
