"""Copy a dataset once per node to node-local scratch, and read it from there."""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Callable
from pathlib import Path

from hpcdl.data.manifest import MANIFEST, Manifest
from hpcdl.errors import HpcdlError
from hpcdl.util import atomic_path


def stage(
    path: str | Path,
    scratch: str | Path,
    *,
    checksums: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Return a complete local copy of the dataset at ``scratch/<name>-<digest>``.

    Safe to call from every rank of a node at once: a file lock lets the first caller copy
    (shards into a temporary folder, manifest last, then one rename) while the others wait
    and reuse the copy; later jobs on the node reuse it too. ``checksums`` re-hashes the copy.
    ``on_progress(done, total)`` gets the shard bytes copied so far (total at once on reuse).
    """
    from hpcdl.data.verify import verify

    src = Path(path)
    m = Manifest.load(src)
    root = Path(scratch)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HpcdlError(f"{root}: cannot create the staging folder: {exc.strerror}") from None
    dest = root / f"{src.resolve().name}-{m.digest()}"
    with open(root / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / MANIFEST).is_file():
            if on_progress is not None:
                total = sum(s.bytes for s in m.shards)
                on_progress(total, total)
            return dest  # the manifest is copied last: its presence means the copy is complete
        try:
            # a failed copy leaves nothing behind; the temporary folder is new and empty
            with atomic_path(dest, directory=True) as tmp:
                _copy_shards(src, tmp, m, on_progress)
                shutil.copyfile(src / MANIFEST, tmp / MANIFEST)
                verify(tmp, checksums=checksums)
                shutil.rmtree(dest, ignore_errors=True)  # an incomplete copy (no manifest)
        except OSError as exc:
            raise HpcdlError(f"{exc.filename or dest}: staging failed: {exc.strerror}") from None
    return dest


def _copy_shards(
    src: Path, tmp: Path, m: Manifest, on_progress: Callable[[int, int], None] | None
) -> None:
    total, done = sum(s.bytes for s in m.shards), 0
    if on_progress is not None:
        on_progress(0, total)
    for info in m.shards:
        shutil.copyfile(src / info.file, tmp / info.file)
        done += info.bytes
        if on_progress is not None:
            on_progress(done, total)
