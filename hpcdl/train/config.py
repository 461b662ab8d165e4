"""The training configuration (``configs/train_*.yaml``), validated before anything is queued."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hpcdl.config import apply_overrides, read_yaml, validate
from hpcdl.errors import HpcdlError
from hpcdl.job import Resources
from hpcdl.script_values import SetupLine


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(BaseModel):
    """A zoo model by name (mlp, cnn, resnet) or ``module:Class``; other keys are its options."""

    model_config = ConfigDict(extra="allow")

    name: str = "mlp"
    input_shape: tuple[int, ...] | None = None  # default: the dataset's sample shape
    num_classes: int | None = Field(default=None, ge=2)  # default: the dataset's classes

    @property
    def options(self) -> dict[str, Any]:
        """Model-specific keyword arguments (hidden, channels, depth, width, activation, ...)."""
        return dict(self.model_extra or {})


class DataConfig(_Strict):
    """hpcdl shard datasets (``hpcdl data shard``) and the fields the model reads."""

    train: str
    val: str
    input: str = "x"
    target: str = "y"
    num_workers: int = Field(default=0, ge=0)
    block_units: int = Field(default=16, ge=1)
    shuffle: bool = True
    stage: bool = False  # copy train/val once per node to the site profile's scratch, read there


class BatchConfig(_Strict):
    """Global batch ``size`` = ``micro`` x ranks x gradient accumulation steps."""

    size: int = Field(default=64, ge=1)
    micro: int = Field(default=16, ge=1)


class OptimizerConfig(_Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(default=0.9, ge=0)


class ScheduleConfig(_Strict):
    """Learning rate: linear warmup, then constant, cosine or linear decay to ``min_lr_ratio``."""

    name: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)


class LossConfig(_Strict):
    name: Literal["cross_entropy", "multi_margin", "mse"] = "cross_entropy"
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)


class CheckpointConfig(_Strict):
    """Save every ``every_steps`` optimizer steps (0: only at the end and on preemption)."""

    every_steps: int = Field(default=200, ge=0)
    keep: int = Field(default=3, ge=1)
    # written beside training, as safe (hpcdl.train.async_checkpoint): the default, as it
    # holds training 3.6x less at ZeRO-3 (docs/benchmarks.md); $HPCDL_ASYNC_CHECKPOINTS (1 or
    # 0) overrides it
    async_save: bool = True


class LogConfig(_Strict):
    every_steps: int = Field(default=10, ge=1)
    wandb: bool = True
    wandb_project: str = "hpcdl"
    wandb_mode: Literal["offline", "online", "disabled"] | None = None  # None: the site decides
    wandb_group: str | None = None  # sweeps: one group per sweep
    # sweeps: the trial's run id (default: random, kept in the run folder)
    wandb_id: str | None = None
    wandb_tags: list[str] = []


def world_size(resources: Resources) -> int:
    """Ranks of a job (or of one sweep trial): one per task, tasks default to one per GPU, else
    one per node."""
    return resources.nodes * resources.ntasks_per_node


class JobConfig(Resources):
    """Where and how the job runs (see ``hpcdl.Job``); ``max_requeues`` bounds preemptions."""

    env: dict[str, str] = Field(default_factory=dict)
    setup: list[SetupLine] = Field(default_factory=list)
    max_requeues: int = Field(default=3, ge=0)

    @property
    def world_size(self) -> int:
        return world_size(self)


class TrainConfig(_Strict):
    """One training run: model, data, optimisation, DeepSpeed settings, checkpoints, job."""

    name: str = Field(default="train", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    output: str = "runs"
    run_dir: str | None = None
    model: ModelConfig = ModelConfig()
    data: DataConfig
    batch: BatchConfig = BatchConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    loss: LossConfig = LossConfig()
    epochs: int = Field(default=10, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float | None = Field(default=1.0, gt=0)
    deepspeed: dict[str, Any] = {}  # merged over the generated DeepSpeed config
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    job: JobConfig = JobConfig()

    @model_validator(mode="after")
    def _micro_fits(self) -> TrainConfig:
        if self.batch.size % self.batch.micro:
            raise ValueError(
                f"batch.size {self.batch.size} is not a multiple of batch.micro {self.batch.micro}"
            )
        return self

    def grad_accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.batch.size // (self.batch.micro * world_size)


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read the YAML, apply ``key=value`` overrides, validate (one ConfigError on the first problem)."""
    where = str(path)
    data = apply_overrides(read_yaml(Path(path)), list(overrides), where)
    return validate(TrainConfig, data, where)


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved configuration stored in a run folder."""
    return validate(TrainConfig, read_yaml(Path(run_dir) / "config.yaml"), str(run_dir))


def read_site_values(run_dir: str | Path) -> dict[str, Any]:
    """The site-derived values ``hpcdl.Run`` stored in a run folder (``site.json``), or ``{}``
    for a folder made before runs recorded them. Ranks read these rather than the live profile,
    so editing the profile while a run is queued does not change the run."""
    path = Path(run_dir) / "site.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def preemption_settings(site_values: Mapping[str, Any], site: str | None) -> dict[str, Any]:
    """The preemption settings a run's ranks use (:func:`hpcdl.preemption.configure`): those
    recorded in the run folder (``site.json``) first, else the live profile's, else the
    defaults."""
    from hpcdl.site import Preemption, load_site

    recorded = site_values.get("preemption") or {}
    try:
        live = load_site(site_values.get("site") or site).preemption.model_dump()
    except HpcdlError:
        live = Preemption().model_dump()
    return {**live, **recorded}


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def with_absolute_data(cfg: TrainConfig) -> TrainConfig:
    """The config with absolute dataset paths, valid on any node and in any directory."""
    paths = {k: str(Path(getattr(cfg.data, k)).expanduser().resolve()) for k in ("train", "val")}
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=paths)})


# Settings a resumed run must share with the run that wrote its checkpoints.
IDENTITY = ("seed", "model", "data", "batch", "optimizer", "loss", "zero_stage", "precision")
