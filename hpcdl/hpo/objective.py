"""The default sweep objective: one hpcdl training run per trial (and the final retraining)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcdl.config import read_yaml, validate
from hpcdl.errors import ConfigError

if TYPE_CHECKING:
    from hpcdl.hpo.spec import SweepSpec
    from hpcdl.hpo.trial import TrialContext
    from hpcdl.train.config import TrainConfig


def trial_config(spec: SweepSpec, params: dict[str, Any], run_dir: Path, **log: Any) -> TrainConfig:
    """The base training config, the sweep's overrides, then this trial's parameters."""
    from hpcdl.train.config import TrainConfig

    assert spec.train is not None
    data = copy.deepcopy(read_yaml(Path(spec.train)))
    for key, value in {**spec.overrides, **params}.items():
        _set(data, key, value)
    data["run_dir"] = str(run_dir)
    data.setdefault("log", {}).update(log)
    return validate(TrainConfig, data, f"{spec.train} (with the sweep's parameters)")


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError("", dotted, f"'{part}' is not a mapping in the training config")
    node[leaf] = value


def _world_size(spec: SweepSpec) -> int:
    r = spec.resources
    return r.nodes * (r.tasks_per_node or r.gpus_per_node or 1)


def check(spec: SweepSpec) -> None:
    """Before submission: the base config, every parameter path, datasets and model all fit."""
    from hpcdl.train.preflight import preflight

    if spec.train is None:
        raise ConfigError("", "train", "the default objective needs a training config")
    sample = {k: _sample(p) for k, p in spec.space.items()}
    cfg = trial_config(spec, sample, Path("/nonexistent/trial"))  # unknown paths fail here
    preflight(cfg, _world_size(spec), spec.resources.gpus_per_node > 0, spec.train)
    metric = spec.metric.removeprefix("val_")
    if metric not in {"acc", "loss"}:
        raise ConfigError("", "metric", f"{spec.metric!r}: the trainer reports val_acc or val_loss")


def _sample(param: Any) -> Any:
    return param.values[0] if hasattr(param, "values") else param.low


def train_objective(params: dict[str, Any], ctx: TrialContext) -> float:
    """Train with ``params`` in the trial folder (resuming its checkpoints), report every epoch."""
    from hpcdl.train.preempt import PreemptionFlag
    from hpcdl.train.trainer import train

    spec = ctx.spec
    cfg = trial_config(
        spec, params, ctx.trial_dir,
        wandb_group=spec.name, wandb_id=ctx.slot.run_id, wandb_tags=[f"sweep:{spec.name}"],
    )  # fmt: skip
    _store_config(cfg, ctx.trial_dir)
    flag = PreemptionFlag()
    result = train(
        ctx.trial_dir, flag, on_epoch=lambda epoch, m: ctx.report(epoch + 1, m[spec.metric])
    )
    if result["status"] == "requeued":
        from hpcdl.hpo.trial import TrialRequeued

        raise TrialRequeued(f"trial {ctx.slot.trial} requeued at step {result['step']}")
    return float(result[spec.metric])


def _store_config(cfg: TrainConfig, run_dir: Path) -> None:
    import torch.distributed as dist

    from hpcdl.train.config import dump_config, with_absolute_data

    if not dist.is_initialized() or dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(with_absolute_data(cfg)))


def final(params: dict[str, Any], spec: SweepSpec, out_dir: Path) -> dict[str, Any]:
    """Retrain ``params`` on train+val, then evaluate once on the held-out test split."""
    from hpcdl.data.merge import merge_datasets
    from hpcdl.train.evaluate import evaluate_weights
    from hpcdl.train.preempt import PreemptionFlag
    from hpcdl.train.trainer import train

    base = trial_config(spec, params, out_dir)
    test = Path(spec.test_data or Path(base.data.val).parent / "test")
    if not (test / "manifest.json").is_file():
        raise ConfigError("", "test_data", f"no hpcdl dataset at {test}")
    trainval = merge_datasets([Path(base.data.train), Path(base.data.val)], out_dir / "trainval")
    cfg = trial_config(
        spec, {**params, "data.train": str(trainval)}, out_dir,
        wandb_group=spec.name, wandb_id=f"{spec.name}-final", wandb_tags=[f"sweep:{spec.name}", "final"],
    )  # fmt: skip
    _store_config(cfg, out_dir)
    result = train(out_dir, PreemptionFlag())
    if result["status"] == "requeued":
        sys.exit(0)
    test_loss, test_acc, n = evaluate_weights(cfg, out_dir / "model.pt", test)
    return {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "test_samples": n,
        "train_samples_from": ["train", "val"],
    }


train_objective.check = check  # type: ignore[attr-defined]
train_objective.final = final  # type: ignore[attr-defined]
