"""The journal reader behind ``sweep best`` against Optuna's own replay, on studies Optuna
wrote: every kind of parameter, conditional spaces, pruned, failed, enqueued and added trials,
a refused parameter, two studies in one file, ties, infinities and a line still being written."""

from __future__ import annotations

import math
import random
from pathlib import Path

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from hpcdl.hpo.journal_scan import Unsupported, best_in_journal

optuna.logging.set_verbosity(optuna.logging.ERROR)


def _storage(path: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(path)))


def _optunas_best(path: Path, name: str) -> tuple[int, float, dict] | None:
    """What ``sweep best`` answered before: the first complete trial of the best value."""
    study = optuna.load_study(study_name=name, storage=_storage(path))
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        return None
    sign = 1.0 if study.direction.name == "MAXIMIZE" else -1.0
    top = max(sign * t.value for t in done)
    t = next(t for t in done if sign * t.value == top)
    return t.number, t.value, t.params


def _fill(study: optuna.Study, rng: random.Random, trials: int) -> None:
    """Trials a sweep may leave: every parameter kind, a conditional one, coarse values
    (ties), infinities, pruned (with the last reported value), failed and still running
    trials, enqueued ones; and records Optuna writes but refuses on replay."""
    storage = study._storage
    for i in range(trials):
        if rng.random() < 0.1:
            study.enqueue_trial({"lr": 0.01, "layers": 2, "act": "relu"})
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        layers = trial.suggest_int("layers", 1, 4)
        act = trial.suggest_categorical("act", ["relu", "tanh", None, 3])
        if act == "tanh":
            trial.suggest_float("slope", 0.0, 1.0, step=0.25)
        roll = rng.random()
        if roll < 0.15:
            trial.report(1e6 * (rng.random() - 0.5), step=1)  # a pruned trial keeps it
            study.tell(trial, state=TrialState.PRUNED)
        elif roll < 0.25:
            study.tell(trial, state=TrialState.FAIL)
        elif roll < 0.3:
            pass  # left running (a worker that died)
        elif roll < 0.33:
            study.tell(trial, math.inf if rng.random() < 0.5 else -math.inf)
        else:
            study.tell(trial, round(lr * layers + rng.random(), 1))  # ties on purpose
        if i % 7 == 3:
            # a parameter of another kind under a known name, on a trial that then wins:
            # written to the journal, refused on replay
            t2 = study.ask()
            t2.suggest_float("lr", 1e-4, 1.0, log=True)
            with pytest.raises(ValueError):
                storage.set_trial_param(t2._trial_id, "lr", 1.0, IntDistribution(1, 3))
            study.tell(t2, 1e5 * (1 if study.direction.name == "MAXIMIZE" else -1) + i)
        if i % 9 == 4:  # a late result for a finished trial (a worker that lost its claim)
            with pytest.raises(UpdateFinishedTrialError):
                storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1e9])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_the_same_best_as_optuna(tmp_path: Path, seed: int, direction: str):
    path = tmp_path / "study.journal"
    rng = random.Random(seed)
    other = optuna.create_study(study_name="other", storage=_storage(path), direction=direction)
    study = optuna.create_study(study_name="s", storage=_storage(path), direction=direction,
                                sampler=optuna.samplers.RandomSampler(seed=seed))  # fmt: skip
    if seed % 2:  # trials added whole (as a warm start does), and another study's trials
        study.add_trial(create_trial(value=0.3, params={"lr": 0.1},
                                     distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)}))  # fmt: skip
        other.add_trial(create_trial(value=99.0 if direction == "maximize" else -99.0))
    _fill(study, rng, 25)
    got = best_in_journal(path, "s", maximize=direction == "maximize")
    assert got == _optunas_best(path, "s")
    assert got is not None


def test_a_line_still_being_written_is_not_read(tmp_path: Path):
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=_storage(path), direction="maximize")
    _fill(study, random.Random(1), 10)
    before = best_in_journal(path, "s", maximize=True)
    with path.open("ab") as f:  # a better trial's record, cut short as if mid-write
        f.write(b'{"op_code":6,"worker_id":"w","trial_id":3,"state":1,"values":[9')
    assert best_in_journal(path, "s", maximize=True) == before == _optunas_best(path, "s")


@pytest.mark.parametrize(
    ("journal", "expect"),
    [
        (b"", None),  # an empty file: no study yet
        (b'{"op_code":0,"worker_id":"w","study_name":"s","directions":[2]}\n', None),
        (b'{"op_code":0,"worker_id":"w","study_name":"t","directions":[2]}\n', None),  # other study
    ],
)
def test_no_complete_trial(tmp_path: Path, journal: bytes, expect: object):
    path = tmp_path / "study.journal"
    path.write_bytes(journal)
    assert best_in_journal(path, "s", maximize=True) is expect
    assert best_in_journal(tmp_path / "missing.journal", "s", maximize=True) is None


@pytest.mark.parametrize(
    "record",
    [
        b'{"op_code":1,"worker_id":"w","study_id":0}',  # a deleted study
        b'{"op_code":10,"worker_id":"w","trial_ids":[0]}',  # discarded trials (Rustuna)
        b"not json",  # a broken line before the end
    ],
)
def test_what_it_does_not_interpret_goes_to_optuna(tmp_path: Path, record: bytes):
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=_storage(path), direction="maximize")
    _fill(study, random.Random(2), 3)
    with path.open("ab") as f:  # the record is not the last one
        f.write(
            record + b"\n" + b'{"op_code":0,"worker_id":"w","study_name":"t","directions":[2]}\n'
        )
    with pytest.raises(Unsupported):
        best_in_journal(path, "s", maximize=True)
