"""Batch buffers handed to the training loop without a copy, recycled once nothing holds them.

A :class:`Slots` is a set of equal batch buffers ("slots") in one memory region. The reader
writes a batch into a slot and hands out tensors that *view* it; the slot is reused only after
every tensor (and view of one) of that batch is gone, which a ``weakref.finalize`` on the one
array the tensors keep alive reports. Reusing buffers avoids a fresh allocation's page faults for
every batch (as costly as the copy itself on this machine).

With DataLoader workers the region is a shared anonymous mapping made by the main process
*before* the workers fork: a worker fills one of its own slots and sends the main process only a
:class:`SlotRef` (slot, rows); the main process wraps that slot in tensors, so the batch crosses
no pipe and is never copied again (the DataLoader's own path copies every batch into a fresh
shared-memory file and maps it again in the main process). Each slot's state lives in the
region too: FREE -> FILLING (set by the worker that claims it) -> HANDED (set by the main process
when it wraps it) -> FREE (when the last tensor of it dies). When a worker finds none of its slots
free (the training loop holds many batches), it uses a one-off buffer and the DataLoader's path.
"""

from __future__ import annotations

import mmap
import multiprocessing
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hpcdl.data.manifest import Manifest

FREE, FILLING, HANDED = 0, 1, 2
ALIGN = 64  # field offsets in a slot: any dtype's alignment, and torch's view(dtype) needs it
STAGES = ("read", "wait", "shuffle", "collate", "handoff", "loader")  # seconds, see ReadStats


@dataclass(frozen=True)
class SlotRef:
    """A batch a worker wrote into shared slot ``slot``: ``n`` rows (plus sample ids when
    recording). Tiny to pickle: this is all that crosses the DataLoader's queue."""

    slot: int
    n: int
    ids: np.ndarray | None = None


@dataclass
class Dest:
    """Where one batch is assembled: full-size arrays per field; ``slot`` -1 for a one-off."""

    arrays: dict[str, np.ndarray]
    slot: int


class ReadStats:
    """Seconds per stage of one reading process (a row of a shared table with workers).

    read: reading threads inside preadv or h5py (summed over threads); wait: the reading process
    blocked on those reads; shuffle: permutations and where each sample goes; collate: gathers of
    compressed data and wrapping batches in tensors; handoff: the main process turning a
    worker's slot into tensors; loader: the training loop waiting inside the DataLoader for
    the next batch (ShardLoader's own row).
    """

    def __init__(self, row: np.ndarray | None = None):
        self.row = np.zeros(len(STAGES)) if row is None else row

    def add(self, stage: int, seconds: float) -> None:
        self.row[stage] += seconds

    def as_dict(self) -> dict[str, float]:
        return {s: float(v) for s, v in zip(STAGES, self.row, strict=True)}


def slot_layout(manifest: Manifest, fields: list[str], batch_size: int) -> dict[str, int]:
    """Byte offset of each field in a slot, plus ``"_bytes"``: the slot's size."""
    out, pos = {}, 0
    for f in fields:
        out[f] = pos
        pos += -(-manifest.fields[f].sample_bytes * batch_size // ALIGN) * ALIGN
    out["_bytes"] = max(pos, ALIGN)
    return out


class Slots:
    """``count`` batch slots (+ a stats row per reading process), private or shared.

    ``shared=True`` maps anonymous shared memory: create it before the DataLoader forks its
    workers, which then write into the same pages the main process reads.
    """

    def __init__(
        self, manifest: Manifest, fields: list[str], batch_size: int, count: int, *,
        shared: bool = False, stats_rows: int = 1,
    ):  # fmt: skip
        self.fields, self.batch_size, self.count, self.shared = fields, batch_size, count, shared
        self.specs = {f: (np.dtype(manifest.fields[f].dtype), manifest.fields[f].shape) for f in fields}  # fmt: skip
        self.offsets = slot_layout(manifest, fields, batch_size)
        self.slot_bytes = self.offsets["_bytes"]
        head = -(-(count * 4 + stats_rows * len(STAGES) * 8) // ALIGN) * ALIGN
        size = head + count * self.slot_bytes
        # MAP_SHARED | MAP_ANONYMOUS: inherited by forked workers; private: plain memory
        if shared:
            self.mem: Any = mmap.mmap(-1, size)
        else:
            self.mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_HUGEPAGE"):  # samples land in random rows: fewer TLB misses
                self.mem.madvise(mmap.MADV_HUGEPAGE)
        buf = np.frombuffer(self.mem, np.uint8)
        self.state = buf[: count * 4].view(np.int32)
        stats = buf[count * 4 : count * 4 + stats_rows * len(STAGES) * 8]
        self.stats = stats.view(np.float64).reshape(stats_rows, len(STAGES))
        self.data = buf[head:]
        self._arrays = [self._views(s, batch_size) for s in range(count)]

    def _views(self, slot: int, n: int) -> dict[str, np.ndarray]:
        base = slot * self.slot_bytes
        out = {}
        for f, (dtype, shape) in self.specs.items():
            a = self.data[base + self.offsets[f] :][: n * dtype.itemsize * int(np.prod(shape))]
            out[f] = a.view(dtype).reshape(n, *shape)
        return out

    def acquire(self, lo: int = 0, hi: int | None = None) -> Dest | None:
        """A free slot among ``lo..hi`` marked FILLING, or None when all are taken."""
        free = np.flatnonzero(self.state[lo:hi] == FREE)
        if not len(free):
            return None
        slot = lo + int(free[0])
        self.state[slot] = FILLING
        return Dest(self._arrays[slot], slot)

    def one_off(self) -> Dest:
        """A fresh buffer outside the slots (nothing free): the old path, one allocation."""
        return Dest({f: np.empty((self.batch_size, *s), d) for f, (d, s) in self.specs.items()}, -1)

    def release(self, slot: int) -> None:
        self.state[slot] = FREE

    def handout(self, slot: int, n: int, stats: ReadStats | None = None) -> dict[str, torch.Tensor]:
        """Tensors over the first ``n`` rows of ``slot``; the slot is FREE again once all of them
        (and every view of them) are gone."""
        t0 = time.perf_counter()
        self.state[slot] = HANDED
        # A fresh array per field and handout, kept alive by its tensor (and every view of
        # it); the slot is free when the last of them goes. (torch's own view ops release the
        # GIL, which costs a thread switch per call while the reading threads run.)
        out, left = {}, [len(self.specs)]

        def gone() -> None:
            left[0] -= 1
            if not left[0]:
                self.release(slot)

        for f, a in self._arrays[slot].items():
            view = a[:n]
            weakref.finalize(view, gone)
            out[f] = torch.from_numpy(view)
        if stats is not None:
            stats.add(STAGES.index("handoff"), time.perf_counter() - t0)
        return out


def in_flight(block_samples: int, batch_size: int) -> int:
    """Slots one reading process needs: the batches three blocks touch (one being handed out,
    two being read), plus a few the training loop and the DataLoader hold."""
    return -(-3 * block_samples // batch_size) + 4


class SlotSource:
    """Batch buffers of one reading process: slots ``lo..hi`` of ``slots`` (its own, or a
    worker's share of the shared ring), or a one-off buffer when none is free."""

    def __init__(self, slots: Slots, lo: int, hi: int, stats: ReadStats, ids_key: str):
        self.slots, self.lo, self.hi, self.stats, self.ids_key = slots, lo, hi, stats, ids_key
        self.shared = slots.shared

    def reclaim(self) -> None:
        """Free this process's FILLING slots: at the start of an iteration every batch of the
        previous one was either handed over (HANDED) or dropped by the DataLoader's reset."""
        mine = self.slots.state[self.lo : self.hi]
        mine[mine == FILLING] = FREE

    def acquire(self) -> Dest:
        return self.slots.acquire(self.lo, self.hi) or self.slots.one_off()

    def release(self, dest: Dest) -> None:
        if dest.slot >= 0:
            self.slots.release(dest.slot)

    def deliver(self, dest: Dest, n: int, ids: np.ndarray | None) -> Any:
        """What the reading process yields: a SlotRef for a shared slot (the main process wraps
        it), else tensors over the buffer (no copy)."""
        if self.shared and dest.slot >= 0:
            return SlotRef(dest.slot, n, ids)
        t0 = time.perf_counter()
        if dest.slot >= 0:
            out = self.slots.handout(dest.slot, n)
        else:
            out = {f: torch.from_numpy(a[:n]) for f, a in dest.arrays.items()}
        if ids is not None:
            out[self.ids_key] = torch.from_numpy(ids)
        self.stats.add(STAGES.index("collate"), time.perf_counter() - t0)
        return out


def shared_ring(ds: Any, loader: Any, previous: Slots | None) -> Slots | None:
    """The shared slots the workers of ``loader`` (over ShardedDataset ``ds``) will write into,
    made before they fork; None for the DataLoader's own path: no workers, pinned memory (the
    DataLoader's pinning thread copies anyway) or a start method other than fork (which would
    not inherit the mapping). Persistent workers keep the ring they forked with."""
    if ds.num_workers == 0 or loader.pin_memory:
        return None
    ctx = loader.multiprocessing_context or multiprocessing.get_context()
    if ctx.get_start_method() != "fork":
        return None
    if loader.persistent_workers and previous is not None:
        return previous
    per = in_flight(ds.block_units * ds.manifest.chunk_samples, ds.batch_size)
    per += (loader.prefetch_factor or 2) + 2  # the DataLoader's queue and the loop's batches
    return Slots(ds.manifest, ds.fields, ds.batch_size, per * ds.num_workers, shared=True,
                 stats_rows=ds.num_workers)  # fmt: skip
