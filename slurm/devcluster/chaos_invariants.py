"""The invariants a sweep keeps whatever happens to its jobs, checked after a chaos run
(``chaos.py`` beside this file)."""

from __future__ import annotations

import json
from typing import Any


def check(sweep: Any) -> list[str]:
    """The invariants, as a list of what is broken (empty: all hold)."""
    from hpcdl.hpo.folder import FINISHED_SLOT

    spec, problems = sweep.spec, []
    slots = sweep.slots()
    if [s.slot for s in slots] != list(range(spec.trials)):
        problems.append(f"slot files {[s.slot for s in slots]}, expected 0..{spec.trials - 1}")
    for s in slots:
        if s.state not in FINISHED_SLOT - {"failed"}:
            problems.append(f"slot {s.slot} (trial {s.trial}) ended {s.state}: {s.error}")
    numbers = [s.trial for s in slots]
    if len(set(numbers)) != len(numbers):
        problems.append(f"a trial number is in two slots: {numbers}")
    trials = {t.number: t for t in sweep.study().get_trials(deepcopy=False)}
    orphans = sorted(set(trials) - set(numbers))
    if orphans:
        states = [trials[n].state.name for n in orphans]
        problems.append(f"study trials {orphans} ({states}) belong to no slot")
    if len(trials) != spec.trials:
        problems.append(f"the study has {len(trials)} trials for {spec.trials} slots")
    expect = {"complete": "COMPLETE", "pruned": "PRUNED", "failed": "FAIL"}
    for s in slots:
        t = trials.get(s.trial)
        if t is None:
            problems.append(f"slot {s.slot}: trial {s.trial} is not in the study")
        elif expect.get(s.state) != t.state.name:
            problems.append(f"slot {s.slot} is {s.state} but trial {s.trial} is {t.state.name}")
    problems += _check_runs(sweep, slots)
    if spec.final:
        result = sweep.paths.read_final_result()
        if result is None:
            problems.append("no final result")
        elif trials and result["trial"] != sweep.study().best_trial.number:
            problems.append("the final job retrained another trial than the best")
    return problems


def _check_runs(sweep: Any, slots: list[Any]) -> list[str]:
    """One W&B run id per trial, unique, kept by every attempt (the toy objective's
    ``attempts.jsonl``; W&B offline run folders where the objective started runs)."""
    problems = []
    ids = [s.run_id for s in slots]
    if len(set(ids)) != len(ids):
        problems.append(f"a W&B run id is shared by two slots: {ids}")
    for s in slots:
        trial_dir = sweep.paths.trial_dir(s)
        used = set()
        log = trial_dir / "attempts.jsonl"
        if log.is_file():
            used |= {json.loads(line)["run_id"] for line in log.read_text().splitlines() if line}
        used |= {p.name.rsplit("-", 1)[-1] for p in trial_dir.rglob("wandb/offline-run-*")}
        if used - {s.run_id}:
            problems.append(f"trial {s.trial} ran as W&B runs {sorted(used)} (slot: {s.run_id})")
    return problems
