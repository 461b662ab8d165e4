"""Write a source as HDF5 shards plus a manifest, serially or over MPI ranks, atomically."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from hpcdl.data.manifest import MANIFEST, FieldSpec, Manifest, ShardInfo
from hpcdl.data.parse import parse_size
from hpcdl.data.sources import Part, Source
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.util import (  # also importable from here, as it was before hpcdl.util
    atomic_path,
    sha256_file,
)

DEFAULT_SHARD_SIZE = 128 << 20
DEFAULT_CHUNK_SIZE = 1 << 20
PIECE_BYTES = 16 << 20  # samples handed to HDF5 per write call
COMPRESSIONS = ("none", "gzip", "lz4")
T = TypeVar("T")


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: samples ``start:stop`` of a split."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def file(self) -> str:
        return f"shard-{self.index:05d}.h5"


@dataclass(frozen=True)
class SplitPlan:
    """How one split is cut into shards and chunks."""

    split: str
    samples: int
    chunk_samples: int
    jobs: tuple[ShardJob, ...]


def plan_split(
    split: str, samples: int, sample_bytes: int, shard_bytes: int, chunk_bytes: int
) -> SplitPlan:
    """Chunks of ~chunk_bytes; shards of whole chunks; a tail shorter than a chunk joins the last shard."""
    chunk = max(1, min(chunk_bytes // sample_bytes, samples))
    per_shard = max(1, shard_bytes // sample_bytes // chunk) * chunk
    bounds = [*range(0, samples, per_shard), samples]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < chunk:
        del bounds[-2]
    jobs = tuple(ShardJob(split, i, a, b) for i, (a, b) in enumerate(itertools.pairwise(bounds)))
    return SplitPlan(split, samples, chunk, jobs)


def mpi_comm() -> Any:
    """``MPI.COMM_WORLD`` when launched as several MPI ranks (mpiexec, srun --mpi=...), else None."""
    sizes = [os.environ.get(k) for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")]
    step = os.environ.get("SLURM_STEP_ID", "")
    if step.isdigit() and int(step) < 0xFFFFFFF0:  # a real srun step, not the batch script
        sizes.append(os.environ.get("SLURM_STEP_NUM_TASKS"))
    n = max((int(s) for s in sizes if s and s.isdigit()), default=1)
    if n <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise HpcdlError(
            f"launched as {n} tasks but mpi4py is not installed (pip install mpi4py)"
        ) from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != n:
        raise HpcdlError(
            f"launched as {n} tasks but MPI sees {comm.Get_size()} rank(s); with srun pass "
            "--mpi=pmi2 or --mpi=pmix (otherwise every task would write every shard)"
        )
    return comm


def _compression_kwargs(compression: str | None, level: int | None) -> dict[str, Any]:
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4 if level is None else level}
    if compression == "lz4":
        import hdf5plugin

        return dict(hdf5plugin.LZ4())
    return {}


def write_shard(
    path: Path,
    part: Part,
    job: ShardJob,
    fields: dict[str, FieldSpec],
    chunk_samples: int,
    compression: dict[str, Any],
    advance: Any = None,
) -> ShardInfo:
    """Write one shard under a temporary name, then rename it into place; return its record."""
    import h5py

    n = job.stop - job.start
    sample_bytes = sum(f.sample_bytes for f in fields.values())
    piece = max(1, PIECE_BYTES // sample_bytes // chunk_samples) * chunk_samples
    try:
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                dsets = {
                    name: f.create_dataset(
                        name,
                        shape=(n, *spec.shape),
                        dtype=spec.dtype,
                        chunks=(chunk_samples, *spec.shape),
                        track_times=False,
                        **compression,
                    )
                    for name, spec in fields.items()
                }
                for a in range(0, n, piece):
                    b = min(n, a + piece)
                    data = part.read(job.start + a, job.start + b)
                    for name, dset in dsets.items():
                        dset[a:b] = data[name]
                    if advance is not None:
                        advance((b - a) * sample_bytes)
            # hashed before the rename: the record describes exactly the file put in place
            info = ShardInfo(
                file=path.name, samples=n, bytes=tmp.stat().st_size, sha256=sha256_file(tmp)
            )
    except OSError as exc:
        raise HpcdlError(f"{path}: cannot write: {exc}") from None
    return info


def _prepare(out: Path, splits: list[str], overwrite: bool) -> None:
    """Refuse non-empty split folders unless overwriting; then drop the manifest first."""
    for split in splits:
        d = out / split
        if d.is_dir() and any(d.iterdir()):
            if not overwrite:
                raise ConfigError(str(d), "output", "exists and is not empty; pass --overwrite")
            (d / MANIFEST).unlink(missing_ok=True)  # from here on the old dataset is invalid
            for p in d.iterdir():
                if p.name.startswith((".shard-", "shard-", f".{MANIFEST}.tmp")):
                    p.unlink()
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                str(d), "output", f"cannot create the folder: {exc.strerror}"
            ) from None


def _advancer(
    on_progress: Callable[[int, int], None] | None, total: int
) -> Callable[[int], None] | None:
    """Turn ``write_shard``'s increments into cumulative ``on_progress(done, total)`` calls."""
    if on_progress is None:
        return None
    done = 0
    on_progress(0, total)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        on_progress(done, total)

    return advance


class _Ranks:
    """This process among the writer ranks (one, without MPI), and how they agree on failures."""

    def __init__(self, comm: Any):
        self.comm = comm
        self.rank: int = comm.Get_rank() if comm is not None else 0
        self.size: int = comm.Get_size() if comm is not None else 1

    def agree(self, error: str | None) -> None:
        """Every rank learns whether any rank failed, and all raise the same error."""
        errors = self.comm.allgather(error) if self.comm is not None else [error]
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            r, e = failed[0]
            raise HpcdlError(e if self.size == 1 else f"rank {r}: {e}")

    def attempt(self, fn: Callable[[], T]) -> T:
        """``fn()`` on this rank; if it fails on any rank, every rank raises (none hangs)."""
        if self.comm is None:
            return fn()
        try:
            result = fn()
        except HpcdlError as exc:
            self.agree(str(exc) or type(exc).__name__)  # an empty message must still fail
        except Exception as exc:
            self.agree(f"{type(exc).__name__}: {exc}")
        else:
            self.agree(None)
            return result
        raise AssertionError("unreachable: agree() raised")  # pragma: no cover

    def gather(self, items: list[T]) -> list[T]:
        """Everyone's items on rank 0 (its own without MPI); other ranks get an empty list."""
        if self.comm is None:
            return items
        return [x for rank_items in self.comm.gather(items, root=0) or [] for x in rank_items]

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()


def _check_compression(compression: str | None, level: int | None) -> Literal["gzip", "lz4"] | None:
    """``compression`` as stored in the manifest (None for none), or a ConfigError."""
    if compression == "none":
        compression = None
    if compression not in (None, "gzip", "lz4"):
        raise ConfigError(
            "write_shards", "compression", f"{compression!r}: use one of {COMPRESSIONS}"
        )
    if level is not None and not (compression == "gzip" and 0 <= level <= 9):
        raise ConfigError("write_shards", "compression_level", "only for gzip, 0-9")
    return "gzip" if compression == "gzip" else "lz4" if compression == "lz4" else None


def _write_manifests(
    out: Path,
    source: Source,
    plans: dict[str, SplitPlan],
    done: list[tuple[str, int, ShardInfo]],
    compression: Literal["gzip", "lz4"] | None,
    kwargs: dict[str, Any],
    seed: int,
) -> None:
    """One manifest per split, written last: its presence means every shard is in place."""
    for split, plan in plans.items():
        infos = [info for s, _, info in sorted(done, key=lambda t: (t[0], t[1])) if s == split]
        Manifest(
            samples=plan.samples,
            fields=source.fields,
            chunk_samples=plan.chunk_samples,
            compression=compression,
            compression_level=kwargs.get("compression_opts") if compression == "gzip" else None,
            shards=infos,
            split=split,
            seed=seed,
            source=source.name,
            classes=source.classes,
        ).save(out / split)


def write_shards(
    source: Source,
    out: str | Path,
    *,
    val: float = 0.0,
    test: float = 0.0,
    seed: int = 0,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    chunk_size: int | str = DEFAULT_CHUNK_SIZE,
    compression: str | None = None,
    compression_level: int | None = None,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Path]:
    """Write ``OUT/<split>/`` datasets (train, and val/test when their fraction is > 0).

    Samples are shuffled globally once (seeded); chunks hold ~chunk_size bytes along the sample
    axis and are written in order. Under MPI each rank writes every size-th shard and rank 0
    writes the manifests last, once every shard is in place. Returns {split: dataset folder}.
    ``on_progress(done, total)`` gets the bytes of samples written so far by rank 0 (out of its
    share) after each piece.
    """
    shard_bytes = parse_size(shard_size, "write_shards", "shard_size")
    chunk_bytes = parse_size(chunk_size, "write_shards", "chunk_size")
    compression = _check_compression(compression, compression_level)
    out = Path(out)
    parts = source.split(val, test, seed)
    sample_bytes = sum(f.sample_bytes for f in source.fields.values())
    plans = {
        s: plan_split(s, p.samples, sample_bytes, shard_bytes, chunk_bytes)
        for s, p in parts.items()
    }
    jobs = [j for p in plans.values() for j in p.jobs]
    ranks = _Ranks(mpi_comm())

    ranks.attempt(lambda: _prepare(out, list(plans), overwrite) if ranks.rank == 0 else None)
    mine = jobs[ranks.rank :: ranks.size]
    kwargs = _compression_kwargs(compression, compression_level)
    total = sum(j.stop - j.start for j in mine) * sample_bytes

    def write_mine() -> list[tuple[str, int, ShardInfo]]:
        done = []
        advance = _advancer(on_progress if ranks.rank == 0 else None, total)
        for j in mine:
            info = write_shard(
                out / j.split / j.file,
                parts[j.split],
                j,
                source.fields,
                plans[j.split].chunk_samples,
                kwargs,
                advance,
            )
            done.append((j.split, j.index, info))
        return done

    done = ranks.gather(ranks.attempt(write_mine))
    if ranks.rank == 0:
        _write_manifests(out, source, plans, done, compression, kwargs, seed)
    ranks.barrier()
    return {s: out / s for s in plans}
