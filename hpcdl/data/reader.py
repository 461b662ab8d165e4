"""ShardedDataset: a fast, deterministic, exactly resumable reader of hpcdl HDF5 shards.

Design, per epoch (all of it arithmetic on the manifest, identical on every rank):

* units are the (shard, chunk) pairs; a seeded permutation of them (``seed``, ``epoch``) is laid
  end to end as one stream of samples;
* the stream is cut into ``slots = world_size * max(1, num_workers)`` equal ranges of
  ``samples // slots`` samples; slot ``rank * W + worker`` reads its range, so every slot yields
  the same number of batches (the last ``samples % slots`` samples of the stream are dropped);
* a slot's units are grouped into blocks of ``block_units``; a block is read whole, shuffled at
  the sample level (seeded by seed, epoch, slot, block) and cut into consecutive batches; each
  sample is read straight into its row of its batch (:mod:`hpcdl.data.blocks`,
  :mod:`hpcdl.data.assemble`; where each goes is planned 16 blocks at a time,
  :mod:`hpcdl.data.placement`), the next blocks while the current one's batches are handed out;
* batches are tensors over recycled buffers (:mod:`hpcdl.data.slots`); with ShardLoader's
  workers those buffers are shared memory, so a batch crosses to the main process uncopied;
* a resume on another world size or worker count re-splits what the interrupted epoch had left
  (:mod:`hpcdl.data.remainder`).

Memory per reading process (the main one, or each DataLoader worker): batch buffers for three
blocks, about ``3 * block_units * chunk_samples * sample_bytes`` (48 MiB with the defaults and
1 MiB chunks) plus four batches; with ShardLoader's workers, ``prefetch_factor + 2`` more per
worker, in shared memory. The page cache holds one more advised block.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hpcdl.data.blocks import BlockReader
from hpcdl.data.manifest import Manifest
from hpcdl.data.remainder import SampleLayout, SlotPlan, remaining, resplit_batches, slot_plan
from hpcdl.data.slots import STAGES, ReadStats, SlotRef, Slots, SlotSource, in_flight, shared_ring
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.util import append_jsonl

# What the batch order is a function of: a resume state must match them, but for
_FIXED = ("world_size", "num_workers", "batch_size", "seed", "shuffle", "block_units", "drop_last")
# these two, whose change re-splits the rest of the epoch (hpcdl.data.remainder).
_RESIZABLE = ("world_size", "num_workers")
RECORD_ENV = "HPCDL_RECORD_SAMPLES"  # a folder: ShardLoader appends the ids it hands out
SAMPLE_IDS = "_sample_ids"  # the batch key of those ids (only while recording)


class ShardedDataset(IterableDataset):
    """Yields ready batches ``{field: tensor}`` of one rank; use ``DataLoader(batch_size=None)``.

    ``num_workers`` must equal the DataLoader's (0 = iterate in the main process); prefer
    :class:`ShardLoader`, which passes it and counts consumed batches for exact resume.
    ``len(ds)`` is the number of batches this rank gets per epoch, the same on every rank.
    """

    _local: Slots | None = None  # this process's batch buffers (made on first use)
    _ring: Slots | None = None  # set by ShardLoader before its workers fork
    _ring_per_worker = 0

    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        block_units: int = 16,
        drop_last: bool = True,
        fields: list[str] | None = None,
        threads: int = 2,
    ):
        self.path = Path(path)
        self.manifest = Manifest.load(self.path)
        where = f"ShardedDataset({self.path})"
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("num_workers", num_workers, 0),
            ("block_units", block_units, 1),
            ("threads", threads, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ConfigError(where, name, f"{value!r} must be an integer >= {low}")
        if not 0 <= rank < world_size:
            raise ConfigError(where, "rank", f"{rank} must be in [0, world_size={world_size})")
        unknown = sorted(set(fields or ()) - set(self.manifest.fields))
        if unknown or fields == []:
            raise ConfigError(
                where,
                "fields",
                f"unknown {unknown}; the dataset has {sorted(self.manifest.fields)}",
            )
        self.fields = list(fields or self.manifest.fields)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle = num_workers, seed, shuffle
        self.block_units, self.drop_last, self.threads = block_units, drop_last, threads

        c = self.manifest.chunk_samples
        sizes = [
            min(c, s.samples - k * c)
            for s in self.manifest.shards
            for k in range(math.ceil(s.samples / c))
        ]
        self._unit_sizes = np.asarray(sizes, dtype=np.int64)
        self._reader = BlockReader(  # the I/O: which process reads what is decided here
            self.path,
            self.manifest,
            self.fields,
            unit_shard=np.repeat(
                np.arange(len(self.manifest.shards)),
                [math.ceil(s.samples / c) for s in self.manifest.shards],
            ),
            unit_chunk=np.concatenate(
                [np.arange(math.ceil(s.samples / c)) for s in self.manifest.shards]
            ),
            block_units=block_units,
            threads=threads,
        )
        self.slots = world_size * max(1, num_workers)
        self.slot_samples = self.manifest.samples // self.slots
        if self.slot_samples == 0 or (drop_last and self.slot_samples < batch_size):
            raise ConfigError(
                where,
                "batch_size",
                f"{self.manifest.samples} samples over {self.slots} slots (ranks x workers) leave "
                f"{self.slot_samples} per slot, less than one batch of {batch_size}",
            )
        per = self.slot_samples
        self.batches_per_slot = per // batch_size if drop_last else math.ceil(per / batch_size)
        # Epoch and resume position, shared with (persistent) DataLoader workers.
        # [2]: 1 while the epoch is a re-split remainder (see load_state_dict).
        self._shared = multiprocessing.RawArray("q", 3)
        self._resumed_epoch: int | None = None  # set_epoch(this) keeps a loaded position
        self._resize: tuple[dict[str, Any], np.ndarray] | None = None  # (plan state, remainder)
        self.record_ids = bool(os.environ.get(RECORD_ENV))  # batches carry their samples' ids
        self.stats = ReadStats()  # seconds per stage in this process (hpcdl bench io prints them)

    def __getstate__(self) -> dict[str, Any]:
        # buffers are per process; a spawned worker makes its own (and uses no ring)
        return {**self.__dict__, "_local": None, "_ring": None}

    # --- sizes ---------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches this rank yields per epoch (batches per slot x workers)."""
        return self.batches_per_slot * max(1, self.num_workers)

    @property
    def dropped_per_epoch(self) -> int:
        """Samples not yielded per epoch (a different random set every epoch when shuffling)."""
        return self.manifest.samples - self.slots * min(
            self.slot_samples, self.batches_per_slot * self.batch_size
        )

    # --- epoch and resume ----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next iteration (call before each epoch).

        Right after :meth:`load_state_dict`, ``set_epoch(state["epoch"])`` keeps the loaded
        mid-epoch position, so the usual ``for epoch in range(start, n): set_epoch(epoch)`` loop
        resumes exactly.
        """
        if epoch == self._resumed_epoch:
            self._resumed_epoch = None
            return
        self._resumed_epoch = None
        self._shared[0], self._shared[1], self._shared[2] = epoch, 0, 0

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""
        return int(self._shared[0])

    @property
    def start_batch(self) -> int:
        """Batches of that epoch the next iteration skips (set by :meth:`load_state_dict`)."""
        return int(self._shared[1])

    def _resplit_batches(self) -> int:
        """Batches each rank yields in an epoch resumed on another world size."""
        assert self._resize is not None
        return resplit_batches(len(self._resize[1]), self.world_size, self.batch_size)

    def state_dict(self, batches_consumed: int) -> dict[str, Any]:
        """Position after this rank consumed ``batches_consumed`` batches of the current epoch.

        Count from the start of the epoch (a resumed epoch counts its skipped batches too);
        :class:`ShardLoader` does this for you. Every rank is at the same position.
        """
        limit = self._resplit_batches() if self._shared[2] else len(self)
        if not 0 <= batches_consumed <= limit:
            raise HpcdlError(f"batches_consumed={batches_consumed} is outside [0, {limit}]")
        state: dict[str, Any] = {"epoch": self.epoch, "batches": batches_consumed}
        state.update({k: getattr(self, k) for k in _FIXED})
        state["dataset"] = self.manifest.digest()
        if self._shared[2] and self._resize is not None:
            state["resized"] = self._resize[0]["resized"]  # the state it was re-split from
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields exactly the batches left in that epoch.

        With another ``world_size`` or ``num_workers`` than the state's, the samples the
        interrupted epoch had not yielded yet are re-split over this run's ranks and workers
        (:mod:`hpcdl.data.remainder`): each of them is read exactly once, every rank reads the
        same number of batches (some may be smaller than ``batch_size``). Later epochs follow
        the normal plan of this run."""
        mine = self.state_dict(0)
        changed = [
            f"{k} was {state.get(k)!r}, now {mine[k]!r}"
            for k in (*_FIXED, "dataset")
            if k not in _RESIZABLE and state.get(k) != mine[k]
        ]
        if changed:
            raise HpcdlError(
                "cannot resume the data position exactly: "
                + "; ".join(changed)
                + ". Keep these fixed, or restart the epoch with set_epoch(state['epoch'])"
            )
        resized = any(state.get(k) != mine[k] for k in _RESIZABLE)
        source = state if resized else state.get("resized")
        if source is None:
            if not 0 <= state["batches"] <= len(self):
                raise HpcdlError(f"state batches={state['batches']} is outside [0, {len(self)}]")
            self._resize = None
            self._shared[0], self._shared[1], self._shared[2] = state["epoch"], state["batches"], 0
        else:
            pool = remaining(self._layout(), source)
            plan_state = {k: mine[k] for k in _RESIZABLE} | {"resized": source}
            self._resize = ({**plan_state, "epoch": state["epoch"]}, pool)
            skip = 0 if resized else state["batches"]
            total = resplit_batches(len(pool), self.world_size, self.batch_size)
            if not 0 <= skip <= total:
                raise HpcdlError(f"state batches={skip} is outside [0, {total}]")
            self._shared[0], self._shared[1], self._shared[2] = state["epoch"], skip, 1
        self._resumed_epoch = state["epoch"]

    # --- planning ------------------------------------------------------------------------
    def _layout(self) -> SampleLayout:
        return SampleLayout(self._unit_sizes, self.manifest.chunk_samples, self.batch_size, self.seed,
                      self.shuffle, self.block_units, self.drop_last)  # fmt: skip

    def _slot_plan(self, epoch: int, slot: int) -> SlotPlan:
        """The slot's plan: its blocks of (unit, first, stop) rows, where blocks and batches
        start in the slot's stream; a re-split remainder in a resized epoch."""
        if self._shared[2] and self._resize is not None:
            state, pool = self._resize
            return slot_plan(self._layout(), {**state, "epoch": epoch}, slot, pool)
        return self._layout().normal(epoch, self.world_size, self.num_workers, slot)

    def _slot_and_skip(self) -> tuple[int, int, int]:
        """(epoch, slot, batches to skip in that slot) for this process."""
        epoch, skip = int(self._shared[0]), int(self._shared[1])
        info = get_worker_info()
        workers = 0 if info is None else info.num_workers
        if workers != self.num_workers:
            raise HpcdlError(
                f"ShardedDataset(num_workers={self.num_workers}) is iterated with {workers} "
                "DataLoader workers; pass the same number to both (ShardLoader does)"
            )
        if info is None:
            return epoch, self.rank, skip
        # DataLoader takes batches round-robin from workers starting at worker 0; after `skip`
        # batches the next one belongs to worker skip % W, so worker ids are rotated on resume.
        w = self.num_workers
        role = (info.id + skip) % w
        return epoch, self.rank * w + role, skip // w + (1 if role < skip % w else 0)

    def _source(self) -> SlotSource:
        """This process's batch buffers: its share of ShardLoader's shared ring in a worker
        forked with one, else private slots."""
        info = get_worker_info()
        if info is not None and self._ring is not None:
            per = self._ring_per_worker
            row = ReadStats(self._ring.stats[info.id])
            src = SlotSource(self._ring, info.id * per, (info.id + 1) * per, row, SAMPLE_IDS)
            src.reclaim()
            return src
        if self._local is None:
            count = in_flight(self.block_units * self.manifest.chunk_samples, self.batch_size)
            self._local = Slots(self.manifest, self.fields, self.batch_size, count)
        return SlotSource(self._local, 0, self._local.count, self.stats, SAMPLE_IDS)

    def __iter__(self) -> Iterator[Any]:
        """Batches ``{field: tensor}`` viewing recycled buffers (a worker forked by ShardLoader
        yields :class:`~hpcdl.data.slots.SlotRef` s instead, which ShardLoader turns into them)."""
        epoch, slot, skip = self._slot_and_skip()
        plan = self._slot_plan(epoch, slot)
        if skip >= plan.batches:
            return
        src = self._source()
        bounds = plan.bounds
        for k, dest, ids in self._reader.batches(plan, skip, src, src.stats, self.record_ids):
            yield src.deliver(dest, int(bounds[k + 1] - bounds[k]), ids)


class ShardLoader:
    """A DataLoader over a :class:`ShardedDataset` that counts batches, so its state is exact.

    ``state_dict()`` / ``load_state_dict()`` resume mid-epoch: the resumed iteration yields
    exactly the remaining batches of the interrupted epoch. Extra keyword arguments go to
    :class:`torch.utils.data.DataLoader` (e.g. ``persistent_workers``, ``pin_memory``).
    """

    def __init__(self, dataset: ShardedDataset, **loader_kwargs: Any):
        taken = {
            "batch_size",
            "shuffle",
            "sampler",
            "batch_sampler",
            "num_workers",
            "collate_fn",
            "in_order",
        }
        bad = sorted(taken & set(loader_kwargs))
        if bad:
            raise ConfigError("ShardLoader", ",".join(bad), "set by the dataset; do not pass them")
        self.dataset = dataset
        self.loader = DataLoader(
            dataset, batch_size=None, num_workers=dataset.num_workers, **loader_kwargs
        )
        self._consumed = 0
        self.stats = ReadStats()  # this process: handoff and loader stages
        self._ring: Slots | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._consumed = self.dataset.start_batch
        record = os.environ.get(RECORD_ENV) if self.dataset.record_ids else None
        ds = self.dataset
        ring = self._ring = shared_ring(ds, self.loader, self._ring)
        if ring is not None:  # the workers about to fork write into it
            ds._ring, ds._ring_per_worker = ring, ring.count // ds.num_workers
            # The chunk index, read here once per process: workers forked for every epoch
            # inherit it instead of each opening every shard's HDF5 index again at its start.
            ds._reader.chunk_offsets(set(range(len(ds.manifest.shards))))
        it = iter(self.loader)  # forks the workers (non-persistent, or the first time) now
        ds._ring = None  # so that workers another DataLoader forks from ds yield plain tensors
        loader_stage = STAGES.index("loader")
        while True:
            t0 = time.perf_counter()
            item = next(it, None)
            self.stats.add(loader_stage, time.perf_counter() - t0)
            if item is None:
                return
            if isinstance(item, SlotRef):
                assert ring is not None
                batch, ids = ring.handout(item.slot, item.n, self.stats), item.ids
            else:
                batch, ids = item, item.pop(SAMPLE_IDS, None)
            if record and ids is not None:
                self._record(Path(record), ids.tolist())
            self._consumed += 1
            yield batch

    def read_stats(self) -> dict[str, float]:
        """Seconds per stage so far (:data:`hpcdl.data.slots.STAGES`): the reading processes'
        (the workers' rows of the ring, or the dataset's) plus this process's handoff/loader."""
        rows = self._ring.stats.sum(axis=0) if self._ring is not None else self.dataset.stats.row
        return {s: float(a + b) for s, a, b in zip(STAGES, rows, self.stats.row, strict=True)}

    def _record(self, folder: Path, ids: list[int]) -> None:
        """Append the ids of a batch handed out to ``folder/DATASET-rankNNN.jsonl`` (a test
        hook; DATASET is the dataset folder's name, e.g. train or val)."""
        ds = self.dataset
        row = {"epoch": ds.epoch, "batch": self._consumed, "world_size": ds.world_size,
               "ids": ids}  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        append_jsonl(folder / f"{ds.path.name}-rank{ds.rank:03d}.jsonl", row)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; see :meth:`ShardedDataset.set_epoch`."""
        self.dataset.set_epoch(epoch)
        self._consumed = self.dataset.start_batch

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches handed out so far in this epoch."""
        return self.dataset.state_dict(self._consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``; see :meth:`ShardedDataset.load_state_dict`."""
        self.dataset.load_state_dict(state)
        self._consumed = int(state["batches"])
