"""Sweep machinery on the local profile with real Optuna (journal storage, samplers, pruners)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcdl.hpo import Sweep, SweepSpec

REPO = Path(__file__).resolve().parents[2]


def spec(**changes) -> SweepSpec:
    base = {
        "name": "toy",
        "objective": "tests.helpers.objectives:curve",
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random", "seed": 0},
        "trials": 6,
        "parallelism": 2,
        "resources": {"site": "local", "time": "10m"},
    }
    return SweepSpec.model_validate({**base, **changes})


def test_local_sweep_runs_every_trial_and_the_final(job_root):
    sweep = Sweep(spec())
    (workers,) = sweep.run()
    assert workers.array == 2
    sweep.wait(timeout=120)
    rows = sweep.status()
    assert [r["state"] for r in rows] == ["complete"] * 6
    assert len({r["trial"] for r in rows}) == 6
    best = sweep.best()
    values = [r["val_acc"] for r in rows]
    assert best["val_acc"] == max(values)
    assert best["final"]["test_acc"] == pytest.approx(1 - (best["params"]["x"] - 0.3) ** 2)
    assert len(sweep.study().trials) == 6


def test_failed_attempt_is_retried_with_the_same_params(job_root):
    sweep = Sweep(
        spec(name="flaky", objective="tests.helpers.objectives:flaky", trials=2, final=False)
    )
    sweep.run()
    sweep.wait(timeout=120)
    for slot in sweep.slots():
        assert slot.state == "complete" and slot.attempts == 2
        assert "first attempt fails" in slot.error
        assert (sweep.paths.trial_dir(slot) / "error-attempt1.txt").is_file()
    assert len(sweep.study().trials) == 2  # retries reuse the trial, they do not draw new ones


def test_grid_sampler_covers_the_grid(job_root):
    grid = {
        "x": {"type": "grid", "values": [0.1, 0.3, 0.5]},
        "epochs": {"type": "grid", "values": [1, 2]},
    }
    sweep = Sweep(spec(name="grid", space=grid, sampler={"name": "grid"}, trials=6, final=False))
    sweep.run()
    sweep.wait(timeout=120)
    seen = {(r["params"]["x"], r["params"]["epochs"]) for r in sweep.status()}
    assert seen == {(x, e) for x in (0.1, 0.3, 0.5) for e in (1, 2)}


def test_asha_prunes_bad_trials(job_root):
    sweep = Sweep(spec(name="asha", trials=12, parallelism=1, final=False,
                       sampler={"name": "random", "seed": 1},
                       pruner={"name": "asha", "min_resource": 1, "reduction_factor": 3},
                       space={"x": {"type": "uniform", "low": 0.0, "high": 1.0},
                              "epochs": {"type": "choice", "values": [6]}}))  # fmt: skip
    sweep.run()
    sweep.wait(timeout=180)
    states = [s.state for s in sweep.slots()]
    assert "pruned" in states and "complete" in states
    pruned = [s for s in sweep.slots() if s.state == "pruned"]
    assert all(s.epochs < 6 for s in pruned)


def test_second_run_with_the_same_name_is_refused(job_root):
    Sweep(spec(name="once", trials=1, final=False)).run()
    with pytest.raises(Exception, match="exists already"):
        Sweep(spec(name="once", trials=1, final=False)).run()


def test_a_sweep_reads_its_own_copy_of_the_base_config(job_root, tmp_path, monkeypatch):
    """Editing the base training config after `sweep run` changes no trial: they read the
    sweep's snapshot (with the dataset paths made absolute)."""
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "1")  # trials start after the edit below
    monkeypatch.chdir(REPO)
    base = tmp_path / "train.yaml"
    base.write_text((REPO / "configs/train_digits.yaml").read_text())
    sweep = Sweep(spec(name="snapshot", objective="tests.helpers.objectives:base_lr",
                       train=str(base), final=False, trials=3, parallelism=1,
                       space={"model.dropout": {"type": "uniform", "low": 0.0, "high": 0.5}}))  # fmt: skip
    sweep.run()
    base.write_text(base.read_text().replace("lr: 0.003", "lr: 0.5"))
    assert "lr: 0.5" in base.read_text()
    sweep.wait(timeout=120)
    assert [s.value for s in sweep.slots()] == [0.003] * 3
    assert Sweep.load("snapshot").spec.train == str(sweep.paths.train)
    data = (sweep.paths.trial_dir(sweep.slots()[0]) / "data.txt").read_text().split()
    assert data == [str(REPO / "data/digits/train"), str(REPO / "data/digits/val")]
