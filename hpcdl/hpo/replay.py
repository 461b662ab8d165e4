"""Pruners replayed on recorded learning curves: what a pruner would have spent, without training.

Random search runs every trial to the end, so its study holds each trial's whole curve. The
bench's pruned searches draw the same parameters in the same order (same seeded sampler) and
train deterministically, so a pruned run's trials are prefixes of those curves: feeding them,
epoch by epoch, to a pruner in an in-memory study of the same name gives the same decisions as a
live run (Hyperband picks a trial's bracket from a hash of the study's name and the trial's
number, hence the name). ``hpcdl bench hpo`` checks this against the live runs it makes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import optuna


@dataclass(frozen=True)
class Replayed:
    """One pruner on one seed's curves: trial-epochs until some epoch reached ``target`` (None:
    never), trial-epochs in all, and how many trials it pruned."""

    to_target: int | None
    total: int
    pruned: int
    stopped_at: tuple[int, ...]  # epochs each trial ran


def replay(
    curves: Sequence[Sequence[float]],
    pruner: optuna.pruners.BasePruner,
    target: float,
    study_name: str = "replay",
) -> Replayed:
    """Run ``curves`` (each trial's value after epoch 1, 2, ...; in trial order, one trial at a
    time as the bench runs them) through ``pruner``, maximizing."""
    study = optuna.create_study(
        study_name=study_name,
        storage=optuna.storages.InMemoryStorage(),
        pruner=pruner,
        direction="maximize",
    )
    spent, reached, pruned, stopped = 0, None, 0, []
    for curve in curves:
        trial = study.ask()
        ran, cut = 0, False
        for epoch, value in enumerate(curve, start=1):
            trial.report(value, epoch)
            ran = epoch
            if reached is None and value >= target - 1e-12:
                reached = spent + epoch
            # asked after every epoch, the last too, as a sweep's trial does: a trial pruned
            # after its last epoch ran as long but counts as pruned for the pruner (the median
            # pruner, for one, compares only with complete trials)
            if trial.should_prune():
                cut = True
                break
        spent += ran
        stopped.append(ran)
        if cut:
            pruned += 1
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif not curve:  # a trial that failed before its first report
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, curve[-1])
    return Replayed(reached, spent, pruned, tuple(stopped))


def curves_of(study: optuna.Study) -> list[list[float]]:
    """Each trial's reported values in step order, trials in number order (the bench runs one
    trial at a time, so number order is the order they ran in)."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    return [[v for _, v in sorted(t.intermediate_values.items())] for t in trials]


def epochs_run(study: optuna.Study) -> tuple[int, ...]:
    """How many epochs each trial of a live run reported, in trial order: what :func:`replay`'s
    ``stopped_at`` must equal for the replay to stand for that run."""
    return tuple(len(c) for c in curves_of(study))
