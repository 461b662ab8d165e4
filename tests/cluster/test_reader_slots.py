"""The reader's batch slots with real DataLoader workers: batches cross over shared memory
uncopied, held batches are never overwritten, an abandoned epoch frees its slots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hpcdl.data import ShardedDataset, ShardLoader, write_shards
from hpcdl.data.slots import FREE, HANDED
from hpcdl.data.sources import ArraySource

N = 1500


@pytest.fixture(scope="module")
def ds_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1500 samples, 25 per chunk (an id and 40 bytes that follow from it)."""
    out = tmp_path_factory.mktemp("slots")
    i = np.arange(N, dtype=np.int64)
    x = (i[:, None] * 7 + np.arange(40)).astype(np.uint8)
    write_shards(ArraySource({"i": i, "x": x}), out, chunk_size=25 * 48, shard_size=10 * 25 * 48)
    return out / "train"


def _check(batch: dict[str, torch.Tensor]) -> None:
    """x still belongs to i: nothing overwrote the batch."""
    want = (batch["i"][:, None] * 7 + torch.arange(40)).to(torch.uint8)
    assert torch.equal(batch["x"], want)


def _inside(t: torch.Tensor, ring: np.ndarray) -> bool:
    lo = ring.ctypes.data
    return lo <= t.data_ptr() < lo + ring.nbytes


def test_worker_batches_are_views_of_the_shared_ring(ds_path: Path) -> None:
    ds = ShardedDataset(ds_path, 16, num_workers=2, block_units=2, seed=3)
    ld = ShardLoader(ds)
    held = list(ld)  # holds every batch: more than the ring has, so some are one-offs
    ring = ld._ring
    assert ring is not None and len(held) == len(ds)
    inside = [_inside(b["x"], ring.data) for b in held]
    assert any(inside) and not all(inside)  # the ring while it had room, then the old path
    assert (ring.state == HANDED).sum() == sum(inside)
    for b in held:  # no slot was reused while its batch was held
        _check(b)
    got = np.sort(torch.cat([b["i"] for b in held]).numpy())
    assert len(np.unique(got)) == len(got) == len(ds) * 16
    stats = ld.read_stats()
    assert stats["handoff"] > 0 and stats["read"] > 0 and stats["loader"] > 0
    del held, b
    assert (ring.state == FREE).all()  # every slot came back once its batch was gone


def test_dropped_batches_recycle_slots(ds_path: Path) -> None:
    """The usual loop drops each batch: the ring is enough, every batch is a view of it."""
    ds = ShardedDataset(ds_path, 16, num_workers=2, block_units=2)
    ld = ShardLoader(ds)
    order = []
    for b in ld:
        assert _inside(b["x"], ld._ring.data)
        _check(b)
        order.append(b["i"].clone())
    fresh = ShardedDataset(ds_path, 16, num_workers=2, block_units=2)
    want = torch.cat([b["i"] for b in ShardLoader(fresh, pin_memory=False, persistent_workers=False)])  # fmt: skip
    assert torch.equal(torch.cat(order), want)


def test_persistent_workers_after_an_abandoned_epoch(ds_path: Path) -> None:
    """Breaking out of an epoch leaves batches in the DataLoader's queue that never reach the
    loop; the next epoch's workers take their slots back and read the right batches."""

    def mk() -> ShardedDataset:
        return ShardedDataset(ds_path, 16, num_workers=2, block_units=2)

    ld = ShardLoader(mk(), persistent_workers=True)
    for epoch in range(3):
        ld.set_epoch(epoch)
        for k, b in enumerate(ld):
            _check(b)
            if k == 5:
                break
    ld.set_epoch(3)
    got = [b["i"].clone() for b in ld]
    fresh = mk()
    fresh.set_epoch(3)
    assert torch.equal(torch.cat(got), torch.cat([b["i"] for b in ShardLoader(fresh)]))


def test_zero_workers_hold_every_batch(ds_path: Path) -> None:
    """Without workers, slots are private; a loop that keeps every batch still gets them right."""
    ds = ShardedDataset(ds_path, 16, block_units=2)
    held = list(ShardLoader(ds))
    for b in held:
        _check(b)
    assert ds._local is not None and (ds._local.state == HANDED).sum() == ds._local.count
