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
