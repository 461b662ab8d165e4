"""Population-based training on warm workers, with hpcdl's exact checkpoints.

A PBT sweep (``pbt:`` in the spec, :mod:`hpcdl.hpo.pbt_spec`) runs :data:`pbt_objective` in
place of the trainer's objective. A trial trains in segments of ``interval_epochs``. At each
boundary the trainer saves a checkpoint and stops (``StopTraining(checkpoint=True)``); the trial
then

1. copies that checkpoint to ``trials/trial-N/pbt/epoch-E`` (what a worse trial may take later),
2. appends its value to ``SWEEP/pbt/scores.jsonl`` (the population's record),
3. ranks itself among the trials that reached epoch ``E`` (:func:`~hpcdl.hpo.pbt_spec.donor`);
   in the bottom quantile it *exploits* (its ``checkpoints/`` replaced by the better trial's
   copy, its parameters by the better trial's) and *explores* (:func:`~hpcdl.hpo.pbt_spec.perturb`),
4. records the decision in its slot (``Slot.pbt``: epoch, action, from which trial, the
   checkpoint copied, the parameters before and after),

and trains the next segment, resuming from the checkpoint in its folder: its own, or the one it
copied, exactly as a requeued run resumes (the same step, loader position and RNG states), with
the new learning rate and weight decay put into the loaded optimizer
(:func:`hpcdl.train.retune.retune`). A requeued PBT trial resumes with the parameters of its
slot's last decision.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from hpcdl.errors import ConfigError
from hpcdl.hpo.folder import SweepPaths
from hpcdl.hpo.objective import TrainObjective, _requeued, _run, _sample, trial_config
from hpcdl.hpo.pbt_spec import donor, perturb, perturbed_names, rng_for
from hpcdl.hpo.protocol import TrialContext
from hpcdl.hpo.spec import SweepSpec
from hpcdl.train.stop import StopTraining
from hpcdl.util import append_jsonl, atomic_write_text, get_logger, read_jsonl

log = get_logger(__name__)

BOUNDARY = "pbt"  # the StopTraining tag of a segment's end
#: Set in tests only: the point at which a PBT trial kills itself (:func:`_test_stop`).
KILL_AT_ENV = "HPCDL_PBT_KILL_AT"


def scores_file(sweep_root: Path) -> Path:
    return sweep_root / "pbt" / "scores.jsonl"


def scores_at(sweep_root: Path, epoch: int) -> dict[int, dict[str, Any]]:
    """Each trial's last record at ``epoch`` (a retried attempt may record it again)."""
    out: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(scores_file(sweep_root)):
        if row.get("epoch") == epoch:
            out[int(row["trial"])] = row
    return out


class PBTObjective(TrainObjective):
    """hpcdl's trainer in segments of ``pbt.interval_epochs``, exploiting and exploring between
    them."""

    name = "hpcdl.hpo.pbt:pbt_objective"

    def check(self, spec: SweepSpec) -> None:
        super().check(spec)
        assert spec.pbt is not None
        sample = {k: _sample(p) for k, p in spec.space.items()}
        epochs = trial_config(spec, sample, Path("/nonexistent/trial")).epochs
        if spec.pbt.interval_epochs >= epochs:
            raise ConfigError("", "pbt.interval_epochs", f"{spec.pbt.interval_epochs}: must be "
                              f"below the trials' epochs ({epochs})")  # fmt: skip

    def run(self, params: dict[str, Any], ctx: TrialContext) -> float:
        spec, slot = ctx.spec, ctx.slot
        assert spec.pbt is not None
        current, history = resume_point(ctx, params)
        decided = {int(e["epoch"]) for e in history}
        reported: set[int] = set()
        interval = spec.pbt.interval_epochs
        seen: dict[str, float] = {}  # the boundary a segment stopped at
        while True:
            cfg = trial_config(spec, current, ctx.trial_dir, wandb_group=spec.name,
                               wandb_id=slot.run_id, wandb_tags=[f"sweep:{spec.name}", "pbt"])  # fmt: skip
            seen.clear()

            def on_epoch(epoch: int, metrics: dict[str, Any], total: int = cfg.epochs) -> None:
                done, value = epoch + 1, float(metrics[spec.metric])
                if done not in reported:  # a resumed segment validates its first epoch again
                    reported.add(done)
                    ctx.report(done, value)
                if done % interval == 0 and done < total and done not in decided:
                    seen.update(epoch=done, value=value)
                    raise StopTraining(f"PBT boundary at epoch {done}", tag=BOUNDARY,
                                       checkpoint=True)  # fmt: skip

            try:
                result = _run(cfg, spec).execute(
                    on_epoch, flag=getattr(ctx, "flag", None), finish=False
                )
            except StopTraining as exc:
                if exc.tag != BOUNDARY:
                    raise
                event = self.boundary(ctx, current, int(seen["epoch"]), seen["value"])
                decided.add(event["epoch"])
                if event["params"] != current:  # the run folder's config changes with them
                    (ctx.trial_dir / "config.yaml").unlink(missing_ok=True)
                current = dict(event["params"])
                if ctx.note is not None:
                    ctx.note(event)
                settled(ctx.trial_dir)
                continue
            _requeued(result, f"trial {slot.trial}")
            return float(result[spec.metric])

    def boundary(
        self, ctx: TrialContext, params: dict[str, Any], epoch: int, value: float
    ) -> dict[str, Any]:
        """Snapshot, record, rank, and exploit and explore when the trial is among the worst;
        returns the decision (the slot's ``pbt`` record)."""
        spec, trial_dir, trial = ctx.spec, ctx.trial_dir, ctx.slot.trial
        assert spec.pbt is not None
        root = SweepPaths(trial_dir.parent.parent).root
        snapshot = snapshot_checkpoint(trial_dir, epoch)
        scores_file(root).parent.mkdir(exist_ok=True)
        append_jsonl(scores_file(root), {"trial": trial, "slot": ctx.slot.slot, "epoch": epoch,
                                         "value": value, "snapshot": str(snapshot),
                                         "params": params, "time": time.time()})  # fmt: skip
        rows = scores_at(root, epoch)
        rng = rng_for(spec.sampler.seed, trial, epoch)
        maximize = spec.direction == "maximize"
        chosen = donor(trial, {t: r["value"] for t, r in rows.items()}, spec.pbt.quantile,
                       maximize, rng)  # fmt: skip
        event: dict[str, Any] = {"epoch": epoch, "value": value, "action": "kept",
                                 "params": params, "population": len(rows)}  # fmt: skip
        better = rows[chosen] if chosen is not None else None
        if better is None or not own_snapshot(Path(better["snapshot"]), root, better["trial"]):
            if better is not None:  # the record names another folder: never copied
                log.warning("trial %d: trial %d's snapshot %s is not in this sweep's trials: "
                            "kept its own checkpoint", trial, chosen, better["snapshot"])  # fmt: skip
            return event
        names = perturbed_names(spec.space, spec.pbt)
        explored = perturb(better["params"], spec.space, names, spec.pbt.factors, rng)
        event = {**event, "action": "exploit", "from_trial": chosen, "from_value": better["value"],
                 "checkpoint": better["snapshot"], "params_before": params, "params": explored}  # fmt: skip
        # The decision is on disk before the checkpoint changes: a trial killed anywhere from
        # here to its slot's write finishes this very exploit when it resumes (resume_point),
        # instead of training the donor's weights with its old parameters.
        atomic_write_text(pending_file(trial_dir), json.dumps(event))
        take_checkpoint(Path(better["snapshot"]), trial_dir)
        _test_stop("exploit")
        log.info("trial %d at epoch %d (%s=%.4f): takes trial %d's checkpoint (%.4f), "
                 "parameters %s", trial, epoch, spec.metric, value, chosen, better["value"],
                 explored)  # fmt: skip
        return event


def resume_point(
    ctx: TrialContext, params: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The parameters a (re)started trial trains with and its decisions so far: those of its
    slot's last decision, else its first ones."""
    history = list(ctx.slot.pbt)
    pending = pending_file(ctx.trial_dir)
    if pending.is_file():  # killed inside an exploit: finish it (copy again, then record)
        event = json.loads(pending.read_text())
        if not any(e.get("epoch") == event["epoch"] for e in history):
            log.info("trial %d: finishing its exploit of trial %s's checkpoint at epoch %d "
                     "(stopped before its slot recorded it)", ctx.slot.trial,
                     event.get("from_trial"), event["epoch"])  # fmt: skip
            take_checkpoint(Path(event["checkpoint"]), ctx.trial_dir)
            (ctx.trial_dir / "config.yaml").unlink(missing_ok=True)  # the parameters changed
            if ctx.note is not None:
                ctx.note(event)
            history.append(event)
        pending.unlink()
    return (dict(history[-1]["params"]) if history else dict(params)), history


def pending_file(trial_dir: Path) -> Path:
    """An exploit decided but maybe not carried out and recorded yet (:meth:`boundary`)."""
    return trial_dir / "pbt" / "exploit.json"


def settled(trial_dir: Path) -> None:
    """The slot recorded the boundary's decision: nothing is left to finish on a resume."""
    pending_file(trial_dir).unlink(missing_ok=True)


def _test_stop(point: str) -> None:
    """Kill this process at ``point`` when ``HPCDL_PBT_KILL_AT`` names it: the tests' way to
    stop a trial inside a window that a real kill (a node lost, ``scancel``) only hits by
    chance."""
    if os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def own_snapshot(snapshot: Path, sweep_root: Path, trial: int) -> bool:
    """Whether ``snapshot`` (from the scores file) is a boundary copy of trial ``trial`` of this
    very sweep: a trial copies nothing else into its folder, whatever the file says."""
    folder = (sweep_root / "trials" / f"trial-{trial:05d}" / "pbt").resolve()
    where = snapshot.resolve()
    return where.parent == folder and where.name.startswith("epoch-") and where.is_dir()


def snapshot_checkpoint(trial_dir: Path, epoch: int) -> Path:
    """Copy the trial's newest checkpoint (the boundary's) to ``pbt/epoch-E``: complete (its
    manifest), then renamed into place, so a trial that takes it never sees half of it."""
    source = trial_dir / "checkpoints"
    tag = (source / "latest").read_text().strip()
    target = trial_dir / "pbt" / f"epoch-{epoch:05d}"
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source / tag, partial / tag)
    atomic_write_text(partial / "latest", tag + "\n")
    shutil.rmtree(target, ignore_errors=True)  # a retried attempt's copy of the same epoch
    partial.rename(target)
    return target


def take_checkpoint(snapshot: Path, trial_dir: Path) -> None:
    """Replace the trial's checkpoints by another trial's snapshot (the trainer resumes from
    its newest complete one, checked against its manifest)."""
    target = trial_dir / "checkpoints"
    partial = trial_dir / "checkpoints.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(snapshot, partial)
    shutil.rmtree(target, ignore_errors=True)
    _test_stop("replace")
    partial.rename(target)


pbt_objective = PBTObjective()
