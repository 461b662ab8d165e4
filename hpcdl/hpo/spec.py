"""The sweep spec (YAML in ``configs/``): base training config, search space, Optuna pieces."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from hpcdl.config import JobTime, read_yaml, validate
from hpcdl.database import StorageChoice
from hpcdl.hpo.budget_model import Budget
from hpcdl.job import Resources as JobResources

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Choice(_Strict):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)


class Grid(_Strict):
    type: Literal["grid"]
    values: list[Any] = Field(min_length=1)


class Uniform(_Strict):
    type: Literal["uniform", "loguniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _range(self) -> Uniform:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self


class IntRange(_Strict):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(default=1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> IntRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        return self


Param = Annotated[Choice | Grid | Uniform | IntRange, Field(discriminator="type")]


class Sampler(_Strict):
    name: Literal["grid", "random", "tpe", "cmaes"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(default=5, ge=0)


class Pruner(_Strict):
    name: Literal["none", "median", "asha", "hyperband"] = "none"
    min_resource: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=3, ge=2)
    warmup_epochs: int = Field(default=1, ge=0)


class Resources(JobResources):
    """Per-trial job resources (a trial may span several nodes)."""

    time: JobTime = "00:30:00"


class SweepSpec(_Strict):
    """A sweep: ``trials`` trainings of ``train`` with parameters drawn from ``space``."""

    name: str
    train: str | None = None  # base training config (YAML); required unless `objective` is set
    overrides: dict[str, Any] = {}
    space: dict[str, Param] = Field(min_length=1)
    sampler: Sampler = Sampler()
    pruner: Pruner = Pruner()
    metric: str = "val_acc"
    direction: Literal["maximize", "minimize"] = "maximize"
    trials: int = Field(ge=1, le=100_000)
    parallelism: int = Field(default=4, ge=1)
    # None: each array task is a warm worker running trials until none is left; 1: one trial
    # per array task (per-trial accounting in sacct, at a start-up per trial)
    trials_per_task: int | None = None
    resources: Resources = Resources()
    max_retries: int = Field(default=2, ge=0, le=20)
    # multi-rank trials: a collective waiting longer than this (a dead peer) fails the attempt
    collective_timeout_s: int = Field(default=600, ge=10, le=86_400)
    final: bool = True
    test_data: str | None = None  # held-out split for the final job; default: <val>/../test
    # module:name of an hpcdl.hpo.protocol.Objective (check, run, final) or of a plain
    # function(params, ctx) -> metric; default: hpcdl's trainer
    objective: str | None = None
    # Where the Optuna study lives: `journal` (SWEEP/study.journal), a PostgreSQL URL without a
    # password, or {url, password_file}; None: the site's study_storage, else the journal.
    # `sweep run` writes its choice (and the database study's name) into the sweep's spec.
    storage: StorageChoice | None = None
    # node- or GPU-hours: no new trial is sampled once the trials have spent it (hpcdl.hpo.budget)
    budget: Budget | None = None

    @field_validator("budget")
    @classmethod
    def _budget_has_gpus(cls, budget: Budget | None, info: ValidationInfo) -> Budget | None:
        resources = info.data.get("resources")
        gpus = resources.gpus_per_node if resources is not None else 1
        if budget is not None and budget.gpu_hours is not None and not gpus:
            raise ValueError("gpu_hours needs trials with GPUs (resources.gpus_per_node is "
                             "0): give node_hours")  # fmt: skip
        return budget

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '_', '.', '-' (max 64)")
        for key in self.space:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
                raise ValueError(
                    f"space key {key!r} must be a dotted config path like optimizer.lr"
                )
        if self.objective is None and self.train is None:
            raise ValueError("give `train` (a training config) or `objective` (module:function)")
        if self.trials_per_task not in (None, 1):
            raise ValueError(
                f"trials_per_task {self.trials_per_task!r}: give 1 (one trial per array task) "
                "or leave it out (warm workers that run trials until none is left)"
            )
        if self.objective is not None and not re.fullmatch(r"[\w.]+:\w+", self.objective):
            raise ValueError(f"objective {self.objective!r} must look like package.module:function")
        grids = [k for k, p in self.space.items() if isinstance(p, Grid)]
        if self.sampler.name == "grid":
            bad = [k for k, p in self.space.items() if not isinstance(p, Grid | Choice)]
            if bad:
                raise ValueError(f"grid sampler needs grid/choice values, {bad[0]!r} is a range")
            if self.trials > self.grid_size:
                raise ValueError(
                    f"trials ({self.trials}) exceed the grid's {self.grid_size} points"
                )
        elif grids:
            raise ValueError(
                f"{grids[0]!r} is a grid parameter: use sampler 'grid' (or type 'choice')"
            )
        return self

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.space.values() if isinstance(p, Grid | Choice))


def load_spec(path: Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read and validate a sweep spec; ``train`` is resolved relative to the spec's folder."""
    from hpcdl.config import apply_overrides

    data = apply_overrides(read_yaml(path), overrides or [], str(path))
    spec = validate(SweepSpec, data, str(path))
    if spec.train is None:
        return spec
    train = Path(spec.train)
    if not train.is_absolute() and not train.exists():
        train = path.parent / train
    return spec.model_copy(update={"train": str(train.resolve())})
