"""Where every row of a slot's blocks goes (batch, row), computed a window of blocks at a time.

The reader used to plan each block on its own when it queued the block's reads: a permutation,
then a ``searchsorted`` of every position into the batch bounds, then the rows, a dozen numpy
calls on 5,000-sample arrays per block, in the main thread, holding the GIL the reading threads
need between their ``preadv`` calls (0.2-0.35 s of a 0.8-1.0 s warm epoch of 2 GiB). Here the
same tables are made for :data:`WINDOW` blocks at once: the per-block permutations (their seeds
fix the order, so they stay one generator per block), then one vectorized pass for the batch and
row of every sample of the window, a division when the batches are all full-size (the normal
plan) and one ``searchsorted`` otherwise. Queueing a block then only slices those tables.

The order is the one :func:`hpcdl.data.assemble.destinations` defines, block by block: position
``start + j`` of block ``bi`` holds its row ``perm[j]``, ``perm`` drawn from
``default_rng([*plan.seed, bi])``.
"""

from __future__ import annotations

import numpy as np

from hpcdl.data.remainder import SlotPlan

WINDOW = 16  # blocks planned together: ~1 ms per window on 2 GiB, small enough for a quick start


def block_perm(plan: SlotPlan, bi: int) -> np.ndarray | None:
    """The in-block shuffle of block ``bi``: position ``starts[bi] + j`` holds row ``perm[j]``."""
    if plan.seed is None:
        return None
    n = int(plan.starts[bi + 1] - plan.starts[bi])
    return np.random.default_rng([*plan.seed, bi]).permutation(n)


def positions(plan: SlotPlan, b0: int, b1: int) -> np.ndarray:
    """Stream position of every row of blocks ``b0..b1-1``, rows in read (file) order."""
    starts = plan.starts
    s0, s1 = int(starts[b0]), int(starts[b1])
    pos = np.arange(s0, s1, dtype=np.int64)
    if plan.seed is None:
        return pos
    for bi in range(b0, b1):
        a, b = int(starts[bi]) - s0, int(starts[bi + 1]) - s0
        perm = block_perm(plan, bi)
        assert perm is not None
        # row perm[j] of the block goes to position start + j: scatter, no inverse needed
        pos[a + perm] = np.arange(a + s0, b + s0, dtype=np.int64)
    return pos


def uniform_batch(bounds: np.ndarray) -> int:
    """The batch size when batch ``k`` is positions ``[k * size, (k + 1) * size)`` (the last
    one may be short), else 0: then a division finds each position's batch."""
    if len(bounds) < 2 or bounds[0] != 0:
        return 0
    size = int(bounds[1])
    steps = np.diff(bounds)
    if size <= 0 or (steps[:-1] != size).any() or not 0 < steps[-1] <= size:
        return 0
    return size


def batch_rows(
    pos: np.ndarray, bounds: np.ndarray, skip: int, size: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(batch, row) of each stream position; batch -1 for batches before ``skip`` (consumed
    before a resume). ``size``: :func:`uniform_batch` of ``bounds`` (0: search the bounds)."""
    if len(pos) and not (bounds[0] <= pos.min() and pos.max() < bounds[-1]):
        raise ValueError(f"positions [{pos.min()}, {pos.max()}] are outside the batches "
                         f"{bounds[[0, -1]]}")  # fmt: skip
    if size:
        batch, row = np.divmod(pos, size)
    else:
        batch = np.searchsorted(bounds, pos, side="right") - 1
        row = pos - bounds[batch]
    if skip:
        batch[batch < skip] = -1
    return batch, row


class Placement:
    """(batch, row) of the rows of a slot's blocks, computed :data:`WINDOW` blocks at a time as
    the reader asks for them in order (a resume starts the first window at its first block)."""

    def __init__(self, plan: SlotPlan, skip: int, window: int = WINDOW):
        self.plan, self.skip, self.window = plan, skip, window
        self.size = uniform_batch(plan.bounds)
        self.b0 = self.b1 = 0  # blocks of the current window
        self.batch = self.row = np.zeros(0, np.int64)

    def block(self, bi: int) -> tuple[np.ndarray, np.ndarray]:
        """(batch, row) of each row of block ``bi``, in read order (views of the window)."""
        if not self.b0 <= bi < self.b1:
            self.b0, self.b1 = bi, min(bi + self.window, len(self.plan.blocks))
            pos = positions(self.plan, self.b0, self.b1)
            self.batch, self.row = batch_rows(pos, self.plan.bounds, self.skip, self.size)
        s = self.plan.starts
        a, b = int(s[bi] - s[self.b0]), int(s[bi + 1] - s[self.b0])
        return self.batch[a:b], self.row[a:b]
