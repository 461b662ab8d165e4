"""Concatenate datasets without copying samples: hard links to their shards, one new manifest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hpcdl.data.manifest import Manifest, ShardInfo
from hpcdl.errors import HpcdlError


def merge_datasets(inputs: list[Path], out: Path, split: str = "merged") -> Path:
    """One dataset holding every sample of ``inputs`` (same fields, chunking and compression).

    Shards are hard-linked (copied across filesystems); the manifest is written last, so an
    interrupted merge leaves no valid-looking dataset. An existing complete merge is reused.
    """
    manifests = [Manifest.load(p) for p in inputs]
    first = manifests[0]
    for path, m in zip(inputs[1:], manifests[1:], strict=True):
        if (m.fields, m.chunk_samples, m.compression) != (
            first.fields,
            first.chunk_samples,
            first.compression,
        ):
            raise HpcdlError(
                f"{path}: fields, chunking or compression differ from {inputs[0]}; cannot merge"
            )
    if (out / "manifest.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, (path, m) in enumerate(zip(inputs, manifests, strict=True)):
        for shard in m.shards:
            name = f"part{i}-{shard.file}"
            target = out / name
            target.unlink(missing_ok=True)
            try:
                os.link(path / shard.file, target)
            except OSError:
                shutil.copyfile(path / shard.file, target)
            shards.append(
                ShardInfo(file=name, samples=shard.samples, bytes=shard.bytes, sha256=shard.sha256)
            )
    merged = first.model_copy(
        update={
            "shards": shards,
            "samples": sum(s.samples for s in shards),
            "split": split,
            "source": " + ".join(str(p) for p in inputs),
        }
    )
    Manifest.model_validate(merged.model_dump()).save(out)
    return out
