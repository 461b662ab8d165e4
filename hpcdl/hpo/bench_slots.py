"""``hpcdl bench hpo --slots``: how much of the Slurm slot time a sweep trains, with warm workers
(the default) and with ``trials_per_task: 1``, on the same sweep and site.

For each mode the sweep runs once (no final job), then:

- **trial seconds**: each trial's own time, from its claim to its result (the workers' journals);
- **slot seconds**: ``ElapsedRaw`` of every array task of the sweep, from Slurm's accounting;
- **training seconds**: trial seconds less each trial's set-up (below);
- **efficiency** = training seconds / slot seconds, and the issue's variant: trial seconds /
  (parallelism x the wall time from the first task's start to the last trial's result);
- **overhead per trial** = (slot seconds - training seconds) / trials: what each trial costs on
  top of its training (scheduler round trip, interpreter, imports, model, engine, W&B...);
- **set-up per trial**: from a trial's claim to its training start (the trainer's ``start``
  event, after model, data, engine and W&B set-up), median: the part of a trial's own time
  that is not training.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from hpcdl.hpo.spec import SweepSpec, load_spec
from hpcdl.hpo.sweep import Sweep
from hpcdl.hpo.worker import read_journals
from hpcdl.scheduler import FINISHED
from hpcdl.scheduler.accounting import task_times
from hpcdl.util import read_jsonl

MODES = {"warm workers": None, "one trial per task": 1}


def slot_efficiency(
    spec_path: Path, site: str, trials: int, parallelism: int, stamp: str
) -> dict[str, dict[str, Any]]:
    """Run SPEC's sweep on ``site`` once per mode (one after the other) and measure each."""
    base = load_spec(spec_path)
    out = {}
    for label, per_task in MODES.items():
        data = base.model_dump()
        data.update(
            name=f"bench-slots-{'warm' if per_task is None else 'single'}-{stamp}",
            trials=trials,
            parallelism=parallelism,
            trials_per_task=per_task,
            final=False,
            resources={**base.resources.model_dump(), "site": site},
        )
        sweep = Sweep(SweepSpec.model_validate(data))
        sweep.run()
        sweep.wait(timeout=3600)
        _until_ended(sweep)
        out[label] = measure(sweep)
    return out


def _until_ended(sweep: Sweep, timeout: float = 300) -> None:
    """The last tasks end a moment after the last result (and the accounting lags)."""
    deadline = time.monotonic() + timeout
    while any(j.state not in FINISHED for j in sweep.lifecycle.jobs(("array", "workers"))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the tasks of sweep {sweep.spec.name} did not end")
        time.sleep(2)


def measure(sweep: Sweep) -> dict[str, Any]:
    """The figures of one finished sweep (see the module's docstring)."""
    trials = [ln for lines in read_journals(sweep.paths).values() for ln in lines
              if ln["event"] == "trial"]  # fmt: skip
    jobs = [j.handle.job_id for j in sweep.lifecycle.jobs(("array", "workers"))]
    rows = [r for r in _ended_rows(jobs) if r.start is not None]
    trial_s = sum(t["ended"] - t["claimed"] for t in trials)
    setups = [_setup_s(sweep, t) for t in trials]
    # training: from the trainer's start event (set-up done) to the result; an objective
    # without that event counts from the claim
    train_s = trial_s - sum(s for s in setups if s is not None)
    slot_s = float(sum(r.elapsed_s for r in rows))
    first = min(r.start.timestamp() for r in rows if r.start is not None)
    wall = max(t["ended"] for t in trials) - first
    known = [s for s in setups if s is not None]
    return {
        "trials": len(trials),
        "tasks": len(rows),
        "trial_s": trial_s,
        "train_s": train_s,
        "slot_s": slot_s,
        "efficiency": train_s / slot_s if slot_s else 0.0,
        "efficiency_wall": trial_s / (sweep.spec.parallelism * wall) if wall > 0 else 0.0,
        "overhead_per_trial_s": (slot_s - train_s) / len(trials) if trials else 0.0,
        "setup_median_s": statistics.median(known) if known else None,
        "pruned": sum(s.state == "pruned" for s in sweep.slots()),
    }


def _ended_rows(jobs: list[str], timeout: float = 60) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = task_times(jobs)
        if (rows and all(r.end is not None for r in rows)) or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def _setup_s(sweep: Sweep, line: dict[str, Any]) -> float | None:
    """Claim -> the trainer's start event of that trial (None: an objective without one)."""
    slot = sweep.paths.read_slot(line["slot"])
    if slot is None:
        return None
    metrics = sweep.paths.trial_dir(slot) / "metrics.jsonl"
    for row in read_jsonl(metrics):
        started = row.get("kind") == "event" and row.get("event") in ("start", "resume")
        if started and row["time"] >= line["claimed"] - 1:
            return float(row["time"] - line["claimed"])
    return None


def render(result: dict[str, dict[str, Any]], site: str, parallelism: int) -> list[str]:
    """The comparison as text lines, one row per mode."""
    head = (f"{'mode':<20} {'trials':>6} {'tasks':>5} {'trial s':>8} {'train s':>8} {'slot s':>7} "
            f"{'eff.':>5} {'eff. wall':>9} {'overhead/trial':>14} {'set-up med.':>11}")  # fmt: skip
    lines = [f"slot efficiency on {site}, {parallelism} slots: eff. = training seconds / task "
             "slot seconds (sacct); eff. wall = trial seconds (claim -> result) / (slots x wall "
             "time); overhead/trial = (slot - training seconds) / trials; set-up = claim -> "
             "training start", head]  # fmt: skip
    for label, r in result.items():
        setup = "-" if r["setup_median_s"] is None else f"{r['setup_median_s']:.2f} s"
        lines.append(
            f"{label:<20} {r['trials']:>6} {r['tasks']:>5} {r['trial_s']:>8.1f} "
            f"{r['train_s']:>8.1f} {r['slot_s']:>7.0f} {r['efficiency']:>5.2f} "
            f"{r['efficiency_wall']:>9.2f} {r['overhead_per_trial_s']:>12.1f} s {setup:>11}"
        )
    return lines
