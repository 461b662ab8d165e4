"""The default sweep objective: one hpcdl training run (:class:`hpcdl.train.run.Run`) per trial,
and the final retraining of the best parameters."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcdl.config import read_yaml, validate
from hpcdl.errors import ConfigError
from hpcdl.hpo.protocol import BaseObjective
from hpcdl.util import set_dotted

if TYPE_CHECKING:
    from hpcdl.hpo.protocol import TrialContext
    from hpcdl.hpo.spec import SweepSpec
    from hpcdl.train.config import TrainConfig
    from hpcdl.train.run import Run


def trial_config(spec: SweepSpec, params: dict[str, Any], run_dir: Path, **log: Any) -> TrainConfig:
    """The base training config, the sweep's overrides, then this trial's parameters."""
    from hpcdl.train.config import TrainConfig

    assert spec.train is not None
    data = copy.deepcopy(read_yaml(Path(spec.train)))
    for key, value in {**spec.overrides, **params}.items():
        try:
            set_dotted(data, key, value)
        except ValueError as exc:
            raise ConfigError("", key, f"{exc} in the training config") from None
    data["run_dir"] = str(run_dir)
    data.setdefault("log", {}).update(log)
    return validate(TrainConfig, data, f"{spec.train} (with the sweep's parameters)")


def check_node_range(spec: SweepSpec, cfg: TrainConfig) -> None:
    """``resources.nodes: MIN-MAX`` (an elastic sweep): Slurm may start a worker, and bring a
    requeued one back, on any count of the range; its trials train on that many ranks and
    resume on another as any run does (checkpoints and loader positions do not depend on the
    world size). So the global batch must split into whole micro-batches on every count, for
    the sampled batch and for every value a ``batch.size`` choice can take."""
    r = spec.resources
    if len(r.node_counts) < 2:
        return
    param = spec.space.get("batch.size")
    sizes = list(getattr(param, "values", None) or [cfg.batch.size])
    for nodes in r.node_counts:
        ranks = nodes * r.ntasks_per_node
        for size in sizes:
            if int(size) % (cfg.batch.micro * ranks):
                raise ConfigError("", "resources.nodes", f"{r.node_range}: on {nodes} node(s) "
                                  f"({ranks} ranks) batch.size {size} is not divisible by "
                                  f"batch.micro {cfg.batch.micro} x {ranks}; choose batch sizes "
                                  "that every count in the range divides, or a narrower range")  # fmt: skip


def _sample(param: Any) -> Any:
    return param.values[0] if hasattr(param, "values") else param.low


def _requeued(result: dict[str, Any], what: str) -> None:
    """The run checkpointed on a preemption signal and its job was requeued: stop here."""
    from hpcdl.hpo.protocol import TrialRequeued

    if result["status"] == "requeued":
        raise TrialRequeued(f"{what} requeued at step {result['step']}")


class TrainObjective(BaseObjective):
    """hpcdl's trainer as a sweep objective: ``spec.train`` with the trial's parameters."""

    name = "hpcdl.hpo.objective:train_objective"

    def check(self, spec: SweepSpec) -> None:
        """Before submission: the base config, every parameter path, datasets and model fit."""
        from hpcdl.site import load_site
        from hpcdl.train.config import world_size
        from hpcdl.train.preflight import preflight

        if spec.train is None:
            raise ConfigError("", "train", "the default objective needs a training config")
        sample = {k: _sample(p) for k, p in spec.space.items()}
        cfg = trial_config(spec, sample, Path("/nonexistent/trial"))  # unknown paths fail here
        # trials write this config into their folders without a Job.check of their own
        site = load_site(spec.resources.site)
        site.check_secrets(cfg.job.env, cfg.job.setup, [], cfg.name, f"{spec.train}: job")
        preflight(cfg, world_size(spec.resources), spec.resources.gpus_per_node > 0, spec.train)
        check_node_range(spec, cfg)
        for i, name in enumerate([*spec.metrics, *spec.constraints]):
            field = ("metric" if not spec.objectives else f"objectives.{i}.name") if i < len(
                spec.metrics) else "constraints"  # fmt: skip
            if name not in {"val_acc", "val_loss"}:
                raise ConfigError("", field, f"{name!r}: the trainer reports val_acc or val_loss")

    def run(self, params: dict[str, Any], ctx: TrialContext) -> float | dict[str, float]:
        """Train with ``params`` in the trial folder (resuming its checkpoints); report every
        epoch, so the pruner can stop the run (``ctx.report`` raises ``StopTraining``)."""
        spec = ctx.spec
        cfg = trial_config(
            spec, params, ctx.trial_dir,
            wandb_group=spec.name, wandb_id=ctx.slot.run_id, wandb_tags=[f"sweep:{spec.name}"],
        )  # fmt: skip
        # The process group outlives the trial: a sweep worker runs several in it, under one
        # preemption flag (installed when the worker started, so no signal falls between trials).
        result = _run(cfg, spec).execute(
            lambda epoch, m: ctx.report(epoch + 1, m[spec.metric]),
            flag=getattr(ctx, "flag", None),
            finish=False,
        )
        _requeued(result, f"trial {ctx.slot.trial}")
        if spec.multi or spec.constraints:
            return {m: float(result[m]) for m in [*spec.metrics, *spec.constraints]}
        return float(result[spec.metric])

    def final(self, params: dict[str, Any], spec: SweepSpec, out_dir: Path) -> dict[str, Any]:
        """Retrain ``params`` on train+val, then evaluate once on the held-out test split."""
        from hpcdl.data.merge import merge_datasets
        from hpcdl.train.evaluate import evaluate_weights

        base = trial_config(spec, params, out_dir)
        test = Path(spec.test_data or Path(base.data.val).parent / "test")
        if not (test / "manifest.json").is_file():
            raise ConfigError("", "test_data", f"no hpcdl dataset at {test}")
        trainval = merge_datasets(
            [Path(base.data.train), Path(base.data.val)], out_dir / "trainval"
        )
        cfg = trial_config(
            spec, {**params, "data.train": str(trainval)}, out_dir,
            wandb_group=spec.name, wandb_id=f"{spec.name}-final", wandb_tags=[f"sweep:{spec.name}", "final"],
        )  # fmt: skip
        run = _run(cfg, spec)
        _requeued(run.execute(finish=False), "final retraining")
        test_loss, test_acc, n = evaluate_weights(run.config, out_dir / "model.pt", test)
        return {
            "test_acc": test_acc,
            "test_loss": test_loss,
            "test_samples": n,
            "train_samples_from": ["train", "val"],
        }


def _run(cfg: TrainConfig, spec: SweepSpec) -> Run:
    from hpcdl.train.run import Run

    return Run(cfg, where=f"{spec.train} (with the sweep's parameters)")


train_objective = TrainObjective()
