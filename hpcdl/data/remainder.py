"""The rest of an interrupted epoch, re-split over a different number of ranks or workers.

:class:`~hpcdl.data.reader.ShardedDataset` lays an epoch out as one stream of samples (a seeded
permutation of (shard, chunk) units) and cuts it into ``slots = ranks x max(1, workers)`` equal
ranges; a slot yields its range block by block, each block shuffled at the sample level. A resume
state says how many batches each rank consumed, so the stream positions consumed are known
exactly: for every slot, the first ``consumed x batch_size`` samples it yields (whole blocks,
then the first rows of the block permutation of the block it was in).

On a resume with another ``world_size`` or ``num_workers`` the *remainder* (the positions the
interrupted epoch would still have yielded, in stream order) is split again:

* rank ``i`` of ``W`` gets the ``i``-th of ``W`` near-equal contiguous shares of the remainder;
* every rank yields the same number of batches ``B = ceil(remaining / (W x batch_size))`` (the
  collectives of a training step need it): a share is cut into ``B`` near-equal batches, so a
  batch may hold fewer than ``batch_size`` samples but never more, and nothing is dropped;
* with DataLoader workers, batch ``j`` of a rank is read by worker ``j % workers`` (the order
  the DataLoader hands batches out in), a worker's batches read as blocks of at most
  ``block_units x chunk_samples`` samples, shuffled at the sample level when shuffling.

Everything here is arithmetic on the manifest's unit sizes and the resume state, identical on
every rank; it costs ``8 bytes x samples`` of memory once, at the resume. A state written during
a re-split epoch carries the state it was re-split from (``resized``), so resuming it again, on
the same or yet another world size, recomputes the same plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpcdl.errors import HpcdlError


@dataclass(frozen=True)
class SlotPlan:
    """What one slot (a rank, or one worker of a rank) reads in an epoch."""

    blocks: list[np.ndarray]  # (unit, first, stop) rows per block, in stream order
    starts: np.ndarray  # each block's first sample in the slot's stream, plus the end
    bounds: np.ndarray  # each batch's first sample in the slot's stream, plus the end
    seed: list[int] | None  # the block permutations' seed (None: no shuffle)

    @property
    def batches(self) -> int:
        return len(self.bounds) - 1


@dataclass(frozen=True)
class SampleLayout:
    """The arithmetic of one dataset's epochs: its unit sizes and the loader's settings."""

    unit_sizes: np.ndarray
    chunk_samples: int
    batch_size: int
    seed: int
    shuffle: bool
    block_units: int
    drop_last: bool

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of units: the stream is their samples end to end."""
        n = len(self.unit_sizes)
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(n)
        return np.arange(n)

    def cum(self, order: np.ndarray) -> np.ndarray:
        """Stream position of each unit of ``order`` (one extra entry: the end)."""
        return np.concatenate([[0], np.cumsum(self.unit_sizes[order])])

    # --- the normal plan -----------------------------------------------------------------
    def slot_span(self, world: int, workers: int) -> tuple[int, int, int]:
        """(slots, samples per slot, samples a slot yields) of the normal plan."""
        slots = world * max(1, workers)
        per = int(self.unit_sizes.sum()) // slots
        bs = self.batch_size
        return slots, per, (per // bs) * bs if self.drop_last else per

    def normal(self, epoch: int, world: int, workers: int, slot: int) -> SlotPlan:
        """Slot ``slot`` of the normal plan: the ``slot``-th equal range of the stream."""
        order = self.order(epoch)
        cum = self.cum(order)
        _, per, used = self.slot_span(world, workers)
        lo, hi = slot * per, slot * per + used
        i0 = int(np.searchsorted(cum, lo, side="right")) - 1
        i1 = int(np.searchsorted(cum, hi, side="left"))
        units = order[i0:i1]
        first = np.maximum(lo - cum[i0:i1], 0)
        stop = np.minimum(hi - cum[i0:i1], self.unit_sizes[units])
        segs = np.stack([units, first, stop], axis=1)
        blocks = [segs[i : i + self.block_units] for i in range(0, len(segs), self.block_units)]
        starts = np.concatenate([[0], np.cumsum([int((b[:, 2] - b[:, 1]).sum()) for b in blocks])])
        bounds = np.minimum(np.arange(0, used + self.batch_size, self.batch_size), used)
        bounds = np.unique(bounds)  # drop_last=False: a last, smaller batch
        seed = [self.seed, epoch, slot] if self.shuffle else None
        return SlotPlan(blocks, starts.astype(np.int64), bounds, seed)

    def covered(self, world: int, workers: int) -> np.ndarray:
        """The stream positions the normal plan yields in an epoch (sorted)."""
        slots, per, used = self.slot_span(world, workers)
        return (np.arange(slots)[:, None] * per + np.arange(used)[None, :]).reshape(-1)

    # --- a re-split remainder ------------------------------------------------------------
    def resplit(
        self, epoch: int, pool: np.ndarray, world: int, workers: int, slot: int, generation: int
    ) -> SlotPlan:
        """Slot ``slot`` of the plan that splits ``pool`` (sorted stream positions) over
        ``world`` ranks x ``workers``; ``generation`` (re-splits so far) varies the shuffle."""
        k = max(1, workers)
        rank, role = divmod(slot, k)
        per_rank = resplit_batches(len(pool), world, self.batch_size)
        share = np.array_split(pool, world)[rank]
        mine = np.array_split(share, per_rank)[role::k] if per_rank else []
        positions = np.concatenate([[], *mine]).astype(np.int64)
        bounds = np.concatenate([[0], np.cumsum([len(b) for b in mine])]).astype(np.int64)
        order = self.order(epoch)
        cum = self.cum(order)
        idx = np.searchsorted(cum, positions, side="right") - 1
        units, offs = order[idx], positions - cum[idx]
        # segments: runs of consecutive positions within one unit
        new = np.ones(len(positions), bool)
        new[1:] = (idx[1:] != idx[:-1]) | (positions[1:] != positions[:-1] + 1)
        heads = np.flatnonzero(new)
        ends = np.append(heads[1:], len(positions))
        segs = np.stack([units[heads], offs[heads], offs[heads] + (ends - heads)], axis=1)
        # blocks of at most block_units x chunk_samples samples: the reader's buffer size
        cap = self.block_units * self.chunk_samples
        blocks: list[np.ndarray] = []
        cur: list[np.ndarray] = []
        n = 0
        for seg in segs:
            size = int(seg[2] - seg[1])
            if cur and n + size > cap:
                blocks.append(np.stack(cur))
                cur, n = [], 0
            cur.append(seg)
            n += size
        if cur:
            blocks.append(np.stack(cur))
        starts = np.concatenate([[0], np.cumsum([int((b[:, 2] - b[:, 1]).sum()) for b in blocks])])
        seed = [self.seed, epoch, slot, 1000 + generation] if self.shuffle else None
        return SlotPlan(blocks, starts.astype(np.int64), bounds, seed)

    # --- what a slot yields ----------------------------------------------------------------
    def yielded(self, epoch: int, plan: SlotPlan, samples: int) -> np.ndarray:
        """Stream positions of the first ``samples`` samples ``plan`` yields, in yield order."""
        order = self.order(epoch)
        where = np.empty(len(order), np.int64)
        where[order] = self.cum(order)[:-1]  # unit -> its first stream position
        out = []
        for bi, block in enumerate(plan.blocks):
            if plan.starts[bi] >= samples:
                break
            pos = np.concatenate([where[u] + np.arange(a, b) for u, a, b in block])
            if plan.seed is not None:
                pos = pos[np.random.default_rng([*plan.seed, bi]).permutation(len(pos))]
            out.append(pos[: samples - plan.starts[bi]])
        return np.concatenate([np.empty(0, np.int64), *out])


def resplit_batches(remaining: int, world: int, batch_size: int) -> int:
    """Batches every rank yields when ``remaining`` samples are split over ``world`` ranks."""
    if remaining == 0:
        return 0
    per_rank = math.ceil(remaining / (world * batch_size))
    if remaining // world < per_rank:
        raise HpcdlError(
            f"{remaining} samples are left in the interrupted epoch: too few to give each of "
            f"{world} ranks {per_rank} batch(es); resume on fewer ranks"
        )
    return per_rank


def consumed_per_slot(batches: int, workers: int) -> list[int]:
    """Batches each worker of a rank yielded when the rank consumed ``batches``: the
    DataLoader takes them round-robin, starting at worker 0."""
    k = max(1, workers)
    return [batches // k + (1 if role < batches % k else 0) for role in range(k)]


def generation(state: dict[str, Any]) -> int:
    """How many re-splits the epoch of ``state`` went through."""
    n = 0
    while state.get("resized"):
        state, n = state["resized"], n + 1
    return n


def slot_plan(
    layout: SampleLayout, state: dict[str, Any], slot: int, pool: np.ndarray | None
) -> SlotPlan:
    """Slot ``slot`` of the epoch plan of ``state`` (``pool``: its re-split remainder)."""
    epoch, world, workers = state["epoch"], state["world_size"], state["num_workers"]
    if pool is None:
        return layout.normal(epoch, world, workers, slot)
    return layout.resplit(epoch, pool, world, workers, slot, generation(state))


def pool_of(layout: SampleLayout, state: dict[str, Any]) -> np.ndarray | None:
    """The remainder the epoch of ``state`` re-splits, or None for a normal epoch."""
    return remaining(layout, state["resized"]) if state.get("resized") else None


def remaining(layout: SampleLayout, state: dict[str, Any]) -> np.ndarray:
    """Sorted stream positions that the epoch of ``state`` had still to yield after every rank
    consumed ``state["batches"]`` batches."""
    pool = pool_of(layout, state)
    world, workers = state["world_size"], state["num_workers"]
    covered = pool if pool is not None else layout.covered(world, workers)
    consumed = []
    per_slot = consumed_per_slot(state["batches"], workers)
    for rank in range(world):
        for role, batches in enumerate(per_slot):
            plan = slot_plan(layout, state, rank * len(per_slot) + role, pool)
            if batches > plan.batches:
                raise HpcdlError(
                    f"resume state batches={state['batches']} is past the end of epoch "
                    f"{state['epoch']}"
                )
            consumed.append(layout.yielded(state["epoch"], plan, int(plan.bounds[batches])))
    done = np.concatenate([np.empty(0, np.int64), *consumed])
    left = np.setdiff1d(covered, done, assume_unique=True)
    if len(left) + len(done) != len(covered):  # each consumed sample must be covered, once
        raise HpcdlError(f"resume state of epoch {state['epoch']} is inconsistent")
    return left
