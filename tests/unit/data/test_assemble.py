"""Batch assembly: where each block row goes, the I/O vectors that put it there, preadv_all."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hpcdl.data import assemble
from hpcdl.data.assemble import addresses, destinations, iovecs, preadv_all


@pytest.mark.parametrize(
    ("start", "n", "perm", "bounds", "skip", "batch", "row"),
    [
        # no shuffle: rows in order; the block straddles batches 0 and 1
        (2, 4, None, [0, 3, 6], 0, [0, 1, 1, 1], [2, 0, 1, 2]),
        # shuffled: position start+j holds row perm[j], so row perm[j] goes to position start+j
        (0, 4, [2, 0, 3, 1], [0, 2, 4], 0, [0, 1, 0, 1], [1, 1, 0, 0]),
        # resumed after one batch: rows of batch 0 are dropped (-1)
        (0, 4, [2, 0, 3, 1], [0, 2, 4], 1, [-1, 1, -1, 1], [1, 1, 0, 0]),
        # a short last batch (drop_last=False)
        (4, 3, [1, 2, 0], [0, 4, 6, 7], 0, [2, 1, 1], [0, 0, 1]),
    ],
)
def test_destinations(start, n, perm, bounds, skip, batch, row) -> None:
    p = None if perm is None else np.asarray(perm)
    b, r = destinations(start, n, p, np.asarray(bounds), skip)
    assert b.tolist() == batch and r.tolist() == row


def test_destinations_match_the_old_gather() -> None:
    """Reading row r to (batch, row) gives the same batches as take(block, perm) cut at bounds."""
    rng = np.random.default_rng(3)
    start, n = 37, 200
    bounds = np.array([30, 64, 128, 192, 237, 256])
    perm = rng.permutation(n)
    block = rng.integers(0, 1000, n)
    batch, row = destinations(start, n, perm, bounds, 1)
    shuffled = block[perm]  # position start+j holds shuffled[j]
    for k in range(1, 5):
        got = np.full(bounds[k + 1] - bounds[k], -1)
        got[row[batch == k]] = block[batch == k]
        lo, hi = max(bounds[k], start), min(bounds[k + 1], start + n)
        want = shuffled[lo - start : hi - start]
        assert np.array_equal(got[lo - bounds[k] : hi - bounds[k]], want)


def test_destinations_reject_a_block_outside_the_batches() -> None:
    with pytest.raises(ValueError, match="outside"):
        destinations(5, 4, None, np.array([0, 4, 8]), 0)


def test_addresses_and_merged_iovecs() -> None:
    batch = np.array([0, 0, 1, -1, 1])
    row = np.array([0, 1, 0, 5, 1])
    addr = addresses(batch, row, np.array([1000, 5000]), 0, 10, scratch=9)
    assert addr.tolist() == [1000, 1010, 5000, 9, 5010]
    # one segment of 5 rows: [1000..1020) merges, then 5000, scratch, 5010 stay apart
    iov, seg = iovecs(addr, 10, np.array([0, 5]))
    assert iov.tolist() == [[1000, 20], [5000, 10], [9, 10], [5010, 10]]
    assert seg.tolist() == [0, 4]
    # two segments: a vector never spans the segment boundary at row 1
    iov, seg = iovecs(addr, 10, np.array([0, 1, 5]))
    assert iov[:2].tolist() == [[1000, 10], [1010, 10]] and seg.tolist() == [0, 1, 5]


def test_iovecs_of_an_unshuffled_block_are_one_per_segment() -> None:
    addr = 4096 + np.arange(300) * 8
    iov, seg = iovecs(addr, 8, np.array([0, 100, 300]))
    assert iov.tolist() == [[4096, 800], [4896, 1600]] and seg.tolist() == [0, 1, 2]


def _scatter(buf: np.ndarray, item: int, order: np.ndarray) -> np.ndarray:
    """Vectors putting item i of the file at slot order[i] of ``buf``."""
    addr = buf.ctypes.data + order.astype(np.int64) * item
    return iovecs(addr, item, np.array([0, len(order)]))[0]


def test_preadv_all_scatters_beyond_iov_max(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(assemble, "IOV_MAX", 7)  # many calls, each at the right file offset
    item, n = 3, 50
    data = np.arange(n * item, dtype=np.uint8)
    (tmp_path / "f").write_bytes(b"xy" + data.tobytes())
    order = np.random.default_rng(0).permutation(n)
    out = np.zeros(n * item, np.uint8)
    fd = os.open(tmp_path / "f", 0)
    try:
        assert preadv_all(fd, _scatter(out, item, order), 2) == n * item
    finally:
        os.close(fd)
    want = np.empty_like(out).reshape(n, item)
    want[order] = data.reshape(n, item)
    assert np.array_equal(out.reshape(n, item), want)


def test_preadv_all_resumes_a_short_read(tmp_path: Path, monkeypatch) -> None:
    """A call that returns part of what was asked (allowed by POSIX) continues mid-vector."""
    (tmp_path / "f").write_bytes(bytes(range(40)))
    real = assemble._preadv
    calls = []

    def stingy(fd, iov, cnt, off):  # at most 7 bytes per call
        vec = np.ctypeslib.as_array((assemble.ctypes.c_uint64 * 2).from_address(iov))
        saved = int(vec[1])
        vec[1] = min(saved, 7)
        got = real(fd, iov, 1, off)
        vec[1] = saved
        calls.append(got)
        return got

    monkeypatch.setattr(assemble, "_preadv", stingy)
    out = np.zeros(40, np.uint8)
    iov = np.array([[out.ctypes.data, 25], [out.ctypes.data + 25, 15]], np.uint64)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert preadv_all(fd, iov, 0) == 40
    finally:
        os.close(fd)
    assert out.tolist() == list(range(40)) and len(calls) > 5


def test_preadv_all_stops_at_the_end_of_the_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abcde")
    out = np.zeros(8, np.uint8)
    iov = np.array([[out.ctypes.data, 8]], np.uint64)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert preadv_all(fd, iov, 0) == 5
    finally:
        os.close(fd)
