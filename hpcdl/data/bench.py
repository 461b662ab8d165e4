"""``hpcdl bench io``: raw read vs. the naive per-sample Dataset vs. hpcdl's reader, same files."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcdl.data.manifest import Manifest, ShardInfo

Measure = Callable[[], tuple[int, float]]  # -> (samples, seconds)
CEILING = "shuffle ceiling"  # the row of scattered_read: the raw read placed sample by sample
Stages = dict[str, float]  # seconds per stage of hpcdl's reader (hpcdl.data.slots.STAGES)


def drop_caches() -> str | None:
    """Drop the page cache; return why it could not be done, or None on success."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"cannot drop the page cache ({exc.strerror}; needs root on a writable /proc)"
    return None


def raw_read(path: Path, m: Manifest, streams: int, limit: float) -> tuple[int, float]:
    """Read whole shards sequentially in 16 MiB pieces, ``streams`` files at a time.

    The ceiling: no parsing, no shuffling. -> (samples, seconds); stops after ``limit`` s.
    """
    t0 = time.perf_counter()

    def one(info: ShardInfo) -> int:
        if time.perf_counter() - t0 > limit:
            return 0
        buf = memoryview(bytearray(16 << 20))
        with open(path / info.file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        return info.samples

    with ThreadPoolExecutor(streams) as pool:
        samples = sum(pool.map(one, m.shards))
    return samples, time.perf_counter() - t0


def scattered_read(path: Path, m: Manifest, streams: int, limit: float) -> tuple[int, float]:
    """Like :func:`raw_read`, but every piece (4096 samples, at most 16 MiB) lands sample by
    sample (``sample_bytes`` each) in random rows of a buffer of three pieces: the kernel's copy alone, as a reader that shuffles
    samples must place them (no Python per sample: the I/O vectors are made before the clock
    starts). The ceiling of any sample-level shuffle on this machine, beside the raw read's."""
    from hpcdl.data.assemble import iovecs, preadv_all

    item = m.sample_bytes
    rows = max(1, min((16 << 20) // item, 4096))  # pieces of up to 16 MiB and 4096 samples
    dest = np.zeros(3 * rows * item, np.uint8)
    perms = [np.random.default_rng(i).permutation(3 * rows)[:rows] for i in range(8)]
    vecs = [iovecs(dest.ctypes.data + p * item, item, np.array([0, rows]))[0] for p in perms]

    def one(i: int) -> int:
        if time.perf_counter() - t0 > limit:
            return 0
        info = m.shards[i]
        fd = os.open(path / info.file, os.O_RDONLY)
        try:
            pos, k = 0, i
            while preadv_all(fd, vecs[k % 8].copy(), pos, rows * item) == rows * item:
                pos, k = pos + rows * item, k + 1
        finally:
            os.close(fd)
        return info.samples

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        samples = sum(pool.map(one, range(len(m.shards))))
    return samples, time.perf_counter() - t0


class NaiveDataset:
    """The common user path: a map-style Dataset reading ``h5[field][i]`` per sample."""

    def __init__(self, path: Path, m: Manifest):
        self.path, self.m = path, m
        self.ends = np.cumsum([s.samples for s in m.shards])
        self.files: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.m.samples

    def __getitem__(self, i: int) -> dict[str, Any]:
        import h5py
        import torch

        shard = int(np.searchsorted(self.ends, i, side="right"))
        if shard not in self.files:  # opened lazily, i.e. inside each worker
            self.files[shard] = h5py.File(self.path / self.m.shards[shard].file, "r")
        j = i - (int(self.ends[shard - 1]) if shard else 0)
        return {f: torch.as_tensor(self.files[shard][f][j]) for f in self.m.fields}


def timed(batches: Iterable[dict[str, Any]], limit: float) -> tuple[int, float]:
    """Consume batches until exhausted or ``limit`` seconds; -> (samples, seconds)."""
    n = 0
    t0 = time.perf_counter()
    for batch in batches:
        n += len(next(iter(batch.values())))
        if time.perf_counter() - t0 > limit:
            break
    return n, time.perf_counter() - t0


@dataclass
class Row:
    """One measured path."""

    path: str
    cache: str
    samples_per_s: float
    mb_per_s: float
    vs_raw: float = float("nan")
    vs_naive: float = float("nan")
    vs_ceiling: float = float("nan")  # against the shuffle ceiling row of the same cache
    seconds: float = float("nan")  # the median run's wall time
    stages: Stages | None = None  # where that run's time went (hpcdl's rows)


@dataclass
class IoBench:
    """All rows plus what the numbers mean."""

    dataset: Path
    samples: int
    sample_bytes: int
    file_bytes: int
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run_io_bench(
    path: str | Path,
    *,
    batch_size: int = 1024,
    workers: tuple[int, ...] = (0, 2),
    threads: int = 2,
    block_units: int = 16,
    naive_workers: int = 2,
    naive_seconds: float = 10.0,
    limit_seconds: float = 60.0,
    repeat: int = 3,
    cold: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> IoBench:
    """Measure every path cold (page cache dropped before each run) and warm; medians of repeats.

    ``on_progress(done, total)`` counts the timed runs after each one."""
    import torch
    from torch.utils.data import DataLoader

    path = Path(path)
    m = Manifest.load(path)
    sb = m.sample_bytes
    res = IoBench(path, m.samples, sb, sum(s.bytes for s in m.shards))
    res.notes.append(
        f"load average {os.getloadavg()[0]:.2f} at the start on {os.cpu_count()} cores "
        "(other work on the machine slows every row)"
    )

    def raw(streams: int) -> Measure:
        return lambda: raw_read(path, m, streams, limit_seconds)

    def naive() -> tuple[int, float]:
        loader: DataLoader[Any] = DataLoader(
            NaiveDataset(path, m),  # type: ignore[arg-type]  # a map-style dataset, duck-typed
            batch_size=batch_size,
            shuffle=True,
            num_workers=naive_workers,
            generator=torch.Generator().manual_seed(0),
        )
        return timed(loader, naive_seconds)

    stages: list[Stages | None] = [None]  # the last hpcdl run's, read by measure()

    def ours(w: int) -> Measure:
        return lambda: _hpcdl_run(path, batch_size, w, threads, block_units, limit_seconds, stages)

    paths = [(f"raw read, {n} stream{'s' * (n > 1)}", raw(n)) for n in sorted({1, threads})]
    raws = [name for name, _ in paths]
    # the most any sample-level shuffle can reach: measured beside the others, cold and warm
    paths.append((CEILING, lambda: scattered_read(path, m, threads, limit_seconds)))
    paths += [(f"hpcdl, {w} workers", ours(w)) for w in workers]
    naive_name = f"naive, {naive_workers} workers"

    cold = _cold_rows(cold, res)
    step = _Steps(on_progress, (len(paths) * repeat + 1) * (2 if cold else 1))

    def measure(cache: str, before: Callable[[], Any]) -> None:
        runs: dict[str, list[tuple[int, float, Stages | None]]] = {n: [] for n, _ in paths}
        for _ in range(repeat):  # interleaved, so drifts of the disk hit every path alike
            for name, fn in paths:
                before()
                stages[-1] = None
                runs[name].append((*step(fn()), stages[-1]))
        before()
        runs[naive_name] = [(*step(naive()), None)]
        for name, rs in runs.items():
            _, s, st = sorted(rs, key=lambda r: r[0] / r[1])[(len(rs) - 1) // 2]  # the median
            sps = statistics.median(n / s for n, s, _ in rs)
            res.rows.append(Row(name, cache, sps, sps * sb / 1e6, seconds=s, stages=st))

    if cold:
        measure("cold", drop_caches)
    raw(threads)()  # load the page cache
    measure("warm", lambda: None)
    _relate(res, raws, naive_name)
    _explain(res, repeat, naive_seconds, batch_size)
    return res


def _hpcdl_run(
    path: Path, batch_size: int, workers: int, threads: int, block_units: int, limit: float,
    stages: list[Stages | None],
) -> tuple[int, float]:  # fmt: skip
    """One timed pass of hpcdl's reader (ShardLoader with workers); its stages into ``stages``."""
    from hpcdl.data.reader import ShardedDataset, ShardLoader

    ds = ShardedDataset(path, batch_size, num_workers=workers, threads=threads, block_units=block_units)  # fmt: skip
    loader = ShardLoader(ds) if workers else None
    n, s = timed(loader or ds, limit)
    stages[-1] = loader.read_stats() if loader else ds.stats.as_dict()
    return n, s


def _cold_rows(cold: bool, res: IoBench) -> bool:
    """Whether cold rows can be measured (the page cache can be dropped); notes why not."""
    if not cold:
        res.notes.append("cold rows skipped (--no-cold)")
        return False
    why = drop_caches()
    if why is not None:
        res.notes.append(f"cold rows skipped: {why}")
    return why is None


class _Steps:
    """Counts timed runs for ``on_progress``; returns each run's result unchanged."""

    def __init__(self, on_progress: Callable[[int, int], None] | None, total: int):
        self.on_progress, self.total, self.done = on_progress, total, 0
        if on_progress is not None:
            on_progress(0, total)

    def __call__(self, result: tuple[int, float]) -> tuple[int, float]:
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)
        return result


def _relate(res: IoBench, raws: list[str], naive_name: str) -> None:
    """Fill each row's speed relative to the faster raw row and to the naive row (same cache)."""
    for cache in ("cold", "warm"):
        rows = {r.path: r for r in res.rows if r.cache == cache}
        ceiling = max((rows[n].samples_per_s for n in raws if n in rows), default=float("nan"))
        shuffle = rows[CEILING].samples_per_s if CEILING in rows else None
        for r in rows.values():
            r.vs_raw = r.samples_per_s / ceiling
            r.vs_naive = r.samples_per_s / rows[naive_name].samples_per_s
            if shuffle and r.path.startswith("hpcdl"):
                r.vs_ceiling = r.samples_per_s / shuffle


def _explain(res: IoBench, repeat: int, naive_seconds: float, batch_size: int) -> None:
    """The notes printed under the table: what each path is and what the numbers count."""
    res.notes.append(
        "raw read: whole shard files read in order, 16 MiB at a time, by 1 or --threads streams; "
        "x raw divides by the faster raw row"
    )
    res.notes.append(
        f"{CEILING}: the same read by --threads streams with every sample ({res.sample_bytes} B) "
        "placed in a random row by the kernel's copy alone, the most any sample-level shuffle "
        "can reach on this machine; x ceil divides hpcdl's rows by it (same cache)"
    )
    res.notes.append(
        "naive: map-style Dataset returning h5[field][i] per sample, DataLoader with a global "
        "shuffle; hpcdl: ShardedDataset (whole chunks, block shuffle), 0 workers = main process"
    )
    res.notes.append(
        f"MB/s counts sample payload ({res.sample_bytes} B/sample); raw reads whole files "
        f"({res.file_bytes / 2**30:.2f} GiB); medians of {repeat} runs, naive path bounded to "
        f"{naive_seconds:g} s; batch size {batch_size}"
    )
    res.notes.append(
        "time per stage: read = reading threads inside preadv/h5py (all threads, all reading "
        "processes: may exceed wall); wait = reading processes blocked on those reads; shuffle = "
        "permutations and I/O vectors; collate = gathers (compressed data) and wrapping batches; "
        "handoff = main process wrapping a worker's shared slot; loader = main process waiting "
        "inside the DataLoader (workers only)"
    )
    if res.file_bytes > 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
        res.notes.append("the dataset is large against RAM: 'warm' rows are partly cold")


def render(res: IoBench) -> Any:
    """A rich table of the rows."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(
        title=escape(
            f"hpcdl bench io {res.dataset} ({res.samples:,} samples of {res.sample_bytes:,} B)"
        )
    )
    for col in ("path", "cache", "samples/s", "MB/s", "x raw", "x ceil", "x naive"):
        t.add_column(col, justify="left" if col in ("path", "cache") else "right")
    for r in res.rows:
        t.add_row(
            r.path,
            r.cache,
            f"{r.samples_per_s:,.0f}",
            f"{r.mb_per_s:,.0f}",
            f"{r.vs_raw:.2f}",
            "" if r.vs_ceiling != r.vs_ceiling else f"{r.vs_ceiling:.2f}",  # nan: not hpcdl
            f"{r.vs_naive:,.0f}" if r.vs_naive >= 100 else f"{r.vs_naive:.1f}",
        )
    return t


def render_stages(res: IoBench) -> Any:
    """Where hpcdl's median runs spent their time, per stage (seconds; None when no hpcdl row)."""
    from rich.table import Table

    rows = [r for r in res.rows if r.stages is not None]
    if not rows:
        return None
    t = Table(title="where hpcdl's time went (the median run; seconds)", show_edge=False)
    cols = ("read", "wait", "shuffle", "collate", "handoff", "loader")
    for col in ("hpcdl path", "wall", *cols):
        t.add_column(col, justify="left" if col == "hpcdl path" else "right", no_wrap=True)
    for r in rows:
        assert r.stages is not None
        name = f"{r.path.removeprefix('hpcdl, ')} {r.cache}"
        t.add_row(name, f"{r.seconds:.2f}", *(f"{r.stages[c]:.2f}" for c in cols))
    return t
