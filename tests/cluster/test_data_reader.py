"""ShardedDataset: exact split, every sample once, determinism, exact mid-epoch resume."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hpcdl.data import Manifest, ShardedDataset, ShardLoader, write_shards
from hpcdl.data.sources import ArraySource
from hpcdl.errors import HpcdlError

N = 2003  # not a multiple of anything: partial chunks, shards and batches


@pytest.fixture(scope="module")
def ds_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2003 samples, 21 per chunk, 5 chunks per shard: 96 units over 20 shards."""
    out = tmp_path_factory.mktemp("reader")
    idx = np.arange(N, dtype=np.int64)
    x = (idx[:, None, None] * np.arange(1, 13).reshape(3, 4)).astype(np.float32)
    write_shards(ArraySource({"i": idx, "x": x}), out, chunk_size=21 * 56, shard_size=5 * 21 * 56)
    return out / "train"


def run(ds: ShardedDataset, **kw) -> list[dict[str, torch.Tensor]]:
    return list(ShardLoader(ds, **kw))


def cat(batches: list[dict[str, torch.Tensor]], f: str = "i") -> np.ndarray:
    return torch.cat([b[f] for b in batches]).numpy() if batches else np.zeros(0, np.int64)


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 0), (1, 2), (2, 2), (3, 1)])
def test_every_sample_once_and_equal_batches(ds_path: Path, world: int, workers: int) -> None:
    seen, counts = [], []
    for rank in range(world):
        ds = ShardedDataset(ds_path, 16, rank=rank, world_size=world, num_workers=workers, block_units=3, drop_last=False)  # fmt: skip
        batches = run(ds)
        counts.append(len(batches))
        assert len(batches) == len(ds)
        tail = max(1, workers)  # the last batch of every slot may be short
        assert {len(b["i"]) for b in batches[:-tail]} == {16}
        assert {len(b["i"]) for b in batches[-tail:]} == {N // world // tail % 16}
        seen.append(cat(batches))
        for b in batches:  # x travels with its index
            assert torch.equal(
                b["x"], b["i"][:, None, None].float() * torch.arange(1, 13).reshape(3, 4)
            )
    assert len(set(counts)) == 1  # every rank the same number of batches
    allseen = np.concatenate(seen)
    slots = world * max(1, workers)
    assert len(allseen) == len(set(allseen.tolist())) == N - N % slots  # each at most once
    assert ds.dropped_per_epoch == N % slots


def test_drop_last_counts(ds_path: Path) -> None:
    ds = ShardedDataset(ds_path, 64, world_size=2, rank=1, num_workers=0)
    got = cat(list(ds))
    assert len(got) == len(ds) * 64 == (N // 2 // 64) * 64
    assert ds.dropped_per_epoch == N - 2 * len(got)
    assert len(np.unique(got)) == len(got)


def test_deterministic_and_shuffled(ds_path: Path) -> None:
    def order(epoch: int, seed: int = 0, shuffle: bool = True) -> np.ndarray:
        ds = ShardedDataset(ds_path, 10, seed=seed, shuffle=shuffle, block_units=4, drop_last=False)
        ds.set_epoch(epoch)
        return cat(list(ds))

    a = order(0)
    assert np.array_equal(a, order(0))  # same seed and epoch: same batches
    assert not np.array_equal(a, order(1)) and not np.array_equal(a, order(0, seed=1))
    assert np.array_equal(np.sort(a), np.arange(N)) and np.array_equal(
        np.sort(order(1)), np.arange(N)
    )
    m = Manifest.load(ds_path)
    in_files = np.concatenate([h5py.File(ds_path / s.file)["i"][:] for s in m.shards])
    assert np.array_equal(order(0, shuffle=False), in_files)
    # within a batch, samples come from several chunks (block shuffle), not one run
    chunk_of = np.empty(N, np.int64)
    chunk_of[in_files] = np.arange(N) // 21
    assert np.mean([len(np.unique(chunk_of[b])) for b in a[:2000].reshape(-1, 10)]) > 3


def resume_case(ds_path: Path, world: int, workers: int, stops: list[int], **kw) -> None:
    """Interrupt after k batches, resume in a fresh dataset: the rest equals the full run."""

    def mk(r: int) -> ShardedDataset:
        return ShardedDataset(ds_path, 12, rank=r, world_size=world, num_workers=workers, block_units=3, seed=7, **kw)  # fmt: skip

    for rank in range(world):
        ds = mk(rank)
        ds.set_epoch(2)
        full = run(ds)
        assert len(full) == len(ds)
        for k in stops:
            first = ShardLoader(mk(rank))
            first.set_epoch(2)
            head = []
            for b in first:
                head.append(b)
                if len(head) == k:
                    break
            state = first.state_dict()
            assert state["batches"] == k and state["epoch"] == 2
            second = ShardLoader(mk(rank))
            second.load_state_dict(state)
            tail = list(second)
            assert len(tail) == len(full) - k
            for f in ("i", "x"):
                assert np.array_equal(cat(head + tail, f), cat(full, f))  # bit for bit
            assert second.state_dict()["batches"] == len(full)


def test_resume_one_rank_no_workers(ds_path: Path) -> None:
    resume_case(ds_path, 1, 0, [1, 7, 13, 100, 166])


def test_resume_two_ranks_two_workers(ds_path: Path) -> None:
    resume_case(ds_path, 2, 2, [1, 2, 5, 40, 82])


def test_resume_without_drop_last(ds_path: Path) -> None:
    resume_case(ds_path, 1, 2, [3, 83], drop_last=False)


def test_resume_twice_and_next_epoch(ds_path: Path) -> None:
    ds = ShardedDataset(ds_path, 12, num_workers=0)
    full = run(ds)
    ld = ShardLoader(ds)
    ld.load_state_dict({**ds.state_dict(0), "batches": 50})
    it = iter(ld)
    part = [next(it) for _ in range(20)]
    state = ld.state_dict()
    assert state["batches"] == 70
    ld2 = ShardLoader(ShardedDataset(ds_path, 12))
    ld2.load_state_dict(state)
    epochs = []
    for epoch in range(state["epoch"], 2):  # the usual loop: set_epoch keeps the loaded position
        ld2.set_epoch(epoch)
        epochs.append(list(ld2))
    assert np.array_equal(cat(part + epochs[0]), cat(full[50:]))
    assert len(epochs[1]) == len(ds) and ld2.state_dict() == {
        **state,
        "epoch": 1,
        "batches": len(ds),
    }


def test_persistent_workers_follow_set_epoch(ds_path: Path) -> None:
    def mk() -> ShardedDataset:
        return ShardedDataset(ds_path, 12, num_workers=2, block_units=2)

    ld = ShardLoader(mk(), persistent_workers=True)
    epochs = []
    for e in range(3):
        ld.set_epoch(e)
        epochs.append(cat(list(ld)))
    fresh = mk()
    fresh.set_epoch(2)
    assert np.array_equal(epochs[2], cat(run(fresh)))
    assert not np.array_equal(epochs[0], epochs[1])


def test_state_mismatch_is_a_clear_error(ds_path: Path) -> None:
    state = ShardedDataset(ds_path, 12, world_size=2, num_workers=2).state_dict(5)
    # world_size / num_workers may change (tests/cluster/test_resize.py); the batch order's other inputs
    with pytest.raises(HpcdlError, match="batch_size was 12, now 10; seed was 0, now 1"):
        ShardedDataset(ds_path, 10, seed=1).load_state_dict(state)
    with pytest.raises(HpcdlError, match="outside"):
        ShardedDataset(ds_path, 12, world_size=2, num_workers=2).load_state_dict(
            {**state, "batches": 10**6}
        )


def test_workers_must_match_the_dataloader(ds_path: Path) -> None:
    ds = ShardedDataset(ds_path, 12)
    with pytest.raises(HpcdlError, match=r"num_workers=0\) is iterated with 2"):
        list(DataLoader(ds, batch_size=None, num_workers=2))
    with pytest.raises(HpcdlError, match="set by the dataset"):
        ShardLoader(ds, num_workers=2)


def test_field_subset_and_plain_dataloader(ds_path: Path) -> None:
    ds = ShardedDataset(ds_path, 12, fields=["i"], num_workers=2)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert set(batches[0]) == {"i"} and len(batches) == len(ds)
    with pytest.raises(HpcdlError, match=r"fields: unknown \['z'\]"):
        ShardedDataset(ds_path, 12, fields=["z"])


def test_bad_arguments(ds_path: Path) -> None:
    for kw, msg in [
        ({"batch_size": 0}, "batch_size: 0 must be an integer >= 1"),
        ({"batch_size": 4, "rank": 2, "world_size": 2}, r"rank: 2 must be in \[0, world_size=2\)"),
        ({"batch_size": 4, "threads": 0}, "threads"),
        ({"batch_size": 5000}, "less than one batch of 5000"),
    ]:
        with pytest.raises(HpcdlError, match=msg):
            ShardedDataset(ds_path, **kw)


def test_compressed_shards_read_through_h5py(tmp_path: Path) -> None:
    idx = np.arange(500, dtype=np.int64)
    write_shards(
        ArraySource({"i": idx}), tmp_path, compression="gzip", chunk_size=80, shard_size=800
    )
    plain = ShardedDataset(tmp_path / "train", 7, num_workers=0, block_units=2)
    got = cat(list(plain))
    assert len(got) == 497 and len(np.unique(got)) == 497
    state = plain.state_dict(30)
    again = ShardedDataset(tmp_path / "train", 7, block_units=2)
    again.load_state_dict(state)
    assert np.array_equal(cat(list(again)), got[30 * 7 :])
