"""Checks run before a training job is queued (and again at its start): datasets, model, batch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.train.config import TrainConfig

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class DataSpec:
    """What the model needs to know about the data."""

    input_shape: tuple[int, ...]
    input_dtype: str
    num_classes: int
    train_samples: int
    val_samples: int


def check_world(cfg: TrainConfig, world_size: int, where: str) -> None:
    """The global batch must split into whole micro-batches on every rank."""
    per_step = cfg.batch.micro * world_size
    if cfg.batch.size % per_step:
        raise ConfigError(
            where,
            "batch.size",
            f"{cfg.batch.size} is not divisible by batch.micro {cfg.batch.micro} x "
            f"{world_size} ranks = {per_step}",
        )


def check_elastic(cfg: TrainConfig, where: str) -> None:
    """``job.nodes: MIN-MAX``: Slurm may start the job on any count in the range, so the global
    batch must split into whole micro-batches for each count's ranks, not only for MAX's."""
    job = cfg.job
    if len(job.node_counts) < 2:  # one count: check_world says it, naming batch.size
        return
    for nodes in job.node_counts:
        ranks = nodes * job.ntasks_per_node
        if cfg.batch.size % (cfg.batch.micro * ranks):
            raise ConfigError(
                where,
                "job.nodes",
                f"{job.node_range}: on {nodes} node(s) ({ranks} ranks) batch.size "
                f"{cfg.batch.size} is not divisible by batch.micro {cfg.batch.micro} x {ranks}; "
                "choose a batch.size that every count in the range divides, or a narrower range",
            )


def inspect_data(cfg: TrainConfig, where: str) -> DataSpec:
    """Open both manifests and check the input and target fields."""
    from hpcdl.data.manifest import Manifest

    manifests = {}
    for split in ("train", "val"):
        path = getattr(cfg.data, split)
        try:
            manifests[split] = Manifest.load(path)
        except HpcdlError as exc:
            raise ConfigError(where, f"data.{split}", str(exc)) from None
        for key in ("input", "target"):
            field = getattr(cfg.data, key)
            if field not in manifests[split].fields:
                have = ", ".join(sorted(manifests[split].fields))
                raise ConfigError(
                    where, f"data.{key}", f"{path} has no field {field!r} (fields: {have})"
                )
    train, val = manifests["train"], manifests["val"]
    x, y = train.fields[cfg.data.input], train.fields[cfg.data.target]
    for key, field in (("input", cfg.data.input), ("target", cfg.data.target)):
        if val.fields[field] != train.fields[field]:
            raise ConfigError(
                where,
                f"data.{key}",
                f"field {field!r} differs between data.train {train.fields[field]} "
                f"and data.val {val.fields[field]}",
            )
    if y.shape != () or not y.dtype.startswith(("int", "uint")):
        raise ConfigError(
            where,
            "data.target",
            f"field {cfg.data.target!r} must hold one integer class label per sample, "
            f"got {y.dtype} of shape {y.shape}",
        )
    classes = cfg.model.num_classes or (len(train.classes) if train.classes else None)
    if classes is None:
        raise ConfigError(
            where, "model.num_classes", "the dataset does not list its classes: set it"
        )
    return DataSpec(tuple(x.shape), x.dtype, classes, train.samples, val.samples)


def check_model(cfg: TrainConfig, spec: DataSpec, where: str) -> nn.Module:
    """Build the model and run one forward pass on a zero batch shaped like the data."""
    import torch

    from hpcdl.train.models import build_model

    if cfg.model.input_shape is not None and tuple(cfg.model.input_shape) != spec.input_shape:
        raise ConfigError(
            where,
            "model.input_shape",
            f"{tuple(cfg.model.input_shape)} does not match the samples of data.train field "
            f"{cfg.data.input!r}: {spec.input_shape}",
        )
    model = build_model(
        cfg.model.name, spec.input_shape, spec.num_classes, cfg.model.options, where
    )
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *spec.input_shape))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            where,
            "model",
            f"{cfg.model.name!r} cannot take samples of shape {spec.input_shape} "
            f"(data.train field {cfg.data.input!r}): {first}",
        ) from None
    if tuple(out.shape) != (2, spec.num_classes):
        raise ConfigError(
            where,
            "model",
            f"{cfg.model.name!r} returns shape {tuple(out.shape[1:])} per sample, "
            f"expected ({spec.num_classes},) class scores",
        )
    return model


def check_batches(cfg: TrainConfig, world_size: int, where: str) -> None:
    """Every rank must get at least one micro-batch of each split per epoch."""
    from hpcdl.data.reader import ShardedDataset

    for split in ("train", "val"):
        try:
            ShardedDataset(
                getattr(cfg.data, split),
                cfg.batch.micro,
                rank=0,
                world_size=world_size,
                num_workers=cfg.data.num_workers,
                block_units=cfg.data.block_units,
                drop_last=split == "train",
                fields=[cfg.data.input, cfg.data.target],
            )
        except HpcdlError as exc:
            raise ConfigError(where, f"data.{split}", str(exc)) from None


def preflight(cfg: TrainConfig, world_size: int, gpus: bool, where: str) -> DataSpec:
    """Every check that can fail before the job runs, each one ConfigError naming the field."""
    if cfg.precision == "fp16" and not gpus:
        raise ConfigError(where, "precision", "fp16 needs GPUs; use bf16 or fp32 on CPU")
    check_world(cfg, world_size, where)
    if cfg.data.stage:
        scratch_dir(cfg, where)
    spec = inspect_data(cfg, where)
    check_model(cfg, spec, where)
    check_batches(cfg, world_size, where)
    return spec


def scratch_dir(cfg: TrainConfig, where: str, snapshot: str | None = None) -> str:
    """The node-local folder ``data.stage`` copies to: the run's recorded ``scratch``
    (``snapshot``, variables expanded here, on the node) or else the site profile's."""
    if snapshot:
        return os.path.expandvars(os.path.expanduser(snapshot))
    from hpcdl.site import load_site

    site = load_site(cfg.job.site)
    if not site.scratch:
        raise ConfigError(
            where, "data.stage", f"site {site.name!r} names no node-local scratch folder"
        )
    return site.scratch_path or ""  # set: checked above


def staged_data(cfg: TrainConfig, where: str, snapshot: str | None = None) -> tuple[str, str]:
    """(train, val) dataset paths to read: staged to node-local scratch when ``data.stage``."""
    if not cfg.data.stage:
        return cfg.data.train, cfg.data.val
    from hpcdl.data.stage import stage

    scratch = scratch_dir(cfg, where, snapshot)
    return str(stage(cfg.data.train, scratch)), str(stage(cfg.data.val, scratch))
