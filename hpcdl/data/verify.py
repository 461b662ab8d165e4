"""Check a dataset against its manifest: files, sizes, checksums, fields, shapes, counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcdl.data.manifest import MANIFEST, Manifest
from hpcdl.errors import HpcdlError
from hpcdl.util import sha256_file


@dataclass(frozen=True)
class Report:
    """What a successful verification covered."""

    path: Path
    shards: int
    samples: int
    bytes: int


def dataset_dirs(path: str | Path) -> list[Path]:
    """A dataset folder itself, or the split folders (train/val/test...) under a parent."""
    path = Path(path)
    if not path.is_dir():
        raise HpcdlError(f"{path}: no such directory")
    if (path / MANIFEST).exists() or any(path.glob("*.h5")):
        return [path]
    subs = sorted(
        d for d in path.iterdir() if d.is_dir() and ((d / MANIFEST).exists() or any(d.glob("*.h5")))
    )
    return subs or [path]


def verify(
    path: str | Path,
    checksums: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Raise :class:`HpcdlError` naming the file at the first problem; else return a report.

    ``on_progress(done, total)`` gets the shard bytes checked so far after each shard.
    """
    import h5py

    path = Path(path)
    m = Manifest.load(path)
    if m.compression == "lz4":
        import hdf5plugin  # noqa: F401  (registers the filter)
    listed = {s.file for s in m.shards}
    extra = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in listed)
    if extra:
        raise HpcdlError(f"{path / extra[0]}: extra file not in the manifest ({len(extra)} extra)")
    total, done = sum(s.bytes for s in m.shards), 0
    if on_progress is not None:
        on_progress(0, total)
    for info in m.shards:
        file = path / info.file
        if not file.is_file():
            raise HpcdlError(f"{file}: missing (listed in {path / MANIFEST})")
        size = file.stat().st_size
        if size != info.bytes:
            what = "truncated" if size < info.bytes else "wrong size"
            raise HpcdlError(f"{file}: {what}: {size} bytes, the manifest says {info.bytes}")
        if checksums and sha256_file(file) != info.sha256:
            raise HpcdlError(f"{file}: corrupted: sha256 differs from the manifest")
        try:
            with h5py.File(file, "r") as h5:
                for name, spec in m.fields.items():
                    if name not in h5:
                        raise HpcdlError(f"{file}: field {name!r} is missing")
                    d = h5[name]
                    if d.dtype != np.dtype(spec.dtype):
                        raise HpcdlError(
                            f"{file}: field {name!r} has dtype {d.dtype}, the manifest says "
                            f"{spec.dtype}"
                        )
                    if d.shape != (info.samples, *spec.shape):
                        raise HpcdlError(
                            f"{file}: field {name!r} has shape {d.shape}, the manifest says "
                            f"{(info.samples, *spec.shape)}"
                        )
                    if d.chunks is None or d.chunks[0] != m.chunk_samples:
                        raise HpcdlError(
                            f"{file}: field {name!r} is chunked {d.chunks}, the manifest says "
                            f"{m.chunk_samples} samples per chunk"
                        )
                extra_fields = sorted(set(h5) - set(m.fields))
                if extra_fields:
                    raise HpcdlError(f"{file}: fields {extra_fields} are not in the manifest")
        except OSError as exc:
            raise HpcdlError(f"{file}: not a readable HDF5 file ({exc})") from None
        done += info.bytes
        if on_progress is not None:
            on_progress(done, total)
    return Report(path, len(m.shards), m.samples, total)
