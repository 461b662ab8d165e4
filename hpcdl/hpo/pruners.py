"""ASHA with a cap on its rungs (``pruner: {name: asha, max_rungs: N}``).

Optuna's ``SuccessiveHalvingPruner`` keeps halving until a trial ends: with ``min_resource: 1``
and ``reduction_factor: 3`` a 12-epoch trial is judged after epochs 1, 3 and 9. On digits the
first rung separates good configurations from bad ones (a bad learning rate shows after one
epoch), but by epochs 3 and 9 the good ones have reached a plateau where they differ by one or two
of 180 validation samples, and the later rungs then cut on noise: in the bench's seeds they cut
the trial that reached random search's best more often than the first rung did
(docs/sweeps.md, pruning). After ``max_rungs`` rungs a trial runs to the end.

The pruner keeps no state of its own: a trial's value at a rung is its latest value at or before
the rung's step (:func:`value_at`), and its competitors are all trials (pruned ones too) that reported a step at or
past the rung, as in ASHA. With one trial at a time and a report every step this decides as
Optuna's pruner does (tested against it), so the uncapped case stays Optuna's own."""

from __future__ import annotations

from collections.abc import Mapping

import optuna
from optuna.study import StudyDirection


def rung_steps(min_resource: int, reduction_factor: int, max_rungs: int) -> list[int]:
    """The steps after which a trial is judged: ``min_resource * reduction_factor**i``."""
    return [min_resource * reduction_factor**i for i in range(max_rungs)]


def value_at(values: Mapping[int, float], step: int) -> float | None:
    """A trial's value at a rung's ``step``: its latest at or before it, else (an objective that
    reports every few steps) its first after it, the one it had when it passed the rung."""
    if not values:
        return None
    before = [s for s in values if s <= step]
    return values[max(before)] if before else values[min(values)]


def promotable(value: float, others: list[float], reduction_factor: int, maximize: bool) -> bool:
    """ASHA's rule: go on if ``value`` is among the best ``1/reduction_factor`` of itself and
    ``others`` (at least the best one: with fewer than ``reduction_factor`` values the best goes
    on, so the first trials are not cut before there is anything to compare with). NaN stops."""
    if value != value:  # NaN: a diverged trial
        return False
    ranked = sorted([*others, value], reverse=maximize)
    keep = max(1, len(ranked) // reduction_factor)
    bar = ranked[keep - 1]
    return value >= bar if maximize else value <= bar


class RungPruner(optuna.pruners.BasePruner):
    """Asynchronous successive halving at the given rungs: ``{step: reduction factor}``, a
    trial that reaches ``step`` goes on if it is among the best ``1/reduction factor`` of the
    trials that reached it (``pruner.rungs`` in a spec). Each rung has its own factor, so a
    sweep can cut hard where its metric separates good from bad configurations (a bad learning
    rate shows after one epoch) and gently where the good ones are close (docs/sweeps.md,
    pruning)."""

    def __init__(self, rungs: Mapping[int, int]):
        if not rungs or min(rungs) < 1 or min(rungs.values()) < 2:
            raise ValueError(f"{dict(rungs)}: give steps >= 1, each with a reduction factor >= 2")
        self.rungs = dict(sorted(rungs.items()))
        self.steps = list(self.rungs)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        earlier = [s for s in trial.intermediate_values if s < step]
        since = max(earlier, default=0)  # rungs passed since the previous report are due now
        due = [r for r in self.steps if since < r <= step]
        if not due:
            return False
        maximize = study.direction == StudyDirection.MAXIMIZE
        trials = study.get_trials(deepcopy=False)
        for rung in due:
            value = value_at(trial.intermediate_values, rung)
            assert value is not None  # the trial reported ``step``
            others = [
                v
                for t in trials
                if t.number != trial.number
                and t.last_step is not None
                and t.last_step >= rung
                and (v := value_at(t.intermediate_values, rung)) is not None
                and v == v  # a NaN was pruned, as in Optuna's pruner, which records no NaN
            ]
            if not promotable(value, others, self.rungs[rung], maximize):
                return True
        return False


class CappedSuccessiveHalvingPruner(RungPruner):
    """Asynchronous successive halving judged at ``max_rungs`` rungs at most."""

    def __init__(self, min_resource: int, reduction_factor: int, max_rungs: int):
        steps = rung_steps(min_resource, reduction_factor, max_rungs)
        super().__init__({step: reduction_factor for step in steps})
        self.reduction_factor = reduction_factor
