"""The trainer's pieces in one process (world size 1, gloo): no Slurm, no subprocess.

Pure tables for the learning-rate schedule and the DeepSpeed config; then real (tiny) trainings
on a synthetic dataset: the train state through a checkpoint, the stop decisions (preemption
flag, ``StopTraining`` from ``on_epoch``) and an exact resume from a mid-epoch checkpoint.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "helpers"))
from train_setup import Flag, history, make_run, rows, same_weights, train_run

from hpcdl import preemption
from hpcdl.errors import HpcdlError
from hpcdl.train.config import (
    TrainConfig,
    dump_config,
    read_run_config,
    read_site_values,
)
from hpcdl.train.engine import deepspeed_config, lr_factor
from hpcdl.train.preflight import staged_data
from hpcdl.train.stop import StopTraining
from hpcdl.train.trainer import Trainer, TrainState, make_tracker, stop_tag
from hpcdl.util import set_dotted


def make_cfg(**dotted: Any) -> TrainConfig:
    """A config with placeholder datasets and ``a.b=value`` changes (pure functions only)."""
    data: dict[str, Any] = {"data": {"train": "/d/train", "val": "/d/val"}}
    for key, value in dotted.items():
        set_dotted(data, key, value)
    return TrainConfig.model_validate(data)


# -- the learning-rate schedule ----------------------------------------------------------------
# (schedule, warmup, min_lr_ratio, total_steps, step, factor)
LR = [
    ("constant", 0, 0.0, 10, 0, 1.0),
    ("constant", 0, 0.0, 10, 9, 1.0),
    ("constant", 0, 0.5, 10, 5, 1.0),  # min_lr_ratio only shapes a decay
    ("constant", 0, 0.0, 10, 1000, 1.0),  # past the end
    ("constant", 4, 0.0, 10, 0, 0.25),
    ("constant", 4, 0.0, 10, 1, 0.5),
    ("constant", 4, 0.0, 10, 3, 1.0),  # the last warmup step reaches the full rate
    ("constant", 4, 0.0, 10, 4, 1.0),
    ("cosine", 0, 0.0, 10, 0, 1.0),
    ("cosine", 0, 0.0, 10, 5, 0.5),
    ("cosine", 0, 0.0, 10, 10, 0.0),
    ("cosine", 0, 0.0, 10, 25, 0.0),  # past the end: stays at the floor
    ("cosine", 0, 0.1, 10, 5, 0.55),
    ("cosine", 0, 0.1, 10, 10, 0.1),
    ("cosine", 0, 0.1, 10, 99, 0.1),
    ("cosine", 0, 1.0, 10, 5, 1.0),  # ratio 1: no decay at all
    ("cosine", 2, 0.0, 12, 0, 0.5),
    ("cosine", 2, 0.0, 12, 2, 1.0),  # decay starts after the warmup
    ("cosine", 2, 0.0, 12, 7, 0.5),
    ("cosine", 2, 0.0, 12, 12, 0.0),
    ("cosine", 0, 0.0, 4, 1, 0.5 * (1 + math.cos(math.pi / 4))),
    ("linear", 0, 0.0, 10, 0, 1.0),
    ("linear", 0, 0.0, 10, 5, 0.5),
    ("linear", 0, 0.0, 10, 10, 0.0),
    ("linear", 0, 0.0, 10, 11, 0.0),
    ("linear", 0, 0.2, 10, 5, 0.6),
    ("linear", 0, 0.2, 10, 10, 0.2),
    ("linear", 0, 0.2, 10, 40, 0.2),
    ("linear", 2, 0.0, 12, 1, 1.0),
    ("linear", 2, 0.0, 12, 2, 1.0),
    ("linear", 2, 0.0, 12, 7, 0.5),
    ("linear", 3, 0.0, 9, 0, 1 / 3),
    ("linear", 0, 0.0, 1, 0, 1.0),  # a one-step run
    ("linear", 0, 0.0, 1, 1, 0.0),
    ("cosine", 0, 0.0, 0, 0, 1.0),  # no steps at all: no division by zero
    ("cosine", 10, 0.0, 5, 5, 0.6),  # warmup longer than the run: still warming up
    ("cosine", 10, 0.0, 5, 10, 1.0),
    ("cosine", 10, 0.0, 5, 11, 0.0),  # then straight to the floor
    ("linear", 10, 0.3, 10, 10, 1.0),
    ("linear", 10, 0.3, 10, 11, 0.3),
]  # fmt: skip


@pytest.mark.parametrize(("name", "warmup", "floor", "total", "step", "expected"), LR)
def test_lr_factor(name, warmup, floor, total, step, expected):
    cfg = make_cfg(**{"schedule.name": name, "schedule.warmup_steps": warmup,
                      "schedule.min_lr_ratio": floor})  # fmt: skip
    assert lr_factor(cfg, total)(step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_lr_decay_is_monotone_and_bounded(name):
    cfg = make_cfg(**{"schedule.name": name, "schedule.warmup_steps": 5,
                      "schedule.min_lr_ratio": 0.05})  # fmt: skip
    values = [lr_factor(cfg, 50)(s) for s in range(60)]
    assert values[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    decay = values[4:]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert min(values) == pytest.approx(0.05) and max(values) == 1.0


# -- the DeepSpeed config ------------------------------------------------------------------------
GENERATED = {  # from the defaults (batch 64 of micro 16, ZeRO-2, fp32, grad_clip 1), one rank
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 4,
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 2**31 - 1,
    "gradient_clipping": 1.0,
}
MISSING = object()
# (config changes, world size, what differs from GENERATED: {key: value, or MISSING})
DS = [
    ({}, 1, {}),
    ({}, 2, {"gradient_accumulation_steps": 2}),
    ({}, 4, {"gradient_accumulation_steps": 1}),
    ({"batch.size": 256, "batch.micro": 8}, 4, {"train_batch_size": 256,
     "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 8}),
    ({"zero_stage": 3}, 1, {"zero_optimization": {"stage": 3}}),
    ({"zero_stage": 0}, 1, {"zero_optimization": {"stage": 0}}),
    ({"precision": "bf16"}, 1, {"bf16": {"enabled": True}}),
    ({"precision": "fp16"}, 1, {"fp16": {"enabled": True}}),
    ({"grad_clip": 0.25}, 1, {"gradient_clipping": 0.25}),
    ({"grad_clip": None}, 1, {"gradient_clipping": MISSING}),
    # nested override: merged key by key, the generated keys stay
    ({"deepspeed": {"zero_optimization": {"overlap_comm": True}}}, 1,
     {"zero_optimization": {"stage": 2, "overlap_comm": True}}),
    ({"deepspeed": {"zero_optimization": {"stage": 1}}, "zero_stage": 3}, 1,
     {"zero_optimization": {"stage": 1}}),  # the user's deepspeed section wins
    ({"deepspeed": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}}, 1,
     {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}),
    ({"deepspeed": {"bf16": {"loss_scale": 0}}, "precision": "bf16"}, 1,
     {"bf16": {"enabled": True, "loss_scale": 0}}),
    ({"deepspeed": {"zero_optimization": {}}}, 1, {}),
    # scalar override, new keys, types replacing each other
    ({"deepspeed": {"gradient_clipping": 0.5}}, 1, {"gradient_clipping": 0.5}),
    ({"deepspeed": {"gradient_clipping": 0.5}, "grad_clip": None}, 1, {"gradient_clipping": 0.5}),
    ({"deepspeed": {"steps_per_print": 10}}, 1, {"steps_per_print": 10}),
    ({"deepspeed": {"gradient_accumulation_steps": 2}}, 2, {"gradient_accumulation_steps": 2}),
    ({"deepspeed": {"wall_clock_breakdown": True}}, 1, {"wall_clock_breakdown": True}),
    ({"deepspeed": {"fp16": False}}, 1, {"fp16": False}),  # a scalar replaces a section
    ({"deepspeed": {"gradient_clipping": {"x": 1}}}, 1, {"gradient_clipping": {"x": 1}}),
    ({"deepspeed": {"activation_checkpointing": {"partition_activations": True}}}, 1,
     {"activation_checkpointing": {"partition_activations": True}}),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "world", "differs"), DS)
def test_deepspeed_config_merge(changes, world, differs):
    cfg = make_cfg(**changes)
    before = copy.deepcopy(cfg.deepspeed)
    expected = {k: v for k, v in {**GENERATED, **differs}.items() if v is not MISSING}
    assert deepspeed_config(cfg, world) == expected
    assert cfg.deepspeed == before  # the config is not modified


def test_deepspeed_config_shares_no_dict_with_ours():
    ours = {"zero_optimization": {"overlap_comm": True}, "comms_logger": {"enabled": False}}
    cfg = make_cfg(deepspeed=ours)
    first = deepspeed_config(cfg, 1)
    first["zero_optimization"]["stage"] = 99  # DeepSpeed may modify what it is given
    first["comms_logger"]["enabled"] = True
    assert (
        cfg.deepspeed
        == copy.deepcopy(ours)
        == {"zero_optimization": {"overlap_comm": True}, "comms_logger": {"enabled": False}}
    )
    assert deepspeed_config(cfg, 1) == {**GENERATED, "comms_logger": {"enabled": False},
        "zero_optimization": {"stage": 2, "overlap_comm": True}}  # fmt: skip


# -- the train state and the stop exception ----------------------------------------------------
def test_train_state_dict_is_the_checkpoint_format():
    state = TrainState(epoch=2, step=37, epoch_loss=1.5, epoch_correct=20.0, epoch_seen=32.0)
    as_dict = state.to_dict()
    assert list(as_dict) == ["epoch", "step", "epoch_loss", "epoch_correct", "epoch_seen"]
    assert TrainState.from_dict(as_dict) == state
    as_dict["step"] = 0  # a copy
    assert state.step == 37
    assert TrainState.from_dict({**state.to_dict(), "extra": 1}) == state
    with pytest.raises(KeyError):
        TrainState.from_dict({"epoch": 1})
    state.next_epoch()
    assert state == TrainState(epoch=3, step=37)


def test_stop_tag():
    assert stop_tag(StopTraining("pruned at epoch 2", tag="pruned")) == "pruned"
    assert stop_tag(StopTraining("enough")) == "stopped"
    # The tag travels only on StopTraining: an attribute on another exception is not a contract.
    legacy = RuntimeError("pruned")
    legacy.wandb_tag = "pruned"  # type: ignore[attr-defined]
    assert stop_tag(legacy) == "stopped"
    assert stop_tag(ValueError("bad metric")) == "stopped"
    again = pickle.loads(pickle.dumps(StopTraining("pruned at epoch 2", tag="pruned")))
    assert isinstance(again, StopTraining) and again.tag == "pruned"
    assert str(again) == "pruned at epoch 2"


# -- real trainings, world size 1 ---------------------------------------------------------------
@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[logging.Logger]:
    """The library logger as a new process has it (the trainer configures it), then as it was."""
    logger = logging.getLogger("hpcdl")
    handlers, level = logger.handlers[:], logger.level
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture(scope="module")
def reference(world1, synth, tmp_path_factory) -> Path:
    """An uninterrupted run: 2 epochs of 15 steps, checkpoints every 10."""
    run_dir = make_run(tmp_path_factory.mktemp("ref"), synth, "ref")
    result = train_run(run_dir)
    assert result["status"] == "completed" and result["step"] == 30 and result["epochs"] == 2
    return run_dir


def test_uninterrupted_run(reference):
    result = json.loads((reference / "result.json").read_text())
    assert result["val_acc"] > 0.9 and result["world_size"] == 1
    assert result["checkpoint"] == "step00000030"
    assert [r["step"] for r in rows(reference, "step")] == [4, 8, 10, 12, 15, 16, 20, 24, 28, 30]
    assert [(r["epoch"], r["step"]) for r in rows(reference, "epoch")] == [(0, 15), (1, 30)]
    events = [(r["event"], r["step"]) for r in rows(reference, "event")]
    assert events == [("start", 0), ("checkpoint", 10), ("checkpoint", 20), ("checkpoint", 30),
                      ("completed", 30)]  # fmt: skip
    assert (reference / "checkpoints/latest").read_text() == "step00000030"
    assert torch.load(reference / "model.pt")["net.1.weight"].shape == (128, 64)


def test_saved_weights_score_as_the_last_validation(reference, synth):
    from hpcdl.train.config import read_run_config
    from hpcdl.train.evaluate import evaluate_weights

    result = json.loads((reference / "result.json").read_text())
    loss, acc, n = evaluate_weights(
        read_run_config(reference), reference / "model.pt", synth / "val"
    )
    assert n == 120 and acc == result["val_acc"]  # one process, batches of 256 instead of 16
    assert loss == pytest.approx(result["val_loss"], rel=1e-5)


def test_checkpoint_warnings_reach_the_job_log(world1, synth, tmp_path, capsys):
    run_dir = make_run(tmp_path, synth, "warned", epochs=1)
    (run_dir / "checkpoints/step00000050").mkdir(parents=True)  # a save that never completed
    assert train_run(run_dir)["status"] == "completed"
    err = capsys.readouterr().err
    assert f"hpcdl: warning: checkpoint {run_dir}/checkpoints/step00000050 is incomplete" in err


def test_train_state_round_trip_through_a_checkpoint(world1, synth, tmp_path):
    run_dir = make_run(tmp_path, synth, "state")
    first = Trainer(run_dir, Flag())
    first.setup()
    first.start_tracking(first.resume())
    for _ in zip(range(3), first.train_loader, strict=False):
        pass  # the loader's position goes into the checkpoint too
    first.state = TrainState(epoch=1, step=7, epoch_loss=3.25, epoch_correct=11.0, epoch_seen=48.0)
    assert first.save() == "step00000007"
    first.checkpoints.wait()  # an asynchronous save (HPCDL_ASYNC_CHECKPOINTS=1) is on disk
    first.tracker.close()
    raw = torch.load(run_dir / "checkpoints/step00000007/mp_rank_00_model_states.pt",
                     weights_only=False)  # fmt: skip
    assert raw["train"] == {
        "epoch": 1,
        "step": 7,
        "epoch_loss": 3.25,
        "epoch_correct": 11.0,
        "epoch_seen": 48.0,
    }  # fmt: skip  (the on-disk format)
    assert raw["loader"]["epoch"] == 0 and raw["loader"]["batches"] == 3

    again = Trainer(run_dir, Flag())
    again.setup()
    assert again.state == TrainState()
    assert again.resume() == "step00000007"
    assert again.state == first.state and again.last_saved == 7
    assert again.train_loader.state_dict() == first.train_loader.state_dict()


def test_preemption_flag_checkpoints_and_stops_then_resumes_exactly(
    world1, synth, tmp_path, reference, monkeypatch
):
    """The flag, raised at step 5, travels with the sync of step 8 and is seen at the next sync
    (step 10): every rank checkpoints there and stops; the resumed run equals the reference."""
    requeued: list[tuple[int, str]] = []  # what rank 0 would requeue (scontrol) after the save
    monkeypatch.setattr(preemption, "after_checkpoint",
                        lambda step, tag, *args, **kw: requeued.append((step, tag)) or "4242")  # fmt: skip
    run_dir = make_run(tmp_path, synth, "cut")
    assert train_run(run_dir, Flag(at=5)) == {"status": "requeued", "step": 10, "job": "4242"}
    assert requeued == [(10, "step00000010")]
    events = [(r["event"], r["step"]) for r in rows(run_dir, "event")]
    assert events == [("start", 0), ("checkpoint", 10), ("preempted", 10)]
    assert (run_dir / "checkpoints/latest").read_text() == "step00000010"
    assert not (run_dir / "result.json").exists()

    result = train_run(run_dir)  # resumes mid-epoch 0 (step 10 of 15)
    resume = [r for r in rows(run_dir, "event") if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["checkpoint"] == "step00000010"
    assert history(run_dir) == history(reference)  # every step's loss, acc and lr; every epoch
    assert same_weights(run_dir, reference)
    ref = json.loads((reference / "result.json").read_text())
    same = ("step", "epochs", "val_loss", "val_acc")
    assert [result[k] for k in same] == [ref[k] for k in same]


def test_preemption_outside_slurm_fails_clearly_after_the_checkpoint(world1, synth, tmp_path):
    run_dir = make_run(tmp_path, synth, "local", checkpoint__every_steps=0)
    with pytest.raises(HpcdlError, match=r"stopped by SIGUSR2 at step 8 \(not a Slurm job"):
        train_run(run_dir, Flag(at=1))  # raised from the start: seen one sync later (step 8)
    assert (run_dir / "checkpoints/latest").read_text() == "step00000008"
    events = [(r["event"], r["step"]) for r in rows(run_dir, "event")]
    assert events == [("start", 0), ("checkpoint", 8), ("preempted", 8)]


@pytest.fixture
def wandb_runs(monkeypatch: pytest.MonkeyPatch) -> list[SimpleNamespace]:
    """A stand-in for the wandb module; returns the runs it started (their tags, finished)."""
    runs: list[SimpleNamespace] = []

    def init(**kwargs: Any) -> SimpleNamespace:
        run = SimpleNamespace(tags=(), summary={}, finished=False, log=lambda row: None)
        run.finish = lambda: setattr(run, "finished", True)
        runs.append(run)
        return run

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init, Settings=dict))
    return runs


def test_stop_training_from_on_epoch_ends_the_run_with_its_tag(world1, synth, tmp_path, wandb_runs):
    seen: list[tuple[int, dict[str, float]]] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        seen.append((epoch, metrics))
        raise StopTraining(f"pruned at epoch {epoch + 1}", tag="pruned")

    run_dir = make_run(tmp_path, synth, "pruned", epochs=3, log__wandb=True)
    with pytest.raises(StopTraining, match="pruned at epoch 1"):
        train_run(run_dir, on_epoch=on_epoch)
    (run,) = wandb_runs
    assert run.tags == ("pruned",) and run.finished  # not also 'failed'
    (epoch_row,) = rows(run_dir, "epoch")
    assert seen == [(0, {k: v for k, v in epoch_row.items() if k not in ("kind", "time")})]
    stopped = rows(run_dir, "event")[-1]
    assert [stopped[k] for k in ("event", "step", "why")] == ["stopped", 15, "pruned at epoch 1"]
    assert not (run_dir / "result.json").exists()


def test_any_other_failure_tags_the_run_failed(world1, synth, tmp_path, monkeypatch, wandb_runs):
    def broken(self: Trainer) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(Trainer, "save", broken)
    run_dir = make_run(tmp_path, synth, "broken", log__wandb=True)
    with pytest.raises(RuntimeError, match="disk full"):
        train_run(run_dir)
    (run,) = wandb_runs
    assert run.tags == ("failed",) and run.finished
    assert [r["step"] for r in rows(run_dir, "step")] == [4, 8, 10]  # it failed at the save of 10


def test_ranks_use_the_site_values_recorded_in_the_run_folder(
    synth, tmp_path, monkeypatch, wandb_runs
):
    """hpcdl.Run records what the site decided (site.json); the ranks use that, not the profile
    as it is when the job starts (the local profile says W&B offline, the record says disabled)."""
    run_dir = make_run(tmp_path, synth, "snap", log__wandb=True, data__stage=True)
    set_config_value(run_dir, "log.wandb_mode", None)  # the site decides
    cfg = read_run_config(run_dir)
    assert read_site_values(run_dir) == {}
    make_tracker(cfg, run_dir, 0).close()  # no record: the profile's offline mode starts a run
    assert len(wandb_runs) == 1
    make_tracker(cfg, run_dir, 0, {"wandb_mode": "disabled"}).close()
    assert len(wandb_runs) == 1
    (run_dir / "site.json").write_text(json.dumps({"scratch": str(tmp_path / "s-$NODE_TAG")}))
    monkeypatch.setenv("NODE_TAG", "n7")  # expanded on the node, where the rank runs
    train_path, val_path = staged_data(cfg, str(run_dir), read_site_values(run_dir)["scratch"])
    assert Path(train_path).parent == tmp_path / "s-n7" and Path(train_path).is_dir()
    assert Path(val_path).parent == tmp_path / "s-n7"


def set_config_value(run_dir: Path, dotted: str, value: Any) -> None:
    cfg = read_run_config(run_dir).model_dump(mode="json")
    set_dotted(cfg, dotted, value)
    (run_dir / "config.yaml").write_text(dump_config(TrainConfig.model_validate(cfg)))
