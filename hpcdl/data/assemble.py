"""Where each sample of a block goes, and reading it straight there (one copy, no gather).

A block of ``n`` samples (its segments' rows end to end, in file order) covers the slot's stream
positions ``[start, start + n)``; after the in-block shuffle, position ``start + j`` holds block
row ``perm[j]``, and batch ``k`` holds positions ``[bounds[k], bounds[k + 1])``. So block row
``r`` belongs at row ``start + inv(perm)[r] - bounds[k]`` of batch ``k``. Reading the block
with one ``preadv`` per (segment, field) whose I/O vectors point at those rows puts every sample
in its final place with the kernel's copy alone: no block buffer, no gather, no concatenation of
batches that straddle two blocks. Runs of rows that land next to each other (no shuffle) merge
into one vector.
"""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

_libc = ctypes.CDLL(None, use_errno=True)
_preadv = _libc.preadv  # called through ctypes, which releases the GIL during the call
_preadv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64)
_preadv.restype = ctypes.c_ssize_t


def destinations(
    start: int, n: int, perm: np.ndarray | None, bounds: np.ndarray, skip: int
) -> tuple[np.ndarray, np.ndarray]:
    """(batch, row) of each of a block's ``n`` rows in read order; batch -1 for rows of
    batches before ``skip`` (consumed before a resume: read, since they share chunks with the
    rest, but dropped)."""
    if perm is None:
        pos = np.arange(start, start + n, dtype=np.int64)
    else:
        pos = np.empty(n, np.int64)
        pos[perm] = np.arange(start, start + n, dtype=np.int64)
    if n and not (bounds[0] <= pos.min() and pos.max() < bounds[-1]):
        raise ValueError(f"block [{start}, {start + n}) is outside the batches {bounds[[0, -1]]}")
    batch = np.searchsorted(bounds, pos, side="right") - 1
    row = pos - bounds[batch]
    batch[batch < skip] = -1
    return batch, row


def iovecs(
    addr: np.ndarray, item: int, seg_rows: np.ndarray, merge: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """I/O vectors ``(m, 2)`` [address, length] that put row ``i`` of the block at ``addr[i]``
    (``item`` bytes each), merging rows whose destinations follow each other unless ``merge``
    is False (then one vector per row, a cheaper plan for shuffled rows); a vector never
    spans two segments (``seg_rows``: each segment's first row, plus the end). Returns the
    vectors and each segment's first vector (plus the end)."""
    n = len(addr)
    if merge is False:  # a shuffled block: hardly two rows land side by side, one vector each
        iov = np.empty((n, 2), np.uint64)
        iov[:, 0], iov[:, 1] = addr, item
        return iov, seg_rows
    new = np.ones(n, bool)
    if n > 1:
        new[1:] = addr[1:] != addr[:-1] + item
    new[seg_rows[:-1][seg_rows[:-1] < n]] = True
    heads = np.flatnonzero(new)
    lengths = np.diff(np.append(heads, n)) * item
    iov = np.stack([addr[heads].astype(np.uint64), lengths.astype(np.uint64)], axis=1)
    return np.ascontiguousarray(iov), np.searchsorted(heads, seg_rows)


def addresses(
    batch: np.ndarray, row: np.ndarray, bases: np.ndarray, first: int, item: int, scratch: int
) -> np.ndarray:
    """Destination address of each block row: ``bases[batch - first] + row * item``, or
    ``scratch`` (one item of throw-away memory) for rows of dropped batches (batch -1)."""
    keep = batch >= 0
    if keep.all():  # the usual case (no resume inside this block): one gather and add
        return bases[batch - first] + row * item
    addr = np.full(len(batch), scratch, np.int64)
    addr[keep] = bases[batch[keep] - first] + row[keep] * item
    return addr


def preadv_all(fd: int, iov: np.ndarray, offset: int, total: int | None = None) -> int:
    """Fill ``iov`` (an ``(m, 2)`` uint64 array, modified) from ``fd`` at ``offset``: as many
    ``preadv`` calls as IOV_MAX, short reads and EINTR need. ``total`` (the vectors' bytes, if
    known) spares a sum on the usual path. Returns the bytes read (less than asked only at the
    end of the file)."""
    done, i, m = 0, 0, len(iov)
    while i < m:
        j = min(m, i + IOV_MAX)
        got = _preadv(fd, iov.ctypes.data + 16 * i, j - i, offset + done)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise OSError(err, os.strerror(err))
        if got == 0:
            return done
        done += got
        if j == m and total is not None and done == total:
            return done  # the usual case: one call read everything
        cum = np.cumsum(iov[i:j, 1].astype(np.int64))
        full = int(np.searchsorted(cum, got, side="right"))
        part = got - (int(cum[full - 1]) if full else 0)
        i += full
        if part:  # a vector read in part: resume inside it
            iov[i, 0] += np.uint64(part)
            iov[i, 1] -= np.uint64(part)
    return done
