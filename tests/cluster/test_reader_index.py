"""DataLoader workers forked by ShardLoader start with the chunk index the main process read."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
from torch.utils.data import get_worker_info

from hpcdl.data import ShardedDataset, ShardLoader, write_shards
from hpcdl.data.sources import ArraySource


def test_forked_workers_inherit_the_chunk_index(tmp_path: Path) -> None:
    i = np.arange(600, dtype=np.int64)
    write_shards(ArraySource({"i": i}), tmp_path, chunk_size=25 * 8, shard_size=4 * 25 * 8)
    ds = ShardedDataset(tmp_path / "train", 20, num_workers=2)
    shards = len(ds.manifest.shards)
    known = multiprocessing.RawArray("i", 2)  # shards indexed at each worker's start

    def at_start(worker: int) -> None:
        known[worker] = len(get_worker_info().dataset._reader._indexed)

    for epoch in range(2):  # non-persistent workers: forked again each epoch
        ds.set_epoch(epoch)
        got = np.concatenate([b["i"].numpy() for b in ShardLoader(ds, worker_init_fn=at_start)])
        assert sorted(got.tolist()) == sorted(set(got.tolist())) and len(got) == 600
        assert list(known) == [shards, shards]
