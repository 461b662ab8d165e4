"""The sweep's final job (retrain the best parameters once every slot is finished) and the
``events.jsonl`` journal of what the sweep's jobs decided."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hpcdl.hpo.folder import SweepPaths
from hpcdl.hpo.pareto import best_trials
from hpcdl.hpo.protocol import TrialRequeued
from hpcdl.preemption import task_id
from hpcdl.util import append_jsonl, get_logger

log = get_logger(__name__)


def log_event(paths: SweepPaths, who: str, text: str) -> None:
    """One line of what the sweep's jobs decided (``events.jsonl``; shown by ``sweep status``)."""
    line = {"time": time.time(), "who": who, "job": task_id(), "text": text}
    append_jsonl(paths.events, line)
    log.info("%s: %s", who, text)


def final_main(sweep_dir: str) -> dict[str, Any]:
    """Retrain the best parameters on train+val and evaluate once on the held-out test split;
    exit cleanly, saying why, when a slot is not finished or the result is there already."""
    from hpcdl.hpo.alerts import send_from_job
    from hpcdl.hpo.trial import resolve_objective

    paths = SweepPaths(Path(sweep_dir))
    spec = paths.load_spec()
    missing = paths.missing_slots(range(spec.trials))
    if missing:
        why = (f"not run: {len(missing)} trial(s) not finished (slots {missing[:10]}); the "
               "follow-up job or 'hpcdl sweep resume' runs them, then a new final job")  # fmt: skip
        log_event(paths, "final", why)
        return {"skipped": why}
    if paths.has_final_result():
        return {"skipped": "the final result is there already"}
    from hpcdl.hpo.study import open_study  # Optuna only where a final job runs

    study = open_study(spec, paths.root)
    found = best_trials(study.get_trials(deepcopy=False), spec.directions)
    if not found:  # (a multi-objective spec has no final job: the spec refuses one)
        log_event(paths, "final", "not run: no trial completed (that meets the constraints)")
        send_from_job("failed", paths, f"sweep {spec.name}: no trial completed")
        return {"skipped": "no trial completed"}
    best = found[0]
    paths.final.mkdir(exist_ok=True)
    try:
        scores = resolve_objective(spec).final(dict(best.params), spec, paths.final)
    except TrialRequeued as exc:  # checkpointed on a preemption signal: the requeued job goes on
        return {"requeued": str(exc)}
    result = {"trial": best.number, spec.metric: best.values[0], "params": best.params, **scores}
    paths.write_final_result(result)
    log_event(paths, "final", f"retrained trial {best.number}: result written")
    send_from_job("finished", paths, f"sweep {spec.name} finished: best trial {best.number}, "
                  f"{spec.metric}={best.value:.4g}")  # fmt: skip
    return result
