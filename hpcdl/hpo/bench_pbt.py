"""``hpcdl bench hpo --pbt``: population-based training against random search, in trial-epochs.

For every seed, the same seeded random sampler twice on the local profile, one trial at a time
(so trial order is execution order, as in the pruning comparison of :mod:`hpcdl.hpo.bench`):
plain random search, then the same draws under PBT (``pbt: {interval_epochs, quantile}``; the
space's numeric parameters perturbed by 0.8 or 1.2). The figure: trial-epochs PBT spends until
some epoch of some trial reaches random search's best, as a fraction of what random search
spent; its median over the seeds (a seed PBT never reaches counts as infinite).

One trial at a time makes this the asynchronous PBT of a population that grows: a trial meets
the trials before it at each boundary (their recorded values and checkpoints there). A trial
that takes a better one's checkpoint counts only its own epochs, as every trial does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcdl.hpo.bench import _epochs_to_reach, _search, run_or_reuse, summarize_ratios
from hpcdl.hpo.spec import SweepSpec, load_spec
from hpcdl.hpo.sweep import Sweep


def pbt_name(seed: int, stamp: str, interval: int, quantile: float) -> str:
    """A PBT search's sweep name: its settings are in it, so that PBT with other settings can
    run under the stamp of recorded random searches (``--reuse``) beside an earlier PBT run."""
    return f"bench-pbt-i{interval}-q{quantile:g}-s{seed}-{stamp}"


def _pbt_search(base: SweepSpec, seed: int, common: dict[str, Any], stamp: str,
                interval: int, quantile: float, reuse: bool = False) -> Sweep:  # fmt: skip
    spec = SweepSpec.model_validate(
        {**base.model_dump(), **common, "pruner": {"name": "none"},
         "sampler": {"name": "random", "seed": seed},
         "name": pbt_name(seed, stamp, interval, quantile),
         "pbt": {"interval_epochs": interval, "quantile": quantile}}
    )  # fmt: skip
    return run_or_reuse(spec, reuse)


def pbt_comparison(
    spec_path: Path,
    trials: int,
    epochs: int,
    stamp: str,
    seeds: list[int],
    interval: int,
    quantile: float = 0.25,
    on_progress: Callable[[int, int], None] | None = None,
    reuse: bool = False,
) -> dict[str, Any]:
    """Per seed: random search and PBT (same draws), each one's trial-epochs to reach random
    search's best; the ratio PBT / random per seed and its median and spread. ``reuse``:
    searches finished under ``stamp`` are read back (:func:`hpcdl.hpo.bench.run_or_reuse`)."""
    base = load_spec(spec_path)
    common: dict[str, Any] = {
        "trials": trials,
        "parallelism": 1,
        "final": False,
        "overrides": {**base.overrides, "epochs": epochs},
        "resources": {**base.resources.model_dump(), "site": "local"},
    }
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        start = time.monotonic()
        random = _search(base, "random", seed, common, stamp, reuse)
        random_s = time.monotonic() - start
        if on_progress is not None:
            on_progress(2 * len(per_seed) + 1, 2 * len(seeds))
        start = time.monotonic()
        pbt = _pbt_search(base, seed, common, stamp, interval, quantile, reuse)
        pbt_s = time.monotonic() - start
        if on_progress is not None:
            on_progress(2 * len(per_seed) + 2, 2 * len(seeds))
        per_seed.append({"seed": seed, **compare(random, pbt, random_s, pbt_s)})
    return {"trials": trials, "epochs": epochs, "interval_epochs": interval,
            "quantile": quantile, "seeds": per_seed,
            "summary": summarize_ratios(per_seed, "pbt", "ratio_to_target")}  # fmt: skip


def compare(random: Sweep, pbt: Sweep, random_s: float, pbt_s: float) -> dict[str, Any]:
    """One seed's figures: the target (random search's best), each search's trial-epochs to
    reach it and in all, PBT's best, how many boundaries exploited."""
    _, _, target = _epochs_to_reach(random, float("inf"))
    out: dict[str, Any] = {"target": target}
    reference = None
    for label, sweep, seconds in (("random", random, random_s), ("pbt", pbt, pbt_s)):
        reach, total, best = _epochs_to_reach(sweep, target)
        reference = reach if label == "random" else reference
        out[label] = {"epochs_to_target": reach, "epochs_total": total, "best": best,
                      "seconds": round(seconds, 1),
                      "exploits": sum(e["action"] == "exploit" for s in sweep.slots()
                                      for e in s.pbt)}  # fmt: skip
    reach = out["pbt"]["epochs_to_target"]
    out["pbt"]["ratio_to_target"] = None if reach is None or not reference else reach / reference
    return out


def render(result: dict[str, Any]) -> list[str]:
    """The comparison as text: one line per seed, then the median."""
    lines = [f"PBT vs random search: {result['trials']} trials x {result['epochs']} epochs, "
             f"interval {result['interval_epochs']} epochs, quantile {result['quantile']}, "
             "one trial at a time, local profile"]  # fmt: skip
    for row in result["seeds"]:
        r, p = row["random"], row["pbt"]
        reach = "not reached" if p["epochs_to_target"] is None else str(p["epochs_to_target"])
        ratio = "-" if p["ratio_to_target"] is None else f"{p['ratio_to_target']:.2f}"
        lines.append(f"seed {row['seed']}: target {row['target']:.4f} (random's best); random "
                     f"reached it after {r['epochs_to_target']} trial-epochs, PBT after {reach} "
                     f"({ratio}); PBT best {p['best']:.4f}, {p['exploits']} exploits; "
                     f"{r['seconds']:.0f} s / {p['seconds']:.0f} s")  # fmt: skip
    s = result["summary"]
    lines.append(f"PBT / random, trial-epochs to random's best: median {s['median']:.2f}, "
                 f"quartiles {s['q1']:.2f}-{s['q3']:.2f}, range {s['min']:.2f}-{s['max']:.2f}, "
                 f"not reached {s['not_reached']}/{s['seeds']} seed(s)")  # fmt: skip
    return lines
