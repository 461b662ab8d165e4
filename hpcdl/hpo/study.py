"""Optuna pieces for a sweep: the study (journal file or database, :mod:`hpcdl.hpo.storage`),
samplers, pruners."""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path
from typing import Any

import optuna

from hpcdl.hpo import store_timing
from hpcdl.hpo.conditions import active, draw_order
from hpcdl.hpo.folder import read_round
from hpcdl.hpo.space import Choice, Grid, IntRange, Uniform
from hpcdl.hpo.spec import SweepSpec
from hpcdl.hpo.storage import journal_storage, open_storage, study_name

optuna.logging.set_verbosity(optuna.logging.WARNING)


#: The journal storage on ``SWEEP/study.journal``; a sweep's own storage (journal or database)
#: is :func:`hpcdl.hpo.storage.open_storage`.
storage = journal_storage


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` on exhaustion, which only works inside
    ``study.optimize``; hpcdl sizes the sweep (trials <= grid points) itself."""

    def after_trial(self, study: optuna.Study, trial: Any, state: Any, values: Any) -> None:
        return None


def make_sampler(
    spec: SweepSpec, worker: int = 0, draw: tuple[int, ...] = ()
) -> optuna.samplers.BaseSampler:
    """The spec's sampler. Random-drawing samplers get one seed per worker process, or
    concurrent workers would draw identical parameters; ``draw`` names the process's place in
    the sweep's history (``(round, trials so far)``, :func:`open_study`), so that a resumed or
    requeued worker with the same index does not replay the draws of the one before it. The
    grid sampler keeps one seed, since it maps trial numbers to grid points through its seeded
    order."""
    s = spec.sampler
    if s.name == "grid":
        space = {k: list(p.values) for k, p in spec.space.items() if isinstance(p, Grid | Choice)}
        return _GridSampler(space, seed=s.seed)
    s = s.model_copy(update={"seed": None if s.seed is None else worker_seed(s.seed, worker, draw)})
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    # Constraints reach TPE, GP and NSGA-II through each trial's own constraint values
    # (Trial.set_constraint, Optuna 5), not a constraints_func: the deprecated way
    if s.name == "gp":
        return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials)


def worker_seed(seed: int, worker: int, draw: tuple[int, ...] = ()) -> int:
    """``seed + worker`` for the first round's workers (as before resumes existed); later
    draws hash every part, since sums collide (round 1's worker 0 = round 0's worker 1)."""
    if not any(draw):
        return seed + worker
    text = ":".join(str(x) for x in (seed, worker, *draw))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=p.warmup_epochs)
    if p.name == "asha" and p.rungs:
        from hpcdl.hpo.pruners import RungPruner

        return RungPruner(p.rungs)
    if p.name == "asha" and p.max_rungs is not None:
        from hpcdl.hpo.pruners import CappedSuccessiveHalvingPruner

        return CappedSuccessiveHalvingPruner(p.min_resource, p.reduction_factor, p.max_rungs)
    if p.name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource, max_resource="auto", reduction_factor=p.reduction_factor
        )
    return optuna.pruners.NopPruner()


def open_study(spec: SweepSpec, sweep_dir: Path, worker: int | None = None) -> optuna.Study:
    """Create or load the sweep's study (same name, same storage: every array task shares it).

    ``worker``: the index of a process that will draw trials; its sampler's seed also depends
    on the sweep's round and on how many trials the study holds, so no two processes of the
    sweep (resumed, requeued) replay the same draws."""
    # a worker waits out a database that is busy or restarting (db_retry); a user's command does not
    store = store_timing.instrument(open_storage(spec, sweep_dir, retry=worker is not None))
    name = study_name(spec)
    draw: tuple[int, ...] = ()
    if worker is not None:
        try:
            drawn = store.get_n_trials(store.get_study_id_from_name(name))
        except KeyError:  # the study is created below
            drawn = 0
        draw = (read_round(sweep_dir), drawn)
    study = optuna.create_study(
        study_name=name,
        storage=store,
        sampler=make_sampler(spec, worker or 0, draw),
        pruner=make_pruner(spec),
        directions=spec.directions,
        load_if_exists=True,
    )
    _STORAGES[study] = store
    return study


#: The storage each study of this process was opened on (:func:`open_study`).
_STORAGES: weakref.WeakKeyDictionary[optuna.Study, optuna.storages.BaseStorage] = (
    weakref.WeakKeyDictionary()
)


def storage_of(
    study: optuna.Study, spec: SweepSpec, sweep_dir: Path
) -> optuna.storages.BaseStorage:
    """The storage ``study`` was opened on, else a new one of the sweep's. A worker's trials
    share it: a new journal storage replays the whole journal file when opened, which for
    each trial of a 10,000-trial sweep grew to a second of CPU."""
    store = _STORAGES.get(study)
    return store if store is not None else open_storage(spec, sweep_dir)


class TrialReporter:
    """One trial of the study, found by its number, through Optuna's public API: a requeued or
    retried task reports to the trial an earlier process asked for, so there is no
    ``optuna.trial.Trial`` object to keep (that constructor is internal).

    ``journal`` is a storage of the sweep's study (:func:`storage_of`: the one the study was
    opened on; another one on the same journal file catches up with the study's writes when it
    reads); in a database it is the process's one RDBStorage."""

    def __init__(self, study: optuna.Study, journal: optuna.storages.BaseStorage, number: int):
        self.study, self.number, self._journal = study, number, journal
        study_id = journal.get_study_id_from_name(study.study_name)
        self._trial_id = journal.get_trial_id_from_study_id_trial_number(study_id, number)

    def report(self, value: float, step: int) -> None:
        """Record the value of ``step``; as with ``Trial.report`` the first value of a step
        stays (a trial resumed from a checkpoint reports its last epoch again)."""
        if step not in self._journal.get_trial(self._trial_id).intermediate_values:
            self._journal.set_trial_intermediate_value(self._trial_id, step, float(value))

    def constrain(self, values: dict[str, float]) -> None:
        """Record the trial's constraint values (Optuna's ``Trial.set_constraint``; a value set
        before stays) before it is told: samplers and ``best_trial`` read them from the trial."""
        trial = optuna.trial.Trial(self.study, self._trial_id)  # no public way from a number
        for name, value in values.items():
            trial.set_constraint(name, value)

    def should_prune(self) -> bool:
        """The study's pruner on the trial's values so far (what ``Trial.should_prune`` does)."""
        return self.study.pruner.prune(self.study, self._journal.get_trial(self._trial_id))


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """Draw the space's parameters for this trial: a conditional one only when its condition
    holds for those drawn before it (:mod:`hpcdl.hpo.conditions`)."""
    params: dict[str, Any] = {}
    for key in draw_order(spec.space):
        p = spec.space[key]
        if not active(p.when, params):
            continue
        if isinstance(p, Choice | Grid):
            params[key] = trial.suggest_categorical(key, p.values)
        elif isinstance(p, Uniform):
            params[key] = trial.suggest_float(key, p.low, p.high, log=p.type == "loguniform")
        elif isinstance(p, IntRange):
            params[key] = trial.suggest_int(key, p.low, p.high, step=p.step, log=p.log)
    return params
