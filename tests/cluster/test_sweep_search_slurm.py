"""Issue 24 on the dev cluster: a multi-objective sweep (with a constraint) as warm workers,
then ``sweep extend`` once its jobs ended: a second round sized by parallelism on the same
study, and the Pareto front over all trials."""

from __future__ import annotations

import subprocess
import time

import optuna
import pytest
from conftest import run_cli

from hpcdl.hpo import Sweep, SweepSpec

pytestmark = pytest.mark.slurm


def _queued(sweep: Sweep) -> list[str]:
    names = ",".join(f"sweep-{sweep.spec.name}{s}" for s in ("", "-final", "-follow"))
    out = subprocess.run(["squeue", "-h", "-r", "-n", names, "-o", "%i %T %r"],
                         capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
    return out.splitlines()


def _settled(sweep: Sweep, timeout: float = 180) -> None:
    """Until no job of the sweep is queued or running; fail with them and the sweep's state."""
    deadline = time.monotonic() + timeout
    while left := _queued(sweep):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *(line.split()[0] for line in left)], timeout=30)
            pytest.fail(f"jobs still queued after {timeout:.0f}s: {left}\n{sweep.status()}\n"
                        f"events: {sweep.lifecycle.events(10)}")  # fmt: skip
        time.sleep(1)


def test_multi_objective_sweep_extended_on_slurm(devcluster):
    spec = SweepSpec.model_validate({
        "name": "pareto-extend",
        "objective": "tests.helpers.search_objectives:TwoGoals",
        "objectives": [{"name": "acc"}, {"name": "latency", "direction": "minimize"}],
        "constraints": ["mem"],
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "nsga2", "seed": 0},
        "trials": 4,
        "parallelism": 2,
        "resources": {"site": "devcluster", "time": "10m"},
    })  # fmt: skip
    sweep = Sweep(spec)
    try:
        workers, _follow = sweep.run()  # no final job: a Pareto front has no one best
        assert workers.array == 2
        sweep.wait(timeout=300)
        _settled(sweep)
        assert len(sweep.study().trials) == 4

        proc = run_cli("sweep", "extend", "pareto-extend", "3")
        assert proc.returncode == 0, proc.stderr
        assert "7 trials (3 more): resubmitted 3 trial(s)" in proc.stdout, proc.stdout
        sweep = Sweep.load("pareto-extend")
        sweep.wait(timeout=300)
        _settled(sweep)
    finally:
        ids = [line.split()[0] for line in _queued(sweep)]
        if ids:
            subprocess.run(["scancel", *ids], timeout=30)
    rounds = [s for s in sweep.submissions() if s["kind"] == "workers"]
    assert [(r["slots"], r["array"]) for r in rounds] == [([0, 1, 2, 3], 2), ([4, 5, 6], 2)]
    slots = sweep.slots()
    assert [s.state for s in slots] == ["complete"] * 7
    study = sweep.study()
    assert len(study.trials) == 7 and sorted(s.trial for s in slots) == list(range(7))
    assert (
        len(study.directions) == 2 and study.directions[1] == optuna.study.StudyDirection.MINIMIZE
    )
    front = sweep.best()["pareto"]
    assert [t["trial"] for t in front] == sorted(t.number for t in study.best_trials)
    assert all(t["params"]["x"] <= 0.8 for t in front)  # the constraint holds on the front
    proc = run_cli("sweep", "best", "pareto-extend")
    assert proc.returncode == 0 and proc.stdout.startswith(f"Pareto front: {len(front)} trial(s)")
