"""HDF5 shard datasets: writer, fast deterministic reader with exact resume, verify, staging.

``ShardedDataset`` and ``ShardLoader`` import torch, so they load on first use.
"""

from __future__ import annotations

from typing import Any

from hpcdl.data.manifest import FieldSpec, Manifest, ShardInfo
from hpcdl.data.stage import stage
from hpcdl.data.verify import verify
from hpcdl.data.writer import write_shards

__all__ = [
    "FieldSpec",
    "Manifest",
    "ShardInfo",
    "ShardLoader",
    "ShardedDataset",
    "stage",
    "verify",
    "write_shards",
]


def __getattr__(name: str) -> Any:
    if name in ("ShardedDataset", "ShardLoader"):
        from hpcdl.data import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'hpcdl.data' has no attribute {name!r}")
