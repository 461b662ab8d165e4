"""The training loop: a DeepSpeed engine over hpcdl shard datasets, exactly resumable.

Read :class:`Trainer` top to bottom, :meth:`Trainer.run` first: set up (ranks, model, data,
engine), resume from the newest valid checkpoint, then epochs of micro-batches, each epoch ending
with a validation. Every ``log.every_steps`` optimizer steps (and before a checkpoint, at the end
of an epoch, at the last step) one asynchronous all-reduce carries the metrics and every rank's
preemption flag, so all ranks take the same decision (log, checkpoint, stop) at the same step.

Every method runs on every rank, in the same order: most of them contain collectives.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from hpcdl import preemption
from hpcdl.data.reader import ShardLoader
from hpcdl.launch import init_distributed
from hpcdl.preemption import StopFlag
from hpcdl.track import Tracker, rewind_jsonl
from hpcdl.train import start_gc
from hpcdl.train.async_checkpoint import asynchronous, save_seconds
from hpcdl.train.checkpoint import Checkpointer, tag_for
from hpcdl.train.config import preemption_settings, read_run_config, read_site_values
from hpcdl.train.engine import (
    DTYPES,
    build_engine,
    consolidated_state_dict,
    import_deepspeed,
    needs_universal,
    retune,
    seed_everything,
    to_device,
    validate,
)
from hpcdl.train.loaders import shard_loader
from hpcdl.train.models import build_model, loss_fn
from hpcdl.train.preflight import preflight, staged_data
from hpcdl.train.steps import StepMeter, StepStats, agreed_stop_signal
from hpcdl.train.stop import StopTraining, stop_tag
from hpcdl.train.tracking import make_tracker
from hpcdl.util import atomic_write_json, configure_logging

OnEpoch = Callable[[int, dict[str, float]], None]


def train(run_dir: str | Path, flag: StopFlag, on_epoch: OnEpoch | None = None) -> dict[str, Any]:
    """Run (or resume) the training of ``run_dir`` on every rank; returns the result on each.

    ``on_epoch(epoch, metrics)`` runs on every rank after each validation (the metrics are
    all-reduced, so identical everywhere); an exception from it ends the run early on all ranks
    and is re-raised. A :class:`~hpcdl.train.stop.StopTraining` adds its ``tag`` (e.g.
    ``pruned``) to the W&B run; any other exception the tag ``stopped``."""
    return Trainer(run_dir, flag, on_epoch).run()


@dataclass
class TrainState:
    """Where the run is: stored in every checkpoint (``client_state["train"]``, the same keys as
    before this class existed), restored on resume. The sums are this epoch's so far."""

    epoch: int = 0
    step: int = 0
    epoch_loss: float = 0.0
    epoch_correct: float = 0.0
    epoch_seen: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainState:
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def add(self, stats: StepStats) -> None:
        """Account one reduced interval of steps into this epoch's sums."""
        self.epoch_loss += stats.loss_sum
        self.epoch_correct += stats.correct
        self.epoch_seen += stats.seen

    def next_epoch(self) -> None:
        self.epoch += 1
        self.epoch_loss = self.epoch_correct = self.epoch_seen = 0.0


class Trainer:
    """The training of one run folder on this rank. :meth:`run` is the whole of it."""

    # Set by setup().
    rank: int
    world: int
    train_loader: ShardLoader
    val_loader: ShardLoader
    accumulation: int
    total_steps: int
    engine: Any
    dtype: torch.dtype
    device: Any
    compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    checkpoints: Checkpointer
    found: tuple[str | None, int, Path | None]  # the checkpoint to resume: Checkpointer.find
    # Set by start_tracking() and run().
    tracker: Tracker
    meter: StepMeter

    def __init__(self, run_dir: str | Path, flag: StopFlag, on_epoch: OnEpoch | None = None):
        self.run_dir, self.flag, self.on_epoch = Path(run_dir), flag, on_epoch
        self.cfg = read_run_config(self.run_dir)
        self.site_values = read_site_values(self.run_dir)  # what the site decided at submission
        settings = preemption_settings(self.site_values, self.cfg.job.site)
        self.policy = preemption.configure(flag, settings)  # the flag listens to its signals
        self.state = TrainState()
        self.last_saved: int | None = None  # the step of this run's newest checkpoint
        self.last_val: tuple[float, float, int] | None = None  # the newest validation
        self.stop_at_step: StopTraining | None = None  # raised after the next optimizer step
        self.timing: dict[str, float] = {}  # training time of the processes before this one

    def run(self) -> dict[str, Any]:
        """Set up, resume, train epoch by epoch; returns the result (or the requeue)."""
        configure_logging()  # the job's stderr is its log: warnings (corrupt checkpoints) go there
        self.setup()
        self.start_tracking(self.resume())
        start_gc.resume()  # set up: the collector paused for the imports runs again
        try:  # any failure tags the W&B run 'failed' (a stop from on_epoch tags it first)
            self.meter = StepMeter(self.device, self.state.step, self.timing)
            while self.epoch_open():
                if self.run_epoch():
                    return self.stop_for_preemption()
                self.end_epoch()
            return self.finish()
        except Exception:
            # a save in flight is finished if it can be (it never waits for a collective)
            self.checkpoints.wait(timeout=60, raise_errors=False)
            self.tracker.tag("failed")
            self.tracker.close()
            raise

    # -- set up and resume ---------------------------------------------------------------------
    def setup(self) -> None:
        """Ranks, model, data and engine. Seeding first gives every rank the same weights."""
        cfg, where = self.cfg, str(self.run_dir / "config.yaml")
        info = init_distributed()
        self.rank, self.world = info.rank, info.world_size
        spec = preflight(cfg, self.world, torch.cuda.is_available(), where)
        deepspeed = import_deepspeed()
        start_gc.freeze_imports()  # imported: what the run builds from here stays collectable
        seed_everything(cfg.seed)
        model = build_model(cfg.model.name, spec.input_shape, spec.num_classes, cfg.model.options)
        train_path, val_path = staged_data(cfg, where, self.site_values.get("scratch"))
        self.train_loader = shard_loader(cfg, train_path, self.rank, self.world, train=True)
        self.val_loader = shard_loader(cfg, val_path, self.rank, self.world, train=False)
        self.accumulation = cfg.grad_accumulation(self.world)
        total_steps = cfg.epochs * len(self.train_loader) // self.accumulation
        self.total_steps = min(total_steps, cfg.max_steps or total_steps)
        self.checkpoints = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                        asynchronous(cfg.checkpoint.async_save))  # fmt: skip
        # Found before the engine: one of another world size loads as a universal checkpoint.
        self.found = self.checkpoints.find(needs_universal(cfg))
        universal = self.found[2] is not None
        self.engine = build_engine(deepspeed, cfg, model, self.world, self.total_steps, universal)
        seed_everything(cfg.seed + 1 + self.rank)  # dropout differs per rank
        self.dtype, self.device = DTYPES[cfg.precision], self.engine.device
        self.compute_loss = loss_fn(cfg.loss.name, cfg.loss.label_smoothing)

    def resume(self) -> str | None:
        """Load the newest checkpoint that verifies, if any (engine, RNG, loader position and
        train state); returns its tag. Metrics logged after it are dropped: they come again."""
        resumed, _, universal = self.found
        if not resumed:
            self.train_loader.set_epoch(0)
            return None
        client = self.checkpoints.load(self.engine, resumed, universal)
        self.retuned = retune(self.engine, self.cfg)  # PBT: the config's rate, not the copy's
        if universal:
            self.checkpoints.drop_universal()
        self.state = TrainState.from_dict(client["train"])
        # another world size: the rest of the epoch is re-split over this run's ranks
        self.train_loader.load_state_dict(client["loader"])
        self.last_saved = self.state.step
        self.timing = client.get("timing") or {}
        if self.rank == 0:
            rewind_jsonl(self.run_dir / "metrics.jsonl", self.state.step, self.state.epoch)
        return resumed

    def start_tracking(self, resumed: str | None) -> None:
        """Open the metrics (after the rewind) and log the start or the resume."""
        self.tracker = make_tracker(self.cfg, self.run_dir, self.rank, self.site_values)
        event: dict[str, Any] = {
            "event": "resume" if resumed else "start",
            "step": self.state.step,
            "checkpoint": resumed,
            "restarts": preemption.restarts(),
            "world_size": self.world,
            "accumulation": self.accumulation,
            "total_steps": self.total_steps,
            # this process's CPU time so far (all threads): ``hpcdl bench start``'s set-up figure
            # that a loaded machine's scheduling does not move
            "cpu_s": round(sum(os.times()[:2]), 3),
        }
        if getattr(self, "retuned", None):  # what the resumed optimizer took from the config
            event["retuned"] = self.retuned
        if resumed and self.found[1] != self.world:
            event["checkpoint_world_size"] = self.found[1]
            event["resized"] = (
                f"resumed on {self.world} ranks from a checkpoint of {self.found[1]} ranks"
            )
        self.tracker.log("event", event)

    # -- one epoch -----------------------------------------------------------------------------
    def epoch_open(self) -> bool:
        """An epoch is left: steps to train, or steps trained without the epoch's row yet (a run
        resumed from a checkpoint of its last step taken before that epoch's validation)."""
        s = self.state
        return s.epoch < self.cfg.epochs and (s.step < self.total_steps or s.epoch_seen > 0)

    def run_epoch(self) -> bool:
        """Micro-batches until the epoch (or the run) ends; True if some rank asked to stop."""
        for batch in self.train_loader if self.state.step < self.total_steps else ():
            if not self.micro_step(batch):
                continue  # gradients accumulate until the optimizer steps
            self.state.step += 1
            if self.after_step():
                return True
            if self.state.step >= self.total_steps:
                break
        # The end of an epoch is a sync too: the epoch's sums must be complete for its row.
        pending = self.sync() if self.state.step > self.meter.synced else []
        return self.record(pending + self.meter.drain())

    def micro_step(self, batch: dict[str, torch.Tensor]) -> bool:
        """Forward and backward on one micro-batch, then the engine's step (an optimizer step
        only at a gradient-accumulation boundary); True if the optimizer stepped."""
        x, y = to_device(batch, self.cfg, self.device, self.dtype)
        logits = self.engine(x)
        loss = self.compute_loss(logits, y)
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        self.meter.add(loss, (logits.argmax(-1) == y).sum(), len(y))
        return bool(boundary)

    def after_step(self) -> bool:
        """After optimizer step ``state.step``: sync, log and checkpoint when due; True if some
        rank asked to stop (then nothing is saved here: :meth:`stop_for_preemption` does)."""
        self.log_committed()
        step, every, waiting = self.state.step, self.cfg.checkpoint.every_steps, self.stop_at_step
        save_due = (bool(every) and step % every == 0) or waiting is not None
        last = step >= self.total_steps
        if not (save_due or last or step % self.cfg.log.every_steps == 0):
            return False
        done = self.sync()
        if save_due or last or any(st.stop for st in done):
            done += self.meter.drain()  # the state must be complete up to this step
        if self.record(done):
            return True
        if save_due:
            self.save()
            self.meter.restart_clock()  # saving is not training time
        if waiting is not None:  # a checkpointing stop waited for this step (call_on_epoch)
            self.log_committed(wait=True)  # the caller copies it: committed before the stop
            raise self.stopped(waiting)
        return False

    def sync(self) -> list[StepStats]:
        """Start reducing the steps since the last sync (with this rank's preemption flag);
        returns the intervals whose reduction finished meanwhile."""
        lr = self.engine.get_lr()[0]
        return self.meter.sync(self.state.step, self.state.epoch, self.flag.requested, lr)

    def record(self, done: list[StepStats]) -> bool:
        """Account and log reduced intervals; True if any rank asked to stop."""
        for st in done:
            self.state.add(st)
            self.tracker.log("step", st.row(self.cfg.batch.size))
        return any(st.stop for st in done)

    def end_epoch(self) -> None:
        """Validate on every rank, log the epoch, let ``on_epoch`` end the run, move on."""
        self.last_val = val_loss, val_acc, val_seen = self.evaluate()
        s = self.state
        seen = max(s.epoch_seen, 1)
        row = {
            "epoch": s.epoch,
            "step": s.step,
            "train_loss": s.epoch_loss / seen,
            "train_acc": s.epoch_correct / seen,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "val_samples": val_seen,
        }
        self.tracker.log("epoch", row)
        if self.on_epoch is not None:
            self.call_on_epoch(row)
        s.next_epoch()
        self.train_loader.set_epoch(s.epoch)
        self.meter.restart_clock()  # validation is not training time

    def evaluate(self) -> tuple[float, float, int]:
        """(loss, accuracy, samples) on the validation set, all-reduced."""
        return validate(self.engine, self.val_loader, self.cfg, self.compute_loss, self.dtype)

    def call_on_epoch(self, row: dict[str, Any]) -> None:
        """The caller's callback; an exception from it stops the run (tagged, logged, raised)."""
        assert self.on_epoch is not None
        try:
            self.on_epoch(self.state.epoch, row)
        except Exception as exc:
            if isinstance(exc, StopTraining) and exc.checkpoint:  # resumed after its validation
                if self.engine.micro_steps % self.engine.gradient_accumulation_steps():
                    self.stop_at_step = exc  # the epoch's last micro-batches wait for a step
                    return  # that a checkpoint now would lose: saved and raised after it
                self.save_once()
                # PBT copies this checkpoint once the stop reaches it: an asynchronous save
                # must be committed (or its failure raised) first, never left in flight
                self.log_committed(wait=True)
            raise self.stopped(exc) from None

    def stopped(self, exc: Exception) -> Exception:
        """Tag, log and close the run that ``exc`` (from ``on_epoch``) ends; returns ``exc``."""
        self.tracker.tag(stop_tag(exc))
        self.tracker.log("event", {"event": "stopped", "step": self.state.step, "why": str(exc)})
        self.tracker.close()
        return exc

    # -- checkpoints and the end -------------------------------------------------------------
    def save(self) -> str:
        """A checkpoint of this step on all ranks, with the train state and loader position."""
        timing = self.meter.timing(self.meter.synced) if hasattr(self, "meter") else self.timing
        client_state = {"train": self.state.to_dict(), "loader": self.train_loader.state_dict(),
                        "timing": timing}  # fmt: skip
        tag = self.checkpoints.save(self.engine, self.state.step, client_state)
        self.last_saved = self.state.step
        if not self.checkpoints.asynchronous:  # blocked_s: the training time the save held
            self.tracker.log("event", {"event": "checkpoint", "step": self.state.step, "tag": tag,
                                       "blocked_s": round(self.checkpoints.last_blocked_s, 4)})  # fmt: skip
        return tag

    def log_committed(self, wait: bool = False) -> None:
        """The ``checkpoint`` events of asynchronous saves, once each is committed (``wait``:
        the one in flight first); a synchronous save logs its own."""
        if wait:
            self.checkpoints.wait()
        for step, tag, held in self.checkpoints.take_committed():
            self.tracker.log("event", {"event": "checkpoint", "step": step, "tag": tag,
                                       "blocked_s": round(held, 4)})  # fmt: skip

    def save_once(self) -> str:
        """The checkpoint of this step: saved now unless it already was."""
        return self.save() if self.last_saved != self.state.step else tag_for(self.state.step)

    def stop_for_preemption(self) -> dict[str, Any]:
        """Some rank was signalled: all ranks checkpoint, then requeue (or fail clearly)."""
        from hpcdl.scheduler import SlurmRequeue  # Slurm's commands: only on the requeue path

        own = getattr(self.flag, "received", None)
        agreed = agreed_stop_signal(int(own) if own else None, self.device)
        step, sig = self.state.step, preemption.received_signal(self.flag, agreed)
        late = preemption.grace_report(self.flag, self.policy, save_seconds(self.checkpoints))
        if late:  # this rank's own view: logged by rank 0 when it was signalled
            self.tracker.log("event", {**late, "step": step})
        tag = self.save_once()
        self.log_committed(wait=True)  # on disk and committed before the requeue
        self.tracker.log("event", {"event": "preempted", "step": step, "tag": tag, "signal": sig})
        self.tracker.close()
        target = preemption.after_checkpoint(
            step, tag, str(self.run_dir), self.cfg.job.max_requeues, self.rank, sig,
            slurm=SlurmRequeue(),
        )  # fmt: skip
        return {"status": "requeued", "step": step, "job": target}

    def finish(self) -> dict[str, Any]:
        """A last checkpoint, the consolidated weights and the result (files on rank 0)."""
        tag = self.save_once()
        self.log_committed(wait=True)  # the result names a committed checkpoint
        weights = consolidated_state_dict(self.engine, self.cfg.zero_stage)
        final_val = self.last_val or self.evaluate()
        result = {
            "status": "completed",
            "step": self.state.step,
            "epochs": self.state.epoch,
            "checkpoint": tag,
            "val_loss": final_val[0],
            "val_acc": final_val[1],
            "world_size": self.world,
            "restarts": preemption.restarts(),
            "step_time_mean_s": self.meter.mean_step_time(self.state.step),
        }
        if self.rank == 0:
            torch.save(weights, self.run_dir / "model.pt")
            atomic_write_json(self.run_dir / "result.json", result)
        self.tracker.summary(result)
        self.tracker.log("event", {"event": "completed", **result})
        self.tracker.close()
        return result
