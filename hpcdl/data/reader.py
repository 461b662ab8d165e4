"""ShardedDataset: a fast, deterministic, exactly resumable reader of hpcdl HDF5 shards.

Design, per epoch (all of it arithmetic on the manifest, identical on every rank):

* units are the (shard, chunk) pairs; a seeded permutation of them (``seed``, ``epoch``) is laid
  end to end as one stream of samples;
* the stream is cut into ``slots = world_size * max(1, num_workers)`` equal ranges of
  ``samples // slots`` samples; slot ``rank * W + worker`` reads its range, so every slot yields
  the same number of batches (the last ``samples % slots`` samples of the stream are dropped);
* a slot's units are grouped into blocks of ``block_units``; a block is read whole (uncompressed:
  ``os.preadv`` at the chunk byte offsets from ``threads`` threads, bypassing h5py's global lock;
  compressed: h5py), shuffled at the sample level (seeded by seed, epoch, slot, block) and cut
  into consecutive batches; the next block is read while the current one is consumed, and the
  one after it is announced to the kernel (``posix_fadvise(WILLNEED)``) for a deeper I/O queue
  (that reading lives in :mod:`hpcdl.data.blocks`).

Memory per reading process (the main one, or each DataLoader worker): two block buffers,
``2 * block_units * chunk_samples * sample_bytes`` (32 MiB with the defaults and 1 MiB chunks),
plus the batch being assembled and, with workers, the DataLoader's prefetch queue
(``prefetch_factor`` batches per worker). The page cache holds one more advised block.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hpcdl.data.blocks import BlockReader
from hpcdl.data.manifest import Manifest
from hpcdl.errors import ConfigError, HpcdlError

# What a resume state must match: the batch order is a function of these.
_FIXED = ("world_size", "num_workers", "batch_size", "seed", "shuffle", "block_units", "drop_last")


class ShardedDataset(IterableDataset):
    """Yields ready batches ``{field: tensor}`` of one rank; use ``DataLoader(batch_size=None)``.

    ``num_workers`` must equal the DataLoader's (0 = iterate in the main process); prefer
    :class:`ShardLoader`, which passes it and counts consumed batches for exact resume.
    ``len(ds)`` is the number of batches this rank gets per epoch, the same on every rank.
    """

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
        if drop_last:
            self.batches_per_slot = self.slot_samples // batch_size
        else:
            self.batches_per_slot = math.ceil(self.slot_samples / batch_size)
        # Epoch and resume position, shared with (persistent) DataLoader workers.
        self._shared = multiprocessing.RawArray("q", 2)
        self._resumed_epoch: int | None = None  # set_epoch(this) keeps a loaded position

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
        self._shared[0], self._shared[1] = epoch, 0

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""
        return int(self._shared[0])

    @property
    def start_batch(self) -> int:
        """Batches of that epoch the next iteration skips (set by :meth:`load_state_dict`)."""
        return int(self._shared[1])

    def state_dict(self, batches_consumed: int) -> dict[str, Any]:
        """Position after this rank consumed ``batches_consumed`` batches of the current epoch.

        Count from the start of the epoch (a resumed epoch counts its skipped batches too);
        :class:`ShardLoader` does this for you. Every rank is at the same position.
        """
        if not 0 <= batches_consumed <= len(self):
            raise HpcdlError(f"batches_consumed={batches_consumed} is outside [0, {len(self)}]")
        state: dict[str, Any] = {"epoch": self.epoch, "batches": batches_consumed}
        state.update({k: getattr(self, k) for k in _FIXED})
        state["dataset"] = self.manifest.digest()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields exactly the batches left in that epoch."""
        mine = self.state_dict(0)
        changed = [
            f"{k} was {state.get(k)!r}, now {mine[k]!r}"
            for k in (*_FIXED, "dataset")
            if state.get(k) != mine[k]
        ]
        if changed:
            raise HpcdlError(
                "cannot resume the data position exactly: "
                + "; ".join(changed)
                + ". Keep these fixed, or restart the epoch with set_epoch(state['epoch'])"
            )
        if not 0 <= state["batches"] <= len(self):
            raise HpcdlError(f"state batches={state['batches']} is outside [0, {len(self)}]")
        self._shared[0], self._shared[1] = state["epoch"], state["batches"]
        self._resumed_epoch = state["epoch"]

    # --- planning ------------------------------------------------------------------------
    def _slot_plan(self, epoch: int, slot: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The slot's blocks, arrays of (unit, first, stop) rows in stream order, and where each
        block starts in the slot's stream of samples (one extra entry: the end)."""
        n_units = len(self._unit_sizes)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n_units)
        else:
            order = np.arange(n_units)
        cum = np.concatenate([[0], np.cumsum(self._unit_sizes[order])])
        lo = slot * self.slot_samples
        hi = lo + (self.batches_per_slot * self.batch_size if self.drop_last else self.slot_samples)
        i0 = int(np.searchsorted(cum, lo, side="right")) - 1
        i1 = int(np.searchsorted(cum, hi, side="left"))
        units = order[i0:i1]
        first = np.maximum(lo - cum[i0:i1], 0)
        stop = np.minimum(hi - cum[i0:i1], self._unit_sizes[units])
        segs = np.stack([units, first, stop], axis=1)
        blocks = [segs[i : i + self.block_units] for i in range(0, len(segs), self.block_units)]
        starts = np.concatenate([[0], np.cumsum([int((b[:, 2] - b[:, 1]).sum()) for b in blocks])])
        return blocks, starts

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

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, slot, skip = self._slot_and_skip()
        if skip >= self.batches_per_slot:
            return
        plan, starts = self._slot_plan(epoch, slot)
        bs = self.batch_size
        used = int(starts[-1])
        first = int(np.searchsorted(starts, skip * bs, side="right")) - 1
        seed = [self.seed, epoch, slot] if self.shuffle else None
        blocks = self._reader.blocks(plan, starts, first, seed)
        try:
            blk = next(blocks)
            for k in range(skip, self.batches_per_slot):
                lo, hi = k * bs, min(k * bs + bs, used)
                parts = []
                while lo < hi:
                    while lo >= blk.start + blk.n:
                        blk = next(blocks)
                    top = min(hi, blk.start + blk.n)
                    parts.append(blk.take(lo - blk.start, top - blk.start))
                    lo = top
                batch = (
                    parts[0]
                    if len(parts) == 1
                    else {f: np.concatenate([p[f] for p in parts]) for f in self.fields}
                )
                yield {f: torch.from_numpy(a) for f, a in batch.items()}
        finally:
            blocks.close()


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

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._consumed = self.dataset.start_batch
        for batch in self.loader:
            self._consumed += 1
            yield batch

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
