"""``hpcdl bench hpo``: what pruning saves (ASHA and Hyperband vs. random search without pruning,
same sampler and trial budget, over several seeds), and how fast a 1,000-trial sweep is submitted
and inspected on Slurm."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from hpcdl.errors import ConfigError
from hpcdl.hpo.replay import curves_of, epochs_run, replay
from hpcdl.hpo.spec import SweepSpec, load_spec
from hpcdl.hpo.storage import study_name
from hpcdl.hpo.study import make_pruner
from hpcdl.hpo.sweep import Sweep
from hpcdl.scheduler import job_states
from hpcdl.util import get_logger

log = get_logger(__name__)

#: The searches the pruning comparison runs for every seed: the same seeded random sampler
#: without a pruner (the reference), with ASHA and with Hyperband.
SEARCHES = ("random", "asha", "hyperband")


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: a count N (seeds 0..N-1, the bench's default seeds), a range A-B or a list
    a,b,c. Ranges and lists let a figure be taken on seeds held out from the ones its settings
    were picked on, without training the picked ones again."""
    text = text.strip()
    try:
        if "," in text:
            seeds = [int(x) for x in text.split(",")]
        elif "-" in text[1:]:
            lo, hi = (int(x) for x in text.split("-", 1))
            seeds = list(range(lo, hi + 1)) if lo <= hi else []
        else:
            count = int(text)  # a count: seed 0 alone is 0-0
            if count < 1:
                raise ConfigError("", "--seeds", f"{count} must be >= 1")
            return list(range(count))
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError("", "--seeds", f"{text!r}: give a count N (seeds 0..N-1), a range A-B "
                          "or a list a,b,c of distinct seeds >= 0")  # fmt: skip
    return seeds


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


#: What decides a search's trials and their curves: a sweep read back (``--reuse``) must have
#: run with the same (its name, train path and resources may differ: not what it trained).
SAME_SEARCH = ("objective", "space", "sampler", "pruner", "pbt", "metric", "direction",
               "trials", "overrides")  # fmt: skip


def differs(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The fields of :data:`SAME_SEARCH` on which a stored sweep's spec differs from the one
    the bench would run now."""
    return [k for k in SAME_SEARCH if stored.get(k) != wanted.get(k)]


def run_or_reuse(spec: SweepSpec, reuse: bool) -> Sweep:
    """Run ``spec``'s sweep and wait; with ``reuse``, a finished sweep of that name (an earlier
    bench run with the same stamp) is read back instead, if it searched the same way. Training
    is deterministic, so a reused search is the one the bench would run again (see
    :mod:`hpcdl.hpo.replay`); a bench stopped halfway resumes without training twice."""
    sweep = Sweep(spec)
    if reuse and sweep.paths.spec.exists():
        stored = sweep.paths.load_spec()
        where = f"sweep {spec.name} ({sweep.paths.root})"
        bad = differs(stored.model_dump(mode="json"), spec.model_dump(mode="json"))
        if bad:
            raise ConfigError("--reuse", ", ".join(bad), f"{where} ran with other settings: "
                              "give another stamp")  # fmt: skip
        old = Sweep(stored, source=str(sweep.paths.spec))
        if not old.finished():
            raise ConfigError("--reuse", "", f"{where} is not finished: give another stamp")
        log.info("reusing %s", where)
        return old
    sweep.run()
    sweep.wait(timeout=3600)
    return sweep


def _search(
    base: SweepSpec, label: str, seed: int, common: dict[str, Any], stamp: str,
    reuse: bool = False,
) -> Sweep:  # fmt: skip
    pruner: dict[str, Any] = (
        {"name": "none"} if label == "random" else base.pruner.model_dump() | {"name": label}
    )
    if label == "hyperband":  # SPEC's max_rungs or rungs are ASHA's; Hyperband has brackets
        pruner["max_rungs"] = pruner["rungs"] = None
    spec = SweepSpec.model_validate(
        {**base.model_dump(), **common, "pruner": pruner,
         "sampler": {"name": "random", "seed": seed}, "name": f"bench-{label}-s{seed}-{stamp}"}
    )  # fmt: skip
    return run_or_reuse(spec, reuse)


def _compare(runs: dict[str, tuple[Sweep, float]]) -> dict[str, Any]:
    """One seed: each search's trial-epochs to reach random search's best, as a ratio too."""
    _, _, target = _epochs_to_reach(runs["random"][0], float("inf"))
    out: dict[str, Any] = {"target": target}
    reference, reference_total, _ = _epochs_to_reach(runs["random"][0], target)
    out["replayed"] = replayed(runs, target, reference)
    for label, (sweep, seconds) in runs.items():
        reach, total, best = _epochs_to_reach(sweep, target)
        out[label] = {
            "epochs_to_target": reach, "epochs_total": total, "best": best, "seconds": seconds,
            "pruned": sum(s.state == "pruned" for s in sweep.slots()),
            "ratio_to_target": None if reach is None or not reference else reach / reference,
            "ratio_total": total / reference_total if reference_total else None,
        }  # fmt: skip
    return out


def replayed(
    runs: dict[str, tuple[Sweep, float]], target: float, reference: int | None
) -> dict[str, Any]:
    """Optuna's ASHA without SPEC's ``max_rungs`` (SPEC's min_resource and reduction factor),
    replayed on random search's curves (:mod:`hpcdl.hpo.replay`) instead of trained again; and
    whether replaying the live pruners gives the epochs each of their trials ran (it must, or
    the replayed figure stands for nothing)."""
    random_study = runs["random"][0].study()
    curves = curves_of(random_study)
    live = {label: runs[label][0] for label in ("asha", "hyperband")}
    agrees = all(
        replay(curves, make_pruner(s.spec), target, study_name(s.spec)).stopped_at
        == epochs_run(s.study())
        for s in live.values()
    )
    p = live["asha"].spec.pruner
    uncapped = replay(curves, optuna.pruners.SuccessiveHalvingPruner(
        min_resource=p.min_resource, reduction_factor=p.reduction_factor), target)  # fmt: skip
    ratio = None if uncapped.to_target is None or not reference else uncapped.to_target / reference
    return {"agrees": agrees, "asha_uncapped": {"epochs_to_target": uncapped.to_target,
            "epochs_total": uncapped.total, "ratio_to_target": ratio}}  # fmt: skip


def summarize_ratios(per_seed: list[dict[str, Any]], label: str, key: str) -> dict[str, Any]:
    """Median and spread over the seeds of one search's ratio; a seed whose search never
    reached the target counts as an infinite ratio (it is not left out)."""
    values = sorted(math.inf if s[label][key] is None else float(s[label][key]) for s in per_seed)
    q1, q3 = _quantile(values, 0.25), _quantile(values, 0.75)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1],
            "q1": q1, "q3": q3, "not_reached": sum(math.isinf(v) for v in values),
            "seeds": len(values)}  # fmt: skip


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of sorted ``values`` that keeps ``inf`` (a not-reached
    seed) instead of turning it into NaN as ``statistics.quantiles`` does."""
    pos = q * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    if lo == hi or values[lo] == values[hi]:
        return values[lo]
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def pruning(
    spec_path: Path,
    trials: int,
    epochs: int,
    stamp: str,
    seeds: list[int],
    on_progress: Callable[[int, int], None] | None = None,
    reuse: bool = False,
) -> dict[str, Any]:
    """For every seed, the same random-sampler sweep three times (no pruner, ASHA, Hyperband)
    on the local profile, one trial at a time; the ratios per seed and their median and
    spread over the seeds. ``reuse``: searches finished under ``stamp`` are read back."""
    base = load_spec(spec_path)
    common: dict[str, Any] = {
        "trials": trials,
        "parallelism": 1,  # trial order = execution order: the comparison is about epochs
        "final": False,
        "overrides": {**base.overrides, "epochs": epochs},
        "resources": {**base.resources.model_dump(), "site": "local"},
    }
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        runs = {}
        for label in SEARCHES:
            start = time.monotonic()
            sweep = _search(base, label, seed, common, stamp, reuse)
            runs[label] = (sweep, time.monotonic() - start)
            if on_progress is not None:
                on_progress(len(per_seed) * len(SEARCHES) + len(runs), len(seeds) * len(SEARCHES))
        per_seed.append({"seed": seed, **_compare(runs)})
    summary = {
        label: {key: summarize_ratios(per_seed, label, key)
                for key in ("ratio_to_target", "ratio_total")}
        for label in SEARCHES[1:]
    }  # fmt: skip
    summary["asha_uncapped"] = {"ratio_to_target": summarize_ratios(
        [s["replayed"] for s in per_seed], "asha_uncapped", "ratio_to_target")}  # fmt: skip
    return {"trials": trials, "epochs": epochs, "seeds": per_seed, "summary": summary}


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
