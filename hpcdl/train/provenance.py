"""What a run folder records of where its result came from (``provenance.json``, and the
uncommitted changes as ``code.diff``), so that ``hpcdl reproduce`` can re-run it and say what
changed since: the code (commit and diff of the repository it was started from), the data
(each dataset's manifest, whose checksums cover every shard), the container image, and the
versions of the libraries whose arithmetic decides the bits. Seeds and every other setting
are in the run's resolved ``config.yaml``.

Recorded once, when the folder is made: a resumed run keeps what its first start recorded."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from hpcdl.errors import HpcdlError
from hpcdl.util import atomic_write_json, atomic_write_text, get_logger

log = get_logger(__name__)

PROVENANCE = "provenance.json"
CODE_DIFF = "code.diff"
# the packages whose versions change a CPU run's arithmetic (or its data order)
PACKAGES = ("hpcdl", "torch", "deepspeed", "numpy", "h5py")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versions() -> dict[str, str | None]:
    """The installed versions of :data:`PACKAGES` and Python's (no import: metadata only)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_state(workdir: Path, live: bool = False) -> dict[str, Any]:
    """The git commit and uncommitted diff of the repository holding ``workdir`` (a job's code
    snapshot: the commit and diff it recorded); commit None outside a repository. ``live``:
    as it is now, not as this process first saw it."""
    ask = _code_state.__wrapped__ if live else _code_state
    return dict(ask(workdir.resolve()))


@functools.cache
def _code_state(workdir: Path) -> dict[str, Any]:
    """Once per process and folder: the code a process runs is what it imported when it
    started, and a warm sweep worker's trials (one run folder each) would otherwise ask git
    again for every trial (~40 ms here, a quarter of a warm trial's set-up)."""
    from hpcdl.snapshot import Snapshot, git_state, source

    src = source(Snapshot(mode="none"), workdir)
    commit, diff, untracked = git_state(src)
    return {
        "root": str(src.root),
        "commit": commit,
        "diff_sha256": sha256(diff.encode()) if diff else None,
        "untracked": untracked,
        "diff": diff,  # written to code.diff, not into the record
    }


def data_state(path: str) -> dict[str, Any]:
    """A dataset's folder and the checksum of its manifest (which lists each shard's checksum)."""
    from hpcdl.data.manifest import MANIFEST

    manifest = Path(path) / MANIFEST
    try:
        return {"path": path, "manifest_sha256": sha256(manifest.read_bytes())}
    except OSError as exc:
        raise HpcdlError(f"{manifest}: cannot read it ({exc.strerror})") from None


def record(run_dir: Path, data: dict[str, str], image: str | None, workdir: Path) -> None:
    """Write ``provenance.json`` (and ``code.diff`` when the tree had uncommitted changes).
    A part that cannot be found is recorded as its error: the run itself is not stopped."""
    out: dict[str, Any] = {"versions": versions(), "image": image}
    try:
        code = code_state(workdir)
        diff = code.pop("diff")
        if diff:
            atomic_write_text(run_dir / CODE_DIFF, diff)
        out["code"] = code
    except HpcdlError as exc:  # e.g. git is not installed: reproduce will name what is missing
        log.warning("run %s: code not recorded (%s)", run_dir, exc)
        out["code"] = {"error": str(exc)}
    try:
        out["data"] = {split: data_state(path) for split, path in data.items()}
    except HpcdlError as exc:
        out["data"] = {"error": str(exc)}
    atomic_write_json(run_dir / PROVENANCE, out)


def read(run_dir: Path) -> dict[str, Any]:
    """The recorded provenance (``{}`` when the folder has none)."""
    path = run_dir / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else {}
