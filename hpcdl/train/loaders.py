"""The training and validation loaders of a run: :class:`~hpcdl.data.reader.ShardLoader` over
the run's shard datasets, set up from its config."""

from __future__ import annotations

import torch

from hpcdl.data.reader import ShardedDataset, ShardLoader
from hpcdl.train.config import TrainConfig


def shard_loader(cfg: TrainConfig, path: str, rank: int, world: int, train: bool) -> ShardLoader:
    """This rank's loader: shuffled, whole batches for training; in order, every batch for val."""
    dataset = ShardedDataset(
        path,
        cfg.batch.micro,
        rank=rank,
        world_size=world,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle and train,
        block_units=cfg.data.block_units,
        drop_last=train,
        fields=[cfg.data.input, cfg.data.target],
    )
    # A private generator: DataLoader draws a seed from it for every new iterator, which would
    # otherwise shift the global RNG (dropout) between an uninterrupted and a resumed run.
    return ShardLoader(
        dataset, generator=torch.Generator(), persistent_workers=cfg.data.num_workers > 0
    )
