"""The I/O half of :class:`~hpcdl.data.reader.ShardedDataset`: a slot's blocks, read into batches.

Uncompressed shards are read with ``preadv`` at the chunk byte offsets (found once per process
from HDF5's chunk index) from a few threads, bypassing h5py's global lock; each call's I/O vectors
point at the rows of the batches the block's samples are shuffled into (:mod:`hpcdl.data.assemble`),
so the kernel's copy out of the page cache is the only one. Compressed shards go through h5py into
a block buffer and are gathered into the batches. One block is read ahead, and the block after it
is announced to the kernel (``posix_fadvise(WILLNEED)``) for a deeper I/O queue. The reader module
decides *which* samples each process reads; this one only reads them.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hpcdl.data.assemble import addresses, iovecs, preadv_all
from hpcdl.data.manifest import Manifest
from hpcdl.data.placement import Placement, block_perm
from hpcdl.data.remainder import SlotPlan
from hpcdl.data.slots import STAGES, Dest, ReadStats
from hpcdl.errors import HpcdlError

READ, WAIT, SHUFFLE, COLLATE = (STAGES.index(s) for s in ("read", "wait", "shuffle", "collate"))


class BatchSource(Protocol):
    """Where batches are assembled: buffers to fill, given back when not handed out."""

    def acquire(self) -> Dest: ...

    def release(self, dest: Dest) -> None: ...


class _Files:
    """Per-process file handles, opened after the fork and closed at the end of an iteration."""

    def __init__(self, path: Path, manifest: Manifest, shards: set[int], direct: bool):
        self.fds: dict[int, int] = {}
        self.h5: dict[int, Any] = {}
        try:
            for shard in sorted(shards):
                file = path / manifest.shards[shard].file
                if direct:
                    self.fds[shard] = os.open(file, os.O_RDONLY)
                else:
                    import h5py

                    if manifest.compression == "lz4":
                        import hdf5plugin  # noqa: F401  (registers the filter)
                    self.h5[shard] = h5py.File(file, "r")
        except OSError as exc:
            self.close()
            raise HpcdlError(
                f"{exc.filename or path}: cannot open: {exc.strerror or exc}"
            ) from None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        for f in self.h5.values():
            f.close()


class BlockReader:
    """Reads blocks of (unit, first, stop) segments of one dataset; a unit is a (shard, chunk).

    ``unit_shard`` / ``unit_chunk`` give each unit's shard and chunk index within it. Chunk byte
    offsets are cached per process (a copy in each DataLoader worker).
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        fields: list[str],
        unit_shard: np.ndarray,
        unit_chunk: np.ndarray,
        *,
        block_units: int,
        threads: int,
    ):
        self.path, self.manifest, self.fields = path, manifest, fields
        self.item = {f: manifest.fields[f].sample_bytes for f in fields}
        self.unit_shard, self.unit_chunk = unit_shard, unit_chunk
        self.block_units, self.threads = block_units, threads
        self._offsets: dict[str, np.ndarray] | None = None  # chunk byte offsets, per process
        c = manifest.chunk_samples
        first_id = np.concatenate([[0], np.cumsum([s.samples for s in manifest.shards])])
        self.unit_first = first_id[unit_shard] + unit_chunk * c  # dataset id of each unit's row 0
        self._indexed: set[int] = set()  # shards whose chunk offsets are known

    def chunk_offsets(self, shards: set[int]) -> dict[str, np.ndarray] | None:
        """Byte offset of every unit's chunk per field (filled for ``shards`` on first need,
        once per process), or None when data go through h5py."""
        if self.manifest.compression is not None:
            return None
        import h5py

        c = self.manifest.chunk_samples
        if self._offsets is None:
            self._offsets = {f: np.full(len(self.unit_shard), -1, np.int64) for f in self.fields}
        for shard in sorted(shards - self._indexed):
            file = self.path / self.manifest.shards[shard].file
            units = np.flatnonzero(self.unit_shard == shard)
            try:
                with h5py.File(file, "r") as h5:
                    for f in self.fields:
                        d, spec = h5[f], self.manifest.fields[f]
                        if d.chunks != (c, *spec.shape) or d.dtype != np.dtype(spec.dtype):
                            raise HpcdlError(
                                f"{file}: field {f} does not match the manifest "
                                "(run hpcdl data verify)"
                            )
                        found = np.full(len(units), -1, np.int64)

                        def record(ci: Any, found: np.ndarray = found) -> None:
                            found[ci.chunk_offset[0] // c] = ci.byte_offset

                        d.id.chunk_iter(record)
                        if (found < 0).any():
                            raise HpcdlError(f"{file}: field {f} has unwritten chunks")
                        self._offsets[f][units] = found
            except (OSError, KeyError) as exc:
                raise HpcdlError(f"{file}: unreadable ({exc}); run hpcdl data verify") from None
            self._indexed.add(shard)
        return self._offsets

    def _scatter(self, jobs: list[tuple[int, int, np.ndarray, int, int]]) -> float:
        """Run (shard, fd, vectors, file offset, bytes) reads: each puts a segment's field
        straight into its batch rows. One task per thread and block keeps the Python between
        the GIL-free preadv calls short."""
        t0 = time.perf_counter()
        for shard, fd, iov, offset, want in jobs:
            if preadv_all(fd, iov, offset, want) != want:
                raise HpcdlError(
                    f"{self.path / self.manifest.shards[shard].file}: short read (truncated? "
                    "run hpcdl data verify)"
                )
        return time.perf_counter() - t0

    def _h5_segment(self, files: _Files, seg: np.ndarray, bufs: dict[str, np.ndarray], row: int) -> float:  # fmt: skip
        """Read (and decompress) a segment of a compressed block into the block buffer."""
        t0 = time.perf_counter()
        unit, first, stop = (int(v) for v in seg)
        lo = int(self.unit_chunk[unit]) * self.manifest.chunk_samples + first
        for f in self.fields:
            dest = bufs[f][row : row + stop - first]
            files.h5[int(self.unit_shard[unit])][f].read_direct(dest, np.s_[lo : lo + stop - first])
        return time.perf_counter() - t0

    def _advise(
        self, files: _Files, offsets: dict[str, np.ndarray], block: np.ndarray, advised: list[str]
    ) -> float:
        """Let the kernel fetch ``block`` while the one before it is read: a deeper I/O queue.
        Runs in its own thread: with a busy disk the call blocks until the kernel has queued
        the reads, which held up the main thread for half of a cold run."""
        t0 = time.perf_counter()
        for unit, a, b in block:
            fd = files.fds[int(self.unit_shard[unit])]
            for f in advised:
                item = self.item[f]
                pos, size = int(offsets[f][unit] + a * item), int((b - a) * item)
                os.posix_fadvise(fd, pos, size, os.POSIX_FADV_WILLNEED)
        return time.perf_counter() - t0

    def block_ids(self, block: np.ndarray) -> np.ndarray:
        """Dataset-wide sample ids of a block's rows, in read order."""
        return np.concatenate([self.unit_first[u] + np.arange(a, b) for u, a, b in block])

    def batches(
        self, plan: SlotPlan, skip: int, source: BatchSource, stats: ReadStats, ids: bool = False
    ) -> Generator[tuple[int, Dest, np.ndarray | None], None, None]:
        """Batches ``skip..`` of ``plan`` in order as (index, buffer, sample ids or None), with
        one block of read-ahead. Buffers not yet yielded go back to ``source`` at the end."""
        starts, bounds, blocks = plan.starts, plan.bounds, plan.blocks
        first = int(np.searchsorted(starts, bounds[skip], side="right")) - 1
        shards = {int(self.unit_shard[u]) for b in blocks[first:] for u in b[:, 0]}
        offsets = self.chunk_offsets(shards)
        run = _Run(self, plan, skip, source, stats, ids, offsets)
        run.files = _Files(self.path, self.manifest, shards, direct=offsets is not None)
        try:
            for bi in range(first, min(first + 2, len(blocks))):
                run.submit(bi)
            nxt = skip
            while run.inflight:
                bi = run.complete()
                if bi + 2 < len(blocks):
                    run.submit(bi + 2)
                while nxt < plan.batches and bounds[nxt + 1] <= starts[bi + 1]:
                    yield nxt, run.dests.pop(nxt), run.ids.pop(nxt, None)
                    nxt += 1
        finally:
            run.close()


class _Run:
    """One pass of :meth:`BlockReader.batches`: blocks in flight and the batches they fill."""

    def __init__(
        self, reader: BlockReader, plan: SlotPlan, skip: int, source: BatchSource,
        stats: ReadStats, ids: bool, offsets: dict[str, np.ndarray] | None,
    ):  # fmt: skip
        self.r, self.plan, self.skip, self.source, self.stats = reader, plan, skip, source, stats
        self.record, self.offsets = ids, offsets
        self.files: _Files | None = None
        self.pool = ThreadPoolExecutor(reader.threads, thread_name_prefix="hpcdl-read")
        self.adviser = ThreadPoolExecutor(1, thread_name_prefix="hpcdl-advise")
        self.dests: dict[int, Dest] = {}
        self.placement = Placement(plan, skip)
        self.ids: dict[int, np.ndarray] = {}
        self.inflight: deque[tuple[int, list[Future[float]], Any]] = deque()
        # rows of batches consumed before a resume are read (they share chunks) into this
        self.scratch = np.empty(max(reader.item.values()), np.uint8)
        self.advise_s = 0.0  # seconds the adviser thread spent in posix_fadvise
        # fields whose chunks are big enough for read-ahead advice to beat its syscall cost
        c = reader.manifest.chunk_samples
        self.advised = [f for f in reader.fields if reader.item[f] * c >= 1 << 16]

    def submit(self, bi: int) -> None:
        """Plan block ``bi`` (shuffle, destinations) and queue its reads."""
        t0 = time.perf_counter()
        r, plan, files = self.r, self.plan, self.files
        assert files is not None
        block, bounds = plan.blocks[bi], plan.bounds
        if self.offsets is not None and bi + 1 < len(plan.blocks):
            advice = self.adviser.submit(r._advise, files, self.offsets, plan.blocks[bi + 1], self.advised)  # fmt: skip
            advice.add_done_callback(self._advised)
        s0, s1 = int(plan.starts[bi]), int(plan.starts[bi + 1])
        batch, row = self.placement.block(bi)  # tables made a window of blocks at a time
        k0 = max(self.skip, int(np.searchsorted(bounds, s0, side="right")) - 1)
        k1 = int(np.searchsorted(bounds, s1 - 1, side="right"))  # batches k0..k1-1 get rows
        for k in range(k0, k1):
            if k not in self.dests:
                self.dests[k] = self.source.acquire()
        if self.record:
            block_ids = r.block_ids(block)
            for k in range(k0, k1):
                mine = batch == k
                out = self.ids.setdefault(k, np.empty(int(bounds[k + 1] - bounds[k]), np.int64))
                out[row[mine]] = block_ids[mine]
        seg_rows = np.concatenate([[0], np.cumsum(block[:, 2] - block[:, 1])])
        if self.offsets is None:  # compressed: h5py into a block buffer, gathered at the end
            specs = r.manifest.fields
            bufs = {f: np.empty((s1 - s0, *specs[f].shape), specs[f].dtype) for f in r.fields}
            futs = [self.pool.submit(r._h5_segment, files, seg, bufs, int(row0))
                    for seg, row0 in zip(block, seg_rows[:-1], strict=True)]  # fmt: skip
            self.inflight.append((bi, futs, (bufs, block_perm(plan, bi), k0, k1)))
        else:
            jobs = []
            for f in r.fields:
                item, off = r.item[f], self.offsets[f]
                bases = np.array([self.dests[k].arrays[f].ctypes.data for k in range(k0, k1)], np.int64)  # fmt: skip
                addr = addresses(batch, row, bases, k0, item, self.scratch.ctypes.data)
                iov, seg_vec = iovecs(addr, item, seg_rows, merge=plan.seed is None)
                for i, (unit, a, b) in enumerate(block.tolist()):
                    shard = int(r.unit_shard[unit])
                    jobs.append((shard, files.fds[shard], iov[seg_vec[i] : seg_vec[i + 1]],
                                 int(off[unit]) + a * item, (b - a) * item))  # fmt: skip
            jobs.sort(key=lambda j: (j[1], j[3]))  # in file order: kinder to read-ahead
            n = r.threads
            futs = [self.pool.submit(r._scatter, jobs[t::n]) for t in range(min(n, len(jobs)))]
            self.inflight.append((bi, futs, None))
        self.stats.add(SHUFFLE, time.perf_counter() - t0)

    def _advised(self, fut: Future[float]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.advise_s += fut.result()  # one adviser thread: no concurrent update

    def complete(self) -> int:
        """Wait for the oldest block in flight; gather it if it was staged. Returns its index."""
        bi, futs, staged = self.inflight.popleft()
        t0 = time.perf_counter()
        for fut in futs:
            self.stats.add(READ, fut.result())
        t1 = time.perf_counter()
        self.stats.add(WAIT, t1 - t0)
        if staged is not None:
            bufs, perm, k0, k1 = staged
            s0, s1 = int(self.plan.starts[bi]), int(self.plan.starts[bi + 1])
            bounds = self.plan.bounds
            for k in range(k0, k1):
                p0, p1 = max(int(bounds[k]), s0), min(int(bounds[k + 1]), s1)
                rows = np.arange(p0 - s0, p1 - s0) if perm is None else perm[p0 - s0 : p1 - s0]
                lo, hi = p0 - int(bounds[k]), p1 - int(bounds[k])
                for f, buf in bufs.items():
                    np.take(buf, rows, axis=0, out=self.dests[k].arrays[f][lo:hi])
            self.stats.add(COLLATE, time.perf_counter() - t1)
        return bi

    def close(self) -> None:
        """Stop the reads (waiting for those running: they write into our buffers), close the
        files and give back the buffers never yielded."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.adviser.shutdown(wait=True, cancel_futures=True)  # before the files close
        self.stats.add(READ, self.advise_s)
        if self.files is not None:
            self.files.close()
        for dest in self.dests.values():
            self.source.release(dest)
        self.dests.clear()
