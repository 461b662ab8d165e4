"""Batch slots: tensors over a slot without a copy, reused only once nothing holds them."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from hpcdl.data.manifest import FieldSpec, Manifest, ShardInfo
from hpcdl.data.slots import (
    FILLING,
    FREE,
    HANDED,
    ReadStats,
    SlotRef,
    Slots,
    SlotSource,
    in_flight,
    slot_layout,
)


def _manifest() -> Manifest:
    return Manifest(
        fields={
            "x": FieldSpec(dtype="uint8", shape=(3, 5)),
            "y": FieldSpec(dtype="int64", shape=()),
        },
        samples=40,
        chunk_samples=10,
        shards=[ShardInfo(file="shard-00000.h5", samples=40, bytes=1000, sha256="0" * 64)],
    )


def test_layout_aligns_every_field() -> None:
    lay = slot_layout(_manifest(), ["x", "y"], 7)
    assert lay == {"x": 0, "y": 128, "_bytes": 192}  # 105 B of x rounded up to 64 B, 56 B of y


@pytest.mark.parametrize("shared", [False, True])
def test_handout_views_the_slot_and_frees_it_when_the_batch_dies(shared: bool) -> None:
    s = Slots(_manifest(), ["x", "y"], 4, 2, shared=shared)
    d = s.acquire()
    assert d is not None and d.slot == 0 and s.state.tolist() == [FILLING, FREE]
    d.arrays["x"][:] = np.arange(60, dtype=np.uint8).reshape(4, 3, 5)
    d.arrays["y"][:] = [7, 8, 9, 10]
    stats = ReadStats()
    batch = s.handout(0, 3, stats)
    assert batch["x"].shape == (3, 3, 5) and batch["x"].dtype == torch.uint8
    assert batch["y"].tolist() == [7, 8, 9] and batch["x"][2, 2, 4] == 44
    assert s.state[0] == HANDED and stats.as_dict()["handoff"] > 0
    d.arrays["y"][0] = 70  # no copy: the tensor views the slot
    assert batch["y"][0] == 70
    y = batch["y"][1:]  # a view of one field keeps the whole batch's slot
    del batch
    assert s.state[0] == HANDED
    z = y.numpy()  # so does a numpy view of that view
    del y
    assert s.state[0] == HANDED and z.tolist() == [8, 9]
    del z
    assert s.state[0] == FREE


def test_acquire_within_a_share_and_one_off_when_full() -> None:
    s = Slots(_manifest(), ["x", "y"], 4, 4, shared=True, stats_rows=2)
    src = SlotSource(s, 2, 4, ReadStats(s.stats[1]), "_ids")
    assert [src.acquire().slot for _ in range(3)] == [2, 3, -1]  # nothing free: a fresh buffer
    assert s.state.tolist() == [FREE, FREE, FILLING, FILLING]
    src.release(s.one_off())  # a one-off buffer is no slot: nothing to free
    assert s.state.tolist() == [FREE, FREE, FILLING, FILLING]
    src.reclaim()  # a new iteration: the share's FILLING slots were dropped by the reset
    assert s.state.tolist() == [FREE] * 4


def test_shared_slots_cross_the_queue_as_a_small_reference() -> None:
    s = Slots(_manifest(), ["x", "y"], 4, 2, shared=True)
    src = SlotSource(s, 0, 2, ReadStats(s.stats[0]), "_ids")
    d = src.acquire()
    d.arrays["y"][:2] = [5, 6]
    ref = src.deliver(d, 2, np.array([11, 12]))
    assert isinstance(ref, SlotRef) and (ref.slot, ref.n) == (0, 2)
    assert len(pickle.dumps(ref)) < 400  # not the batch: the DataLoader's queue carries only this
    assert s.handout(ref.slot, ref.n)["y"].tolist() == [5, 6]


def test_private_slots_deliver_tensors_with_ids() -> None:
    s = Slots(_manifest(), ["y"], 4, 1)
    src = SlotSource(s, 0, 1, ReadStats(), "_ids")
    d = src.acquire()
    d.arrays["y"][:] = [1, 2, 3, 4]
    out = src.deliver(d, 4, np.array([9, 8, 7, 6]))
    assert out["y"].tolist() == [1, 2, 3, 4] and out["_ids"].tolist() == [9, 8, 7, 6]
    one = src.deliver(s.one_off(), 2, None)  # a one-off buffer: tensors over it, no slot
    assert set(one) == {"y"} and len(one["y"]) == 2


def test_in_flight_covers_three_blocks_of_batches() -> None:
    assert in_flight(5440, 1024) == 16 + 4
    assert in_flight(63, 12) == 16 + 4
    assert in_flight(100, 1000) == 1 + 4
