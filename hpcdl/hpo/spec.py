"""The sweep spec (YAML in ``configs/``): base training config, search space, Optuna pieces."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from hpcdl.config import JobTime, read_yaml, validate
from hpcdl.database import StorageChoice
from hpcdl.hpo.budget_model import Budget
from hpcdl.hpo.conditions import check_conditions
from hpcdl.hpo.packing import check_packing, lanes_of
from hpcdl.hpo.pbt_spec import NEVER_PERTURBED, PBT, perturbed_names
from hpcdl.hpo.space import Choice, Grid, Param, SpecProblem, StrictModel
from hpcdl.job import Resources as JobResources

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class Sampler(StrictModel):
    name: Literal["grid", "random", "tpe", "cmaes", "gp", "nsga2"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(default=5, ge=0)


class Pruner(StrictModel):
    name: Literal["none", "median", "asha", "hyperband"] = "none"
    min_resource: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=3, ge=2)
    warmup_epochs: int = Field(default=1, ge=0)
    # asha: judge a trial at this many rungs at most, then let it run to the end
    # (hpcdl.hpo.pruners); None: at every rung, as Optuna's SuccessiveHalvingPruner
    max_rungs: int | None = Field(default=None, ge=1)
    # asha: {epoch: reduction factor}, a rung at each epoch with its own factor, in place of
    # min_resource * reduction_factor**i (hpcdl.hpo.pruners.RungPruner)
    rungs: dict[int, int] | None = None


Direction = Literal["maximize", "minimize"]


class ObjectiveName(StrictModel):
    """One objective of a multi-objective sweep: a metric the trial records, and its direction."""

    name: str
    direction: Direction = "maximize"


class Resources(JobResources):
    """Per-trial job resources (a trial may span several nodes)."""

    time: JobTime = "00:30:00"


class SweepSpec(StrictModel):
    """A sweep: ``trials`` trainings of ``train`` with parameters drawn from ``space``."""

    name: str
    train: str | None = None  # base training config (YAML); required unless `objective` is set
    overrides: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Param] = Field(min_length=1)
    sampler: Sampler = Sampler()
    pruner: Pruner = Pruner()
    metric: str = "val_acc"
    direction: Literal["maximize", "minimize"] = "maximize"
    # several objectives (a Pareto front); `metric`/`direction` then name the first
    objectives: list[ObjectiveName] | None = Field(default=None, min_length=1)
    # recorded metrics that must be <= 0 for a trial to count (Optuna's trial constraints)
    constraints: list[str] = Field(default_factory=list)
    # another sweep's name or a file of trials (JSON/YAML) the study starts from
    warm_start: str | None = None
    trials: int = Field(ge=1, le=100_000)
    parallelism: int = Field(default=4, ge=1)
    # None: each array task is a warm worker running trials until none is left; 1: one trial
    # per array task (per-trial accounting in sacct, at a start-up per trial)
    trials_per_task: int | None = None
    # trial packing (hpcdl.hpo.packing): each warm worker runs this many trials at once on its
    # node, each on its own CPUs and GPUs; `parallelism` still counts the workers
    trials_per_node: int | None = Field(default=None, ge=1, le=1024)
    trials_per_gpu: int | None = Field(default=None, ge=1, le=64)
    # population-based training (hpcdl.hpo.pbt): exploit and explore every interval_epochs
    pbt: PBT | None = None
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

    @model_validator(mode="before")
    @classmethod
    def _first_objective(cls, data: Any) -> Any:
        """With ``objectives``, ``metric``/``direction`` are the first one's (what single-metric
        views show); a multi-objective sweep has no one best to retrain, so ``final`` defaults to
        false for it."""
        if (
            not isinstance(data, dict)
            or not data.get("objectives")
            or not isinstance(data["objectives"], list)
        ):  # an empty list: the field's own check says so
            return data
        objectives = data["objectives"]
        first = objectives[0] if objectives and isinstance(objectives[0], dict) else {}
        implied = {"metric": first.get("name"), "direction": first.get("direction", "maximize")}
        for key, value in implied.items():
            if key in data and data[key] != value:
                raise SpecProblem(key, f"{data[key]!r} differs from the first of `objectives` "
                                  f"({value!r}): give objectives alone")  # fmt: skip
        extra = {"final": False} if len(objectives) > 1 else {}
        return {**extra, **data, **implied}

    @property
    def metrics(self) -> list[str]:
        """The objectives' names, in order (one for a single-objective sweep)."""
        return [o.name for o in self.objectives] if self.objectives else [self.metric]

    @property
    def directions(self) -> list[Direction]:
        return [o.direction for o in self.objectives] if self.objectives else [self.direction]

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1

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
        check_search(self)
        r = self.resources
        check_packing(self.trials_per_node, self.trials_per_gpu, self.trials_per_task, r.node_range,
                      r.tasks_per_node, r.gpus_per_node, r.cpus_per_task)  # fmt: skip
        if self.pbt is not None:
            check_pbt(self)
        return self

    @property
    def lanes(self) -> int:
        """Trials each warm worker runs at once (trial packing; 1 without)."""
        return lanes_of(self.trials_per_node, self.trials_per_gpu, self.resources.gpus_per_node)

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.space.values() if isinstance(p, Grid | Choice))


def check_search(spec: SweepSpec) -> None:
    """Objectives, constraints, sampler and pruner together; conditions of the space."""
    names = spec.metrics + spec.constraints
    for i, name in enumerate(names):
        where = f"objectives.{i}.name" if i < len(spec.metrics) else "constraints"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
            raise SpecProblem(where, f"{name!r}: a metric name (letters, digits, '_', '.')")
        if name in names[:i]:
            raise SpecProblem(where, f"{name!r} is named twice among objectives and constraints")
    if spec.multi and spec.pruner.name != "none":
        raise SpecProblem("pruner.name", f"{spec.pruner.name!r}: Optuna does not prune "
                          "multi-objective studies; use pruner: {name: none} or one objective")  # fmt: skip
    rungs = spec.pruner.rungs
    if rungs is not None and (spec.pruner.name != "asha" or spec.pruner.max_rungs is not None):
        raise SpecProblem("pruner.rungs", "only the asha pruner has rungs, and rungs replace "
                          "max_rungs: give one of them")  # fmt: skip
    if rungs is not None and (not rungs or min(rungs) < 1 or min(rungs.values()) < 2):
        raise SpecProblem("pruner.rungs", f"{rungs}: give {{epoch: reduction factor}} with "
                          "epochs >= 1 and factors >= 2")  # fmt: skip
    if spec.pruner.max_rungs is not None and spec.pruner.name != "asha":
        raise SpecProblem("pruner.max_rungs", f"only the asha pruner has rungs to cap, not "
                          f"{spec.pruner.name!r}: leave max_rungs out")  # fmt: skip
    if spec.multi and spec.sampler.name == "cmaes":
        raise SpecProblem("sampler.name", "'cmaes' optimises one objective; with several use "
                          "tpe, nsga2, gp, random or grid")  # fmt: skip
    if spec.multi and spec.final:
        raise SpecProblem("final", "a multi-objective sweep has a Pareto front, not one best "
                          "trial to retrain: leave final out (false), and retrain the one you pick")  # fmt: skip
    if spec.constraints and spec.sampler.name == "cmaes":
        raise SpecProblem("constraints", "the cmaes sampler ignores constraints: use tpe, "
                          "nsga2 or gp (random and grid only filter the best by them)")  # fmt: skip
    check_conditions(spec.space, spec.sampler.name)


def check_pbt(spec: SweepSpec) -> None:
    """Raise :class:`SpecProblem` for a ``pbt:`` section the sweep cannot run."""
    pbt = spec.pbt
    assert pbt is not None
    if spec.objective is not None:
        raise SpecProblem("pbt", "PBT copies the checkpoints of hpcdl's trainer: leave "
                          f"objective ({spec.objective}) out and give train")  # fmt: skip
    if spec.multi:
        raise SpecProblem("pbt", "PBT ranks trials by one objective: give metric, not objectives")
    if spec.pruner.name != "none":
        raise SpecProblem("pruner.name", f"{spec.pruner.name!r}: PBT replaces a bad trial's "
                          "weights instead of stopping it; use pruner: {name: none}")  # fmt: skip
    if spec.final:
        raise SpecProblem("final", "a PBT trial's parameters change as it trains, so there is no "
                          "one set to retrain: give final: false (the best trial's model.pt is "
                          "the result)")  # fmt: skip
    r = spec.resources
    if r.nodes * r.ntasks_per_node > 1:
        # every rank would copy the boundary's checkpoint into the same folders at once; a
        # multi-rank PBT trial was never run either
        field = "resources.nodes" if r.nodes > 1 else "resources.tasks_per_node"
        raise SpecProblem(field, f"{r.node_range} node(s) x {r.ntasks_per_node} task(s): a PBT "
                          "trial runs on one rank (nodes: 1, tasks_per_node: 1; with GPUs, "
                          "gpus_per_node: 1)")  # fmt: skip
    epochs = spec.overrides.get("epochs")
    if isinstance(epochs, int) and pbt.interval_epochs >= epochs:
        raise SpecProblem("pbt.interval_epochs", f"{pbt.interval_epochs}: must be below the "
                          f"trials' epochs ({epochs}), or no trial ever meets another")  # fmt: skip
    for name in pbt.perturb:
        param = spec.space.get(name)
        if param is None:
            raise SpecProblem("pbt.perturb", f"{name!r} is not a parameter of the space")
        if isinstance(param, Choice | Grid):
            raise SpecProblem("pbt.perturb", f"{name!r} is a choice: PBT perturbs numbers "
                              "(exploit copies a choice from the better trial)")  # fmt: skip
        if name.startswith(NEVER_PERTURBED):
            raise SpecProblem("pbt.perturb", f"{name!r}: a resumed checkpoint keeps its batch "
                              "size and seed; exploit copies it, explore cannot change it")  # fmt: skip
    if not perturbed_names(spec.space, pbt):
        raise SpecProblem("pbt.perturb", "the space has no numeric parameter to perturb "
                          "(uniform, loguniform or int)")  # fmt: skip


def load_spec(path: Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read and validate a sweep spec; ``train`` and a ``warm_start`` file are resolved
    relative to the spec's folder."""
    from hpcdl.config import apply_overrides

    data = apply_overrides(read_yaml(path), overrides or [], str(path))
    spec = validate_spec(data, str(path))
    if spec.warm_start is not None and warm_start_is_file(spec.warm_start):
        warm = Path(spec.warm_start).expanduser()
        if not warm.is_absolute():
            warm = path.parent / warm
        spec = spec.model_copy(update={"warm_start": str(warm.resolve())})
    if spec.train is None:
        return spec
    train = Path(spec.train)
    if not train.is_absolute() and not train.exists():
        train = path.parent / train
    return spec.model_copy(update={"train": str(train.resolve())})


def validate_spec(data: dict[str, Any], where: str) -> SweepSpec:
    """A spec from ``data``, or one ConfigError line naming the field a problem is about (a
    :class:`SpecProblem` names its own, not the spec's top level)."""
    from pydantic import ValidationError

    from hpcdl.errors import ConfigError

    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        problem = (exc.errors()[0].get("ctx") or {}).get("error")
        if isinstance(problem, SpecProblem):
            raise ConfigError(where, problem.field, problem.problem) from None
        return validate(SweepSpec, data, where)  # raises its one line


def warm_start_is_file(value: str) -> bool:
    """``warm_start: X`` names a file (a path, or .json/.yaml/.yml) rather than a sweep."""
    return "/" in value or value.endswith((".json", ".yaml", ".yml"))
