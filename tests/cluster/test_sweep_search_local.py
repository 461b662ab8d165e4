"""Issue 24's search features end to end on the local profile (real Optuna, real worker
processes, the journal storage): several objectives with a constraint, a conditional space
drawn by GPSampler, extending a finished sweep, warm start from a sweep and from a file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import pytest
import yaml

from hpcdl.cli import main
from hpcdl.errors import HpcdlError
from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.pareto import WARM


def spec(**changes) -> SweepSpec:
    base = {
        "name": "toy",
        "objective": "tests.helpers.objectives:curve",
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random", "seed": 0},
        "trials": 4,
        "parallelism": 2,
        "resources": {"site": "local", "time": "10m"},
    }
    return SweepSpec.model_validate({**base, **changes})


TWO_GOALS = {
    "objective": "tests.helpers.search_objectives:TwoGoals",
    "objectives": [{"name": "acc"}, {"name": "latency", "direction": "minimize"}],
    "constraints": ["mem"],
    "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
    "trials": 6,
}


def test_two_objectives_with_a_constraint_status_best_report(capsys):
    sweep = Sweep(spec(name="pareto", **TWO_GOALS))
    sweep.run()
    sweep.wait(timeout=120)
    slots = sweep.slots()
    assert [s.state for s in slots] == ["complete"] * 6
    assert all(set(s.values) == {"acc", "latency", "mem"} for s in slots)
    study = sweep.study()
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE,
                                optuna.study.StudyDirection.MINIMIZE]  # fmt: skip
    assert all(t.constraints == {"mem": t.params["x"] - 0.8} for t in study.trials)
    best = sweep.best()
    # Optuna's own front (it sets infeasible trials aside too) is ours
    assert [t["trial"] for t in best["pareto"]] == sorted(t.number for t in study.best_trials)
    assert all(t["params"]["x"] <= 0.8 and set(t) == {"trial", "acc", "latency", "params"}
               for t in best["pareto"])  # fmt: skip
    assert not sweep.paths.has_final_result() and sweep.finished()  # no final: no one best

    assert main(["sweep", "best", "pareto"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"Pareto front: {len(best['pareto'])} trial(s)")
    assert out[1].split() == ["trial", "acc", "(max)", "latency", "(min)", "x"]
    assert len(out) == 2 + len(best["pareto"])
    assert main(["sweep", "status", "pareto"]) == 0
    page = capsys.readouterr().out
    assert "acc (maximize), latency (minimize), mem <= 0" in " ".join(page.split())  # any width
    front = "Pareto front: trial " + ", ".join(str(t["trial"]) for t in best["pareto"])
    assert front in " ".join(page.split())
    png, html = sweep_report(sweep)
    assert png.stat().st_size > 10_000 and "Pareto front: trial" in html.read_text()


def _ended(sweep: Sweep, timeout: float = 60) -> None:
    """Until no worker of the sweep is alive; fail with the jobs and the sweep's state."""
    deadline = time.monotonic() + timeout
    while live := [f"{j.kind} {j.handle.job_id} {j.state}" for j in sweep.jobs() if j.live]:
        assert time.monotonic() < deadline, f"still alive: {live}\n{sweep.status()}"
        time.sleep(0.2)


def sweep_report(sweep: Sweep) -> tuple[Path, Path]:
    from hpcdl.hpo.report import write_report

    return write_report(sweep)


def test_conditional_space_with_gp_and_a_constraint_then_extend():
    space = {
        "opt": {"type": "choice", "values": ["sgd", "adam"]},
        "momentum": {"type": "uniform", "low": 0.0, "high": 0.9, "when": {"opt": "sgd"}},
        "x": {"type": "uniform", "low": 0.0, "high": 1.0},
    }
    sweep = Sweep(spec(name="cond", objective="tests.helpers.search_objectives:Conditional",
                       space=space, constraints=["mem"], trials=5, parallelism=1,
                       sampler={"name": "gp", "seed": 0, "n_startup_trials": 3}))  # fmt: skip
    sweep.run()
    sweep.wait(timeout=180)
    slots = sweep.slots()
    assert [s.state for s in slots] == ["complete"] * 5, [s.error for s in slots]
    assert {s.params["opt"] for s in slots} == {"sgd", "adam"}  # both branches drawn
    first = sweep.best()
    assert first["params"]["x"] <= 0.5  # only feasible trials count
    assert first["final"]["trial"] == first["trial"]

    # extend the finished sweep: 3 more trials on the same study, a new final result
    _ended(sweep)  # the worker that ran the final exits a moment after writing its result
    text, _ = sweep.extend(3)
    assert text.startswith("8 trials (3 more): resubmitted 3 trial(s)"), text
    with pytest.raises(HpcdlError, match=r"still has jobs queued or running .*extend it when"):
        sweep.extend(2)  # its new round runs: refused, nothing changed
    assert Sweep.load("cond").spec.trials == 8
    sweep.wait(timeout=180)
    again = Sweep.load("cond")
    assert again.spec.trials == 8 and len(again.study().trials) == 8
    assert [s.slot for s in again.slots()] == list(range(8))
    assert all(s.state == "complete" for s in again.slots())
    kept = json.loads((again.paths.final / "result-5-trials.json").read_text())
    assert kept["trial"] == first["trial"]
    best = again.best()
    assert best["final"]["trial"] == best["trial"]  # the final of all 8, not the first 5


def test_warm_start_from_a_sweep_and_refusals(tmp_path, capsys):
    old = Sweep(spec(name="old", trials=2, parallelism=1, final=False))
    old.run()
    old.wait(timeout=120)
    old_trials = old.study().trials

    new = Sweep(spec(name="new", trials=2, parallelism=1, final=False, warm_start="old",
                     sampler={"name": "tpe", "seed": 1, "n_startup_trials": 2}))  # fmt: skip
    new.run()
    new.wait(timeout=120)
    trials = new.study().trials
    warm = [t for t in trials if WARM in t.user_attrs]
    assert [(t.params, t.values) for t in warm] == [(t.params, t.values) for t in old_trials]
    assert sorted(s.trial for s in new.slots()) == [2, 3]  # its own trials come after
    assert new.best()["trial"] in (2, 3)  # the warm ones never count as this sweep's best

    # a file that does not fit the space: one line, nothing made (the unit tests have the rest)
    prior = tmp_path / "prior.yaml"
    prior.write_text(yaml.safe_dump([{"params": {"x": 0.2, "y": 1}}]))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**_yaml_spec("misfit"), "warm_start": "prior.yaml"}))
    assert main(["sweep", "run", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}: warm_start: {prior}: trial 0 parameter 'y' is not in this "
                   "sweep's space"]  # fmt: skip
    assert not (new.paths.root.parent / "misfit").exists()

    other = tmp_path / "other.yaml"  # another sweep's objectives: refused by name
    other.write_text(yaml.safe_dump({**_yaml_spec("othergoal"), "warm_start": "old",
                                     "metric": "val_loss", "direction": "minimize"}))  # fmt: skip
    assert main(["sweep", "run", str(other)]) == 2
    assert "warm_start: sweep 'old' optimises val_acc (maximize), this one val_loss (minimize)" \
        in capsys.readouterr().err  # fmt: skip

    # a sweep folder someone else could write is never read as one's own (Sweep.load's check)
    mode = old.paths.root.stat().st_mode & 0o777
    old.paths.root.chmod(mode | 0o020)
    try:
        again = tmp_path / "again.yaml"
        again.write_text(yaml.safe_dump({**_yaml_spec("again"), "warm_start": "old"}))
        assert main(["sweep", "run", str(again)]) == 2
        err = capsys.readouterr().err
        assert "warm_start: sweep folder" in err and "is not yours alone" in err, err
    finally:
        old.paths.root.chmod(mode)


def _yaml_spec(name: str) -> dict:
    return {**spec(name=name, trials=2, final=False).model_dump(mode="json", exclude_none=True),
            "storage": None}  # fmt: skip
