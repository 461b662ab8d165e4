"""Placement tables: the same (batch, row) per block row as the per-block plan, window by window."""

from __future__ import annotations

import numpy as np
import pytest

from hpcdl.data.assemble import addresses, destinations, iovecs
from hpcdl.data.placement import Placement, batch_rows, block_perm, positions, uniform_batch
from hpcdl.data.remainder import SampleLayout, SlotPlan


def _plan(sizes: list[int], seed: list[int] | None, bounds: list[int]) -> SlotPlan:
    """A plan of one-segment blocks of ``sizes`` samples."""
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    blocks = [np.array([[i, 0, n]]) for i, n in enumerate(sizes)]
    return SlotPlan(blocks, starts, np.asarray(bounds, np.int64), seed)


@pytest.mark.parametrize(
    ("bounds", "size"),
    [
        ([0, 4, 8, 12], 4),  # drop_last: all full
        ([0, 4, 8, 10], 4),  # a short last batch
        ([0, 4], 4),  # one batch
        ([0, 3, 6, 10], 0),  # the last one longer: not uniform
        ([0, 3, 7, 10], 0),  # a re-split remainder's uneven batches
        ([2, 6, 10], 0),  # not from 0
        ([0], 0),  # no batch
    ],
)
def test_uniform_batch(bounds: list[int], size: int) -> None:
    assert uniform_batch(np.asarray(bounds)) == size


@pytest.mark.parametrize(
    ("pos", "bounds", "skip", "size", "batch", "row"),
    [
        ([0, 5, 3, 9], [0, 4, 8, 10], 0, 4, [0, 1, 0, 2], [0, 1, 3, 1]),
        ([0, 5, 3, 9], [0, 4, 8, 10], 0, 0, [0, 1, 0, 2], [0, 1, 3, 1]),  # searched: the same
        ([0, 5, 3, 9], [0, 4, 8, 10], 2, 4, [-1, -1, -1, 2], [0, 1, 3, 1]),  # resumed at 2
        ([0, 5, 3, 9], [0, 3, 7, 10], 1, 0, [-1, 1, 1, 2], [0, 2, 0, 2]),  # uneven batches
    ],
)
def test_batch_rows(pos, bounds, skip, size, batch, row) -> None:
    b, r = batch_rows(np.asarray(pos), np.asarray(bounds), skip, size)
    assert b.tolist() == batch and r.tolist() == row


def test_batch_rows_rejects_positions_outside_the_batches() -> None:
    with pytest.raises(ValueError, match="outside"):
        batch_rows(np.array([3, 12]), np.array([0, 4, 8]), 0, 4)


def test_positions_scatter_each_block_by_its_own_permutation() -> None:
    plan = _plan([3, 4], [7, 0, 1], [0, 7])
    p0, p1 = block_perm(plan, 0), block_perm(plan, 1)
    assert p0 is not None and p1 is not None
    pos = positions(plan, 0, 2)
    # position start + j holds block row perm[j]: read row perm[j] goes to start + j
    assert pos[p0].tolist() == [0, 1, 2] and pos[3 + p1].tolist() == [3, 4, 5, 6]
    assert positions(plan, 1, 2).tolist() == pos[3:].tolist()  # a window from any block
    assert positions(_plan([3, 4], None, [0, 7]), 0, 2).tolist() == list(range(7))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("skip", [0, 3])
@pytest.mark.parametrize("window", [1, 3, 16])
def test_placement_equals_the_per_block_plan(seed, shuffle, drop_last, skip, window) -> None:
    """Window after window, every block's (batch, row) equals the per-block destinations()
    the reader used before: the order is unchanged (the reader's order tests check it end to
    end)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 40, 60)
    layout = SampleLayout(sizes, 40, 23, seed, shuffle, 4, drop_last)
    for slot in range(3):
        plan = layout.normal(seed, 3, 0, slot)
        first = int(np.searchsorted(plan.starts, plan.bounds[skip], side="right")) - 1
        placed = Placement(plan, skip, window)
        for bi in range(first, len(plan.blocks)):
            s0, s1 = int(plan.starts[bi]), int(plan.starts[bi + 1])
            want = destinations(s0, s1 - s0, block_perm(plan, bi), plan.bounds, skip)
            got = placed.block(bi)
            assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()


def test_placement_of_a_resplit_remainder() -> None:
    """Uneven batches (a re-split remainder) go through the search, with the same result."""
    layout = SampleLayout(np.full(30, 10), 10, 16, 4, True, 3, True)
    pool = np.setdiff1d(np.arange(300), np.arange(0, 300, 7))
    plan = layout.resplit(0, pool, 2, 1, 1, 1)
    assert uniform_batch(plan.bounds) == 0
    placed = Placement(plan, 0, 2)
    for bi in range(len(plan.blocks)):
        s0, s1 = int(plan.starts[bi]), int(plan.starts[bi + 1])
        want = destinations(s0, s1 - s0, block_perm(plan, bi), plan.bounds, 0)
        assert [a.tolist() for a in placed.block(bi)] == [a.tolist() for a in want]


def test_unmerged_iovecs_one_per_row() -> None:
    addr = np.array([1000, 1010, 5000])
    iov, seg = iovecs(addr, 10, np.array([0, 2, 3]), merge=False)
    assert iov.tolist() == [[1000, 10], [1010, 10], [5000, 10]] and seg.tolist() == [0, 2, 3]
    assert iov.dtype == np.uint64 and iov.flags.c_contiguous


def test_addresses_without_dropped_rows() -> None:
    addr = addresses(np.array([1, 2, 1]), np.array([0, 3, 2]), np.array([1000, 5000]), 1, 10, 9)
    assert addr.tolist() == [1000, 5030, 1020]
