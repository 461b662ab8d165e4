"""``hpcdl bench hpo``: what pruning saves (ASHA vs. random search without pruning, same sampler
and trial budget), and how fast a 1,000-trial sweep is submitted and inspected on Slurm."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hpcdl.hpo.spec import SweepSpec, load_spec
from hpcdl.hpo.sweep import Sweep
from hpcdl.scheduler import job_states


def _epochs_to_reach(sweep: Sweep, target: float) -> tuple[int | None, int, float]:
    """(trial-epochs spent, in trial order, until some epoch of some trial reached ``target``;
    trial-epochs in all; best value reported). Trials run one at a time, so trial order is
    execution order and an intermediate (per-epoch) value counts as soon as it is reported."""
    spent, reached, best = 0, None, float("-inf")
    for trial in sorted(sweep.study().trials, key=lambda t: t.number):
        for epoch, value in sorted(trial.intermediate_values.items()):
            best = max(best, value)
            if reached is None and value >= target - 1e-12:
                reached = spent + epoch
        spent += max(trial.intermediate_values, default=0)
    return reached, spent, best


def pruning(spec_path: Path, trials: int, epochs: int, stamp: str) -> dict[str, Any]:
    """Run the same random-sampler sweep twice (no pruner, then ASHA) on the local profile."""
    base = load_spec(spec_path)
    common: dict[str, Any] = {
        "trials": trials,
        "parallelism": 1,  # trial order = submission order: the comparison is about epochs
        "final": False,
        "sampler": {"name": "random", "seed": base.sampler.seed or 0},
        "overrides": {**base.overrides, "epochs": epochs},
        "resources": {**base.resources.model_dump(), "site": "local"},
    }
    runs = {}
    for label, pruner in (
        ("random", {"name": "none"}),
        ("asha", base.pruner.model_dump() | {"name": "asha"}),
    ):
        spec = SweepSpec.model_validate(
            {**base.model_dump(), **common, "pruner": pruner, "name": f"bench-{label}-{stamp}"}
        )
        sweep = Sweep(spec)
        start = time.monotonic()
        sweep.run()
        sweep.wait(timeout=3600)
        runs[label] = (sweep, time.monotonic() - start)
    _, random_total, random_best = _epochs_to_reach(runs["random"][0], float("inf"))
    random_reach, _, _ = _epochs_to_reach(runs["random"][0], random_best)
    asha_reach, asha_total, asha_best = _epochs_to_reach(runs["asha"][0], random_best)
    return {
        "target": random_best,
        "random": {"epochs_to_target": random_reach, "epochs_total": random_total,
                   "best": random_best, "seconds": runs["random"][1]},
        "asha": {"epochs_to_target": asha_reach, "epochs_total": asha_total, "best": asha_best,
                 "seconds": runs["asha"][1],
                 "pruned": sum(s.state == "pruned" for s in runs["asha"][0].slots())},
    }  # fmt: skip


def submission(site: str, trials: int, stamp: str) -> dict[str, float]:
    """Time ``Sweep.run()`` and ``Sweep.status()`` for a large array, then cancel it."""
    spec = SweepSpec.model_validate(
        {
            "name": f"bench-submit-{stamp}",
            "objective": "hpcdl.hpo.bench:idle",
            "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
            "sampler": {"name": "random"},
            "trials": trials,
            "parallelism": 2,
            "final": False,
            "resources": {"site": site, "time": "00:05:00"},
        }
    )
    sweep = Sweep(spec)
    start = time.monotonic()
    array = sweep.run()[0]
    submit_s = time.monotonic() - start
    try:
        start = time.monotonic()
        sweep.status()
        status_s = time.monotonic() - start
        start = time.monotonic()
        states = job_states([array])[array.job_id]  # one sacct call for every task
        jobs_s = time.monotonic() - start
    finally:
        sweep.cancel()
    return {
        "submit_s": submit_s,
        "sweep_status_s": status_s,
        "job_states_s": jobs_s,
        "tasks": len(states),
    }


def idle(params: dict[str, Any], ctx: Any) -> float:
    """The objective of the submission benchmark: its tasks are cancelled before they matter."""
    time.sleep(30)
    return 0.0
