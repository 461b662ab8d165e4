"""The training loop: a DeepSpeed engine over hpcdl shard datasets, exactly resumable.

Read :func:`train` top to bottom: set up (ranks, model, data, engine), resume from the newest
valid checkpoint, then epochs of micro-batches. Every ``log.every_steps`` optimizer steps (and
before a checkpoint, at the end of an epoch, at the last step) one asynchronous all-reduce
carries the metrics and every rank's preemption flag, so all ranks take the same decision
(log, checkpoint, stop) at the same step.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpcdl.data.reader import ShardedDataset, ShardLoader
from hpcdl.errors import HpcdlError
from hpcdl.launch import init_distributed
from hpcdl.track import Tracker, rewind_jsonl
from hpcdl.train import preempt
from hpcdl.train.checkpoint import Checkpointer, tag_for
from hpcdl.train.config import TrainConfig, read_run_config
from hpcdl.train.models import build_model, loss_fn
from hpcdl.train.preflight import preflight, staged_data

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def train(
    run_dir: str | Path,
    flag: preempt.PreemptionFlag,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the training of ``run_dir`` on every rank; returns the result on each.

    ``on_epoch(epoch, metrics)`` runs on every rank after each validation (the metrics are
    all-reduced, so identical everywhere); an exception from it ends the run early on all ranks,
    with its ``wandb_tag`` attribute (e.g. ``pruned``) added to the W&B run."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    info = init_distributed()
    rank, world = info.rank, info.world_size
    spec = preflight(cfg, world, torch.cuda.is_available(), str(run_dir / "config.yaml"))
    deepspeed = import_deepspeed()

    # Model, data and engine. Seeding first gives every rank the same initial weights.
    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, spec.input_shape, spec.num_classes, cfg.model.options)
    train_path, val_path = staged_data(cfg, str(run_dir / "config.yaml"))
    train_loader = shard_loader(cfg, train_path, rank, world, train=True)
    val_loader = shard_loader(cfg, val_path, rank, world, train=False)
    accumulation = cfg.grad_accumulation(world)
    total_steps = cfg.epochs * len(train_loader) // accumulation
    total_steps = min(total_steps, cfg.max_steps or total_steps)
    engine = build_engine(deepspeed, cfg, model, world, total_steps)
    seed_everything(cfg.seed + 1 + rank)  # dropout differs per rank
    dtype, device = DTYPES[cfg.precision], engine.device
    compute_loss = loss_fn(cfg.loss.name, cfg.loss.label_smoothing)

    # Resume from the newest checkpoint that verifies, if any.
    checkpoints = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep)
    state = {"epoch": 0, "step": 0, "epoch_loss": 0.0, "epoch_correct": 0.0, "epoch_seen": 0.0}
    resumed = checkpoints.latest_valid()
    if resumed:
        client = checkpoints.load(engine, resumed)
        state = client["train"]
        train_loader.load_state_dict(client["loader"])
    else:
        train_loader.set_epoch(0)
    last_saved = state["step"] if resumed else None
    if rank == 0 and resumed:
        rewind_jsonl(run_dir / "metrics.jsonl", state["step"])
    tracker = make_tracker(cfg, run_dir, rank)
    tracker.log(
        "event",
        {
            "event": "resume" if resumed else "start",
            "step": state["step"],
            "checkpoint": resumed,
            "restarts": preempt.restarts(),
            "world_size": world,
            "accumulation": accumulation,
            "total_steps": total_steps,
        },
    )

    def save() -> str:
        nonlocal last_saved
        client_state = {"train": dict(state), "loader": train_loader.state_dict()}
        tag = checkpoints.save(engine, state["step"], client_state)
        last_saved = state["step"]
        tracker.log("event", {"event": "checkpoint", "step": state["step"], "tag": tag})
        return tag

    def record(done: list[StepStats]) -> bool:
        """Account and log reduced intervals; True if any rank asked to stop."""
        for st in done:
            state["epoch_loss"] += st.loss_sum
            state["epoch_correct"] += st.correct
            state["epoch_seen"] += st.seen
            tracker.log("step", st.row(cfg.batch.size))
        return any(st.stop for st in done)

    def stop_here() -> dict[str, Any]:
        """Some rank was signalled: all ranks checkpoint, then requeue (or fail clearly)."""
        tag = save() if last_saved != state["step"] else tag_for(state["step"])
        tracker.log("event", {"event": "preempted", "step": state["step"], "tag": tag})
        tracker.close()
        target = preempt.after_checkpoint(
            state["step"], tag, str(run_dir), cfg.job.max_requeues, rank
        )
        return {"status": "requeued", "step": state["step"], "job": target}

    try:  # any failure tags the W&B run 'failed' (pruning tags it 'pruned' below)
        # The loop. `sums` holds this rank's (loss x n, correct, n) since the last sync. Every
        # `log.every_steps` steps (and before a checkpoint, at the end of an epoch, at the last step)
        # `reducer` sums them over the ranks with every rank's preemption flag, one sync behind.
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        reducer = StepReducer()
        synced, train_time = state["step"], 0.0
        first_step = state["step"]
        last_val: tuple[float, float, int] | None = None
        tick = time.perf_counter()

        def sync() -> list[StepStats]:
            """Start reducing the steps since the last sync; returns the ones finished meanwhile."""
            nonlocal synced, train_time, tick
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            train_time += elapsed
            steps = state["step"] - synced
            synced = state["step"]
            lr = engine.get_lr()[0]
            done = reducer.push(
                state["step"], state["epoch"], sums, flag.requested, lr, elapsed / steps
            )
            sums.zero_()
            return done

        while state["epoch"] < cfg.epochs and state["step"] < total_steps:
            for batch in train_loader:
                x, y = to_device(batch, cfg, device, dtype)
                logits = engine(x)
                loss = compute_loss(logits, y)
                engine.backward(loss)
                boundary = engine.is_gradient_accumulation_boundary()
                engine.step()
                correct = (logits.argmax(-1) == y).sum()
                sums += torch.stack(
                    [loss.detach().double() * len(y), correct.double(), sums.new_tensor(len(y))]
                )
                if not boundary:
                    continue

                state["step"] += 1
                every = cfg.checkpoint.every_steps
                save_due = every and state["step"] % every == 0
                last = state["step"] >= total_steps
                if not (save_due or last or state["step"] % cfg.log.every_steps == 0):
                    continue
                done = sync()
                if save_due or last or any(st.stop for st in done):
                    done += reducer.drain()  # the state must be complete up to this step
                if record(done):
                    return stop_here()
                if save_due:
                    save()
                    tick = time.perf_counter()
                if last:
                    break
            if record((sync() if state["step"] > synced else []) + reducer.drain()):
                return stop_here()  # checked at the end of every epoch too

            # End of epoch: validate on every rank (all-reduced), log, move on.
            last_val = val_loss, val_acc, val_seen = evaluate(
                engine, val_loader, cfg, compute_loss, dtype
            )
            seen = max(state["epoch_seen"], 1)
            epoch_row = {
                "epoch": state["epoch"],
                "step": state["step"],
                "train_loss": state["epoch_loss"] / seen,
                "train_acc": state["epoch_correct"] / seen,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "val_samples": val_seen,
            }
            tracker.log("epoch", epoch_row)
            if on_epoch is not None:
                try:
                    on_epoch(state["epoch"], epoch_row)
                except Exception as exc:
                    tracker.tag(getattr(exc, "wandb_tag", "stopped"))
                    tracker.log(
                        "event", {"event": "stopped", "step": state["step"], "why": str(exc)}
                    )
                    tracker.close()
                    raise
            state.update(
                epoch=state["epoch"] + 1, epoch_loss=0.0, epoch_correct=0.0, epoch_seen=0.0
            )
            train_loader.set_epoch(state["epoch"])
            tick = time.perf_counter()

        # Done: a last checkpoint, the consolidated weights and the result, on rank 0.
        tag = save() if last_saved != state["step"] else tag_for(state["step"])
        weights = consolidated_state_dict(engine, cfg.zero_stage)
        final_val = last_val or evaluate(engine, val_loader, cfg, compute_loss, dtype)
        result = {
            "status": "completed",
            "step": state["step"],
            "epochs": state["epoch"],
            "checkpoint": tag,
            "val_loss": final_val[0],
            "val_acc": final_val[1],
            "world_size": world,
            "restarts": preempt.restarts(),
            "step_time_mean_s": train_time / max(state["step"] - first_step, 1),
        }
        if rank == 0:
            torch.save(weights, run_dir / "model.pt")
            (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        tracker.summary(result)
        tracker.log("event", {"event": "completed", **result})
        tracker.close()
        return result
    except Exception:
        tracker.tag("failed")
        tracker.close()
        raise


# -- building blocks ----------------------------------------------------------------------------
@dataclass
class StepStats:
    """The optimizer steps since the previous sync, summed over all ranks."""

    step: int
    epoch: int
    lr: float
    step_time_s: float
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    stop: bool = False

    def row(self, batch_size: int) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "loss": self.loss_sum / self.seen,
            "acc": self.correct / self.seen,
            "lr": self.lr,
            "samples_per_s": batch_size / self.step_time_s,
            "step_time_s": self.step_time_s,
        }


class StepReducer:
    """One all-reduce per sync for the metrics and every rank's preemption flag, started
    asynchronously and completed at the next sync (or by :meth:`drain`), so its latency hides
    behind compute instead of adding to it. Results arrive in order and are identical on every
    rank, hence so are the decisions taken from them."""

    def __init__(self) -> None:
        self.pending: tuple[StepStats, torch.Tensor, Any] | None = None

    def push(
        self, step: int, epoch: int, sums: torch.Tensor, stop: bool, lr: float, step_time_s: float
    ) -> list[StepStats]:
        """Start reducing ``sums`` (and the flag); returns what finished meanwhile."""
        done = self.drain()
        data = torch.cat([sums, sums.new_tensor([float(stop)])])
        work = dist.all_reduce(data, async_op=True)
        self.pending = (StepStats(step, epoch, lr, step_time_s), data, work)
        return done

    def drain(self) -> list[StepStats]:
        """Wait for the reduction in flight, if any."""
        if self.pending is None:
            return []
        stats, data, work = self.pending
        self.pending = None
        work.wait()
        stats.loss_sum, stats.correct, stats.seen, stop = data.tolist()
        stats.stop = stop > 0
        return [stats]


def import_deepspeed() -> Any:
    """Import DeepSpeed without its shared-memory CPU all-reduce op: that op only serves
    inference all-reduces, yet it is compiled (~60 s) on the first start of every fresh
    environment. Training uses the process group's all-reduce either way."""
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    return deepspeed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def deepspeed_config(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed config generated from ours, with ``cfg.deepspeed`` merged over it."""
    ds: dict[str, Any] = {
        "train_batch_size": cfg.batch.size,
        "train_micro_batch_size_per_gpu": cfg.batch.micro,
        "gradient_accumulation_steps": cfg.grad_accumulation(world),
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    if cfg.grad_clip:
        ds["gradient_clipping"] = cfg.grad_clip
    return _merge(ds, cfg.deepspeed)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def lr_factor(cfg: TrainConfig, total_steps: int) -> Any:
    """Step → learning-rate multiplier: linear warmup, then constant, cosine or linear decay."""
    s = cfg.schedule

    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.name == "constant":
            return 1.0
        progress = min(1.0, (step - s.warmup_steps) / max(1, total_steps - s.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.name == "cosine" else 1 - progress
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape

    return factor


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    params = model.parameters()
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def build_engine(
    deepspeed: Any, cfg: TrainConfig, model: torch.nn.Module, world: int, total_steps: int
) -> Any:
    factor = lr_factor(cfg, total_steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(cfg, model),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        config=deepspeed_config(cfg, world),
    )
    return engine


def to_device(
    batch: dict[str, torch.Tensor], cfg: TrainConfig, device: Any, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in the compute dtype (uint8 images scaled to [0, 1]), labels as int64."""
    x = batch[cfg.data.input].to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return x.to(dtype), batch[cfg.data.target].to(device, non_blocking=True).long()


@torch.no_grad()
def evaluate(
    engine: Any, loader: ShardLoader, cfg: TrainConfig, compute_loss: Any, dtype: torch.dtype
) -> tuple[float, float, int]:
    """(loss, accuracy, samples) on the validation set, summed over all ranks."""
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
    loader.set_epoch(0)
    for batch in loader:
        x, y = to_device(batch, cfg, engine.device, dtype)
        logits = engine(x)
        n = len(y)
        sums += torch.stack(
            [
                compute_loss(logits, y).double() * n,
                (logits.argmax(-1) == y).sum().double(),
                sums.new_tensor(n),
            ]
        )
    dist.all_reduce(sums)
    engine.train()
    loss_sum, correct, seen = sums.tolist()
    return loss_sum / seen, correct / seen, int(seen)


def consolidated_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full model weights (gathered from all ranks under ZeRO-3); a collective."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def make_tracker(cfg: TrainConfig, run_dir: Path, rank: int) -> Tracker:
    from hpcdl.site import load_site

    mode = cfg.log.wandb_mode
    if mode is None and rank == 0:
        try:
            mode = load_site(cfg.job.site).wandb_mode
        except HpcdlError:
            mode = "offline"
    return Tracker(
        run_dir,
        enabled=rank == 0,
        config=cfg.model_dump(mode="json"),
        name=run_dir.name,
        wandb=cfg.log.wandb,
        wandb_mode=mode or "disabled",
        wandb_project=cfg.log.wandb_project,
        wandb_group=cfg.log.wandb_group,
        wandb_id=cfg.log.wandb_id,
        wandb_tags=cfg.log.wandb_tags,
    )
