"""A claim adopts what the study already holds (the wiring of hpcdl.hpo.decide.told)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hpcdl.hpo.folder import Slot, SweepPaths
from hpcdl.hpo.spec import SweepSpec
from hpcdl.hpo.study import open_study
from hpcdl.hpo.trial import claim


@pytest.mark.parametrize("ended", ["complete", "pruned"])
def test_a_retry_of_a_trial_the_study_ended_records_it_instead(tmp_path: Path, monkeypatch, ended):
    """The last attempt told the study, then was killed before its slot write (seen after
    ``sweep cancel``: the worker finished during Slurm's KillWait). Before, the next claim ran
    the trial again and its tell raised "Cannot tell a COMPLETE trial"."""
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4243")  # another task than the dead one
    spec = SweepSpec.model_validate({"name": "adopt", "objective": "tests.helpers.objectives:plain",
                                     "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}}, "trials": 2})  # fmt: skip
    paths = SweepPaths(tmp_path / "adopt")
    paths.slots.mkdir(parents=True)
    study = open_study(spec, paths.root)
    trial = study.ask()
    if ended == "complete":
        study.tell(trial, 0.25)
    else:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    paths.write_slot(Slot(slot=0, trial=trial.number, params={"x": 0.5}, run_id="r0",
                          state="running", job="4242"))  # fmt: skip
    assert claim(paths, spec, study, 0) is None
    slot = paths.read_slot(0)
    assert slot is not None and slot.state == ended and slot.attempts == 1
    assert slot.value == (0.25 if ended == "complete" else None)
    again = claim(paths, spec, study, 1)  # the other slot is a new trial as ever
    assert again is not None and again.trial != trial.number


class _Killed(Exception):
    """Stands for the claiming process being killed at that point."""


def _toy(tmp_path: Path, monkeypatch) -> tuple[SweepSpec, SweepPaths, optuna.Study]:
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4243")
    spec = SweepSpec.model_validate({"name": "orphan", "objective": "tests.helpers.objectives:plain",
                                     "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0},
                                               "y": {"type": "uniform", "low": 0.0, "high": 1.0}},
                                     "trials": 3})  # fmt: skip
    paths = SweepPaths(tmp_path / "orphan")
    paths.slots.mkdir(parents=True)
    return spec, paths, open_study(spec, paths.root)


@pytest.mark.parametrize("killed_at", ["slot write", "second parameter"])
def test_a_claim_killed_between_ask_and_slot_write_leaves_no_orphan_trial(
    tmp_path: Path, monkeypatch, killed_at
):
    """Seen on PostgreSQL under load: ``sweep cancel`` killed a worker after the study's ask,
    before its slot write; the resumed sweep asked another trial, and the study held 13 trials
    for 12 slots, one RUNNING for ever. Now the next claim takes the orphan back: same number,
    the parameter already drawn kept."""
    spec, paths, study = _toy(tmp_path, monkeypatch)
    real_suggest = optuna.trial.Trial.suggest_float
    drawn: list[float] = []

    def dies_at_slot_write(self, slot):
        raise _Killed

    def dies_at_second_parameter(self, name, *args, **kwargs):
        if name == "y":
            raise _Killed
        drawn.append(real_suggest(self, name, *args, **kwargs))
        return drawn[-1]

    with monkeypatch.context() as m:
        if killed_at == "slot write":
            m.setattr(SweepPaths, "write_slot", dies_at_slot_write)
        else:
            m.setattr(optuna.trial.Trial, "suggest_float", dies_at_second_parameter)
        with pytest.raises(_Killed):
            claim(paths, spec, study, 0)
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"]  # the orphan
    again = claim(paths, spec, study, 0)
    assert again is not None and again.trial == 0
    if drawn:
        assert again.params["x"] == drawn[0]
    assert len(study.get_trials()) == 1 and not paths.asking.exists()
    other = claim(paths, spec, study, 1)  # no note left: a new trial as ever
    assert other is not None and other.trial == 1 and len(study.get_trials()) == 2


def test_a_note_left_after_the_slot_write_adopts_nothing(tmp_path: Path, monkeypatch):
    """Killed after the slot write, before the note's removal: the trial is its slot's, and a
    running trial some slot names is no orphan."""
    spec, paths, study = _toy(tmp_path, monkeypatch)
    first = claim(paths, spec, study, 0)
    assert first is not None
    paths.asking.write_text('{"slot": 0}')
    second = claim(paths, spec, study, 1)
    assert second is not None and second.trial == 1 and len(study.get_trials()) == 2


def test_a_note_with_no_trial_asked_yet_asks_one(tmp_path: Path, monkeypatch):
    spec, paths, study = _toy(tmp_path, monkeypatch)
    paths.asking.write_text('{"slot": 0}')  # killed before the ask itself
    slot = claim(paths, spec, study, 0)
    assert slot is not None and slot.trial == 0 and len(study.get_trials()) == 1


def test_a_retry_claimed_first_leaves_the_note_for_the_next_new_claim(tmp_path: Path, monkeypatch):
    """Seen in CI after ``sweep cancel`` and ``sweep resume`` on PostgreSQL: the resumed worker
    first claimed a slot the cancel had left for retry, and that claim removed the dead claim's
    note; the next new claim then asked a 13th trial for 12 slots."""
    spec, paths, study = _toy(tmp_path, monkeypatch)
    first = claim(paths, spec, study, 0)
    assert first is not None
    paths.write_slot(first.model_copy(update={"state": "retry"}))

    def dies_at_slot_write(self, slot):
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(SweepPaths, "write_slot", dies_at_slot_write)
        with pytest.raises(_Killed):
            claim(paths, spec, study, 1)
    retried = claim(paths, spec, study, 0)
    assert retried is not None and retried.trial == 0 and paths.asking.exists()
    adopted = claim(paths, spec, study, 1)
    assert adopted is not None and adopted.trial == 1 and len(study.get_trials()) == 2
    assert not paths.asking.exists()
