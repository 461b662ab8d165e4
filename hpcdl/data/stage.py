"""Copy a dataset once per node to node-local scratch, and read it from there."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from hpcdl.data.manifest import MANIFEST, Manifest
from hpcdl.errors import HpcdlError


def stage(path: str | Path, scratch: str | Path, *, checksums: bool = False) -> Path:
    """Return a complete local copy of the dataset at ``scratch/<name>-<digest>``.

    Safe to call from every rank of a node at once: a file lock lets the first caller copy
    (shards into a temporary folder, manifest last, then one rename) while the others wait
    and reuse the copy; later jobs on the node reuse it too. ``checksums`` re-hashes the copy.
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
            return dest  # the manifest is copied last: its presence means the copy is complete
        tmp = root / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for info in m.shards:
                shutil.copyfile(src / info.file, tmp / info.file)
            shutil.copyfile(src / MANIFEST, tmp / MANIFEST)
            verify(tmp, checksums=checksums)
            shutil.rmtree(dest, ignore_errors=True)
            os.rename(tmp, dest)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise HpcdlError(f"{exc.filename or dest}: staging failed: {exc.strerror}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest
