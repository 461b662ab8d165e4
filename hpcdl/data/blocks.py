"""The I/O half of :class:`~hpcdl.data.reader.ShardedDataset`: reading a slot's blocks of chunks.

Uncompressed shards are read with ``os.preadv`` at the chunk byte offsets (found once per process
from HDF5's chunk index) from a few threads, bypassing h5py's global lock; compressed shards go
through h5py. One block is read ahead, and the block after it is announced to the kernel
(``posix_fadvise(WILLNEED)``) for a deeper I/O queue. The reader module decides *which* samples
each process reads; this one only reads them.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcdl.data.manifest import Manifest
from hpcdl.errors import HpcdlError


@dataclass
class Block:
    """One block of a slot's stream, read into a recycled buffer (rows ``[0, n)`` are valid)."""

    start: int  # position of the block's first sample in the slot's stream
    arrays: dict[str, np.ndarray]
    n: int
    perm: np.ndarray | None

    def take(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows ``lo:hi`` of the (shuffled) block, as fresh arrays."""
        if self.perm is None:
            return {f: a[lo:hi].copy() for f, a in self.arrays.items()}
        idx = self.perm[lo:hi]
        return {f: np.take(a, idx, axis=0) for f, a in self.arrays.items()}


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

    def _read_segment(
        self,
        files: _Files,
        offsets: dict[str, np.ndarray] | None,
        seg: np.ndarray,
        bufs: dict[str, np.ndarray],
        row: int,
    ) -> None:
        unit, first, stop = (int(v) for v in seg)
        shard, n = int(self.unit_shard[unit]), stop - first
        for f in self.fields:
            dest = bufs[f][row : row + n]
            if offsets is None:
                lo = int(self.unit_chunk[unit]) * self.manifest.chunk_samples + first
                files.h5[shard][f].read_direct(dest, np.s_[lo : lo + n])
                continue
            item = self.item[f]
            view = memoryview(dest.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
            got = os.preadv(files.fds[shard], [view], int(offsets[f][unit]) + first * item)
            if got != n * item:
                raise HpcdlError(
                    f"{self.path / self.manifest.shards[shard].file}: short read (truncated? "
                    "run hpcdl data verify)"
                )

    def _advise(
        self, files: _Files, offsets: dict[str, np.ndarray], block: np.ndarray, advised: list[str]
    ) -> None:
        """Let the kernel fetch ``block`` while the one before it is read: a deeper I/O queue."""
        for unit, a, b in block:
            fd = files.fds[int(self.unit_shard[unit])]
            for f in advised:
                item = self.item[f]
                pos, size = int(offsets[f][unit] + a * item), int((b - a) * item)
                os.posix_fadvise(fd, pos, size, os.POSIX_FADV_WILLNEED)

    def blocks(
        self, plan: list[np.ndarray], starts: np.ndarray, first: int, seed: list[int] | None
    ) -> Generator[Block, None, None]:
        """Blocks ``first..`` of ``plan`` in order, with one block of read-ahead; two buffer sets
        are recycled. ``seed`` (None: no shuffle) plus the block index seeds each block's
        sample permutation."""
        cap = self.block_units * self.manifest.chunk_samples
        specs = self.manifest.fields
        free = [
            {f: np.empty((cap, *specs[f].shape), specs[f].dtype) for f in self.fields}
            for _ in range(2)
        ]
        shards = {int(self.unit_shard[u]) for b in plan[first:] for u in b[:, 0]}
        offsets = self.chunk_offsets(shards)
        files = _Files(self.path, self.manifest, shards, direct=offsets is not None)
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hpcdl-read")
        inflight: deque[tuple[int, dict[str, np.ndarray], list[Future[None]]]] = deque()
        # fields whose chunks are big enough for read-ahead advice to beat its syscall cost
        advised = [f for f in self.fields if self.item[f] * self.manifest.chunk_samples >= 1 << 16]

        def submit(bi: int) -> None:
            if offsets is not None and bi + 1 < len(plan):
                self._advise(files, offsets, plan[bi + 1], advised)
            bufs = free.pop()
            rows = np.concatenate([[0], np.cumsum(plan[bi][:, 2] - plan[bi][:, 1])])
            futs = [
                pool.submit(self._read_segment, files, offsets, seg, bufs, int(r))
                for seg, r in zip(plan[bi], rows[:-1], strict=True)
            ]
            inflight.append((bi, bufs, futs))

        try:
            for bi in range(first, min(first + 2, len(plan))):
                submit(bi)
            while inflight:
                bi, bufs, futs = inflight.popleft()
                for fut in futs:
                    fut.result()
                n = int(starts[bi + 1] - starts[bi])
                perm = None
                if seed is not None:
                    perm = np.random.default_rng([*seed, bi]).permutation(n)
                yield Block(int(starts[bi]), bufs, n, perm)
                free.append(bufs)
                if bi + 2 < len(plan):
                    submit(bi + 2)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            files.close()
