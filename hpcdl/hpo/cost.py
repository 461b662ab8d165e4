"""What a sweep cost: per trial, to reach the best, what pruning saved, idle slot time.

Two clocks, each for what it knows:

- **Trial time** is the workers' own (:mod:`hpcdl.hpo.budget`): each attempt's claim to end,
  times the nodes (or GPUs) a trial holds. It is what a trial cost, and what the budget counts.
- **Held time** is Slurm's (sacct, :func:`hpcdl.scheduler.accounting.job_usage`): node-hours of
  the sweep's trial jobs (arrays and warm workers). Held minus trial time is **idle slot time**:
  start-up, imports, workers waiting for a claim or on the final job. The local profile has no
  sacct: held and idle are then unknown (None), never guessed.

Pruning's saving is an estimate: each pruned trial would have cost the median complete trial,
so it saved that minus what it did cost (never below 0).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from hpcdl.hpo.budget import Span, per_trial, read_journals, span_seconds, spans
from hpcdl.hpo.folder import FINISHED_SLOT, Slot
from hpcdl.hpo.sweep import Sweep
from hpcdl.scheduler.efficiency import Usage


@dataclass(frozen=True)
class TrialCost:
    """One trial's cost in ``unit`` (all its attempts), its state, value and last end time."""

    slot: int
    trial: int
    state: str
    value: float | None
    hours: float
    ended: float | None


@dataclass(frozen=True)
class SweepCost:
    """A sweep's figures (``None``: unknown: nothing finished, or no accounting)."""

    unit: str
    trials: list[TrialCost]
    used: float  # trial time, summed
    per_trial: float | None  # mean over finished trials
    to_best: float | None  # trial time of the trials that ended by the best one's end
    best_trial: int | None
    pruning_saved: float | None
    held: float | None  # sacct: the trial jobs' allocations
    idle: float | None  # held - used
    other: float | None = None  # sacct: final and follow-up jobs


def trial_costs(all_spans: list[Span], slots: list[Slot], held: int, now: float,
                limit_s: float) -> list[TrialCost]:  # fmt: skip
    """One row per sampled trial, in slot order: its attempts' time x nodes (or GPUs) held."""
    seconds: dict[int, float] = {}
    ended: dict[int, float] = {}
    for s in all_spans:
        seconds[s.slot] = seconds.get(s.slot, 0.0) + span_seconds(s, now, limit_s)
        if s.ended is not None:
            ended[s.slot] = max(ended.get(s.slot, 0.0), s.ended)
    return [
        TrialCost(s.slot, s.trial, s.state, s.value, seconds.get(s.slot, 0.0) * held / 3600,
                  ended.get(s.slot) if s.state in FINISHED_SLOT else None)
        for s in sorted(slots, key=lambda s: s.slot)
    ]  # fmt: skip


def summarize(costs: list[TrialCost], maximize: bool, unit: str, held: float | None = None,
              other: float | None = None) -> SweepCost:  # fmt: skip
    """The sweep's figures from its trials' costs (pure: ``held`` and ``other`` from sacct)."""
    finished = [c for c in costs if c.state in FINISHED_SLOT]
    used = sum(c.hours for c in costs)
    complete = [c for c in finished if c.state == "complete" and c.value is not None]
    best = None
    if complete:
        best = (max if maximize else min)(complete, key=lambda c: c.value or 0.0)
    to_best = None
    if best is not None and best.ended is not None:
        to_best = sum(c.hours for c in finished if c.ended is not None and c.ended <= best.ended)
    pruned = [c for c in finished if c.state == "pruned"]
    saved = None
    if pruned and complete:
        median = statistics.median(c.hours for c in complete)
        saved = sum(max(0.0, median - c.hours) for c in pruned)
    return SweepCost(
        unit, costs, used, sum(c.hours for c in finished) / len(finished) if finished else None,
        to_best, best.trial if best else None, saved, held,
        None if held is None else max(0.0, held - used), other,
    )  # fmt: skip


def sweep_cost(sweep: Sweep, now: float | None = None) -> SweepCost:
    """Read the sweep folder (and sacct, on Slurm): :func:`summarize` of its trials."""
    from hpcdl.config import parse_time

    spec = sweep.spec
    unit = spec.budget.unit if spec.budget else (
        "GPU-hours" if spec.resources.gpus_per_node else "node-hours")  # fmt: skip
    minutes = parse_time(spec.resources.time)
    limit = float("inf") if minutes is None else minutes * 60.0
    slots = sweep.slots()
    costs = trial_costs(spans(read_journals(sweep.paths), slots), slots, per_trial(spec, unit),
                        time.time() if now is None else now, limit)  # fmt: skip
    held, other = _held(sweep, unit)
    return summarize(costs, spec.direction == "maximize", unit, held, other)


def _held(sweep: Sweep, unit: str) -> tuple[float | None, float | None]:
    """sacct's node- (or GPU-) hours of the trial jobs and of the others; None off Slurm."""
    from hpcdl.scheduler.accounting import job_usage

    subs: list[dict[str, Any]] = sweep.lifecycle.submissions()
    if not sweep.lifecycle.queued or not subs:
        return None, None
    return held_hours(subs, job_usage(sorted(_kinds(subs))), unit)


def _kinds(subs: list[dict[str, Any]]) -> dict[str, str]:
    """``{Slurm job id: kind}`` of every submission, each part of a split array included."""
    kind: dict[str, str] = {}
    for s in subs:
        for part in [s["job_id"], *(p["job_id"] for p in s.get("parts", []))]:
            kind[part] = s["kind"]
    return kind


def held_hours(subs: list[dict[str, Any]], usage: list[Usage], unit: str) -> tuple[float, float]:
    """(trial jobs', other jobs') node- or GPU-hours: a row is a trial job's when its job id
    (``123`` of ``123_4``) is a worker or trial array's (``submissions.jsonl``'s kinds)."""
    kind = _kinds(subs)
    hours = {"trials": 0.0, "other": 0.0}
    for u in usage:
        side = "trials" if kind.get(u.task.split("_")[0]) in ("array", "workers") else "other"
        hours[side] += u.gpu_hours if unit == "GPU-hours" else u.node_hours
    return hours["trials"], hours["other"]
