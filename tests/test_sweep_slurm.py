"""Sweeps as real Slurm job arrays on the dev cluster (toy objective: the machinery, not training)."""

from __future__ import annotations

import subprocess
import time
from datetime import datetime

import pytest
from conftest import sacct_finished

from hpcdl.hpo import Sweep, SweepSpec

pytestmark = pytest.mark.slurm


def spec(**changes) -> SweepSpec:
    base = {
        "name": "toy",
        "objective": "tests.helpers.objectives:curve",
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random", "seed": 0},
        "trials": 12,
        "parallelism": 3,
        "resources": {"site": "devcluster", "time": "10m"},
    }
    return SweepSpec.model_validate({**base, **changes})


def _peak(rows: list[dict[str, str]]) -> int:
    ts = datetime.fromisoformat
    events = sorted([(ts(r["start"]), 1) for r in rows if r["start"] not in {"None", "Unknown"}]
                    + [(ts(r["end"]), -1) for r in rows if r["end"] not in {"None", "Unknown"}])  # fmt: skip
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def _wait_for(predicate, timeout: float, what: str, sweep: Sweep) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} never happened: {sweep.status()}"
        time.sleep(1)


def test_throttled_sweep_survives_a_killed_task(devcluster, monkeypatch):
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "1.5")
    sweep = Sweep(spec(name="killed"))
    array, _final, _follow = sweep.run()
    assert array.array == 12
    _wait_for(lambda: (s := sweep.paths.read_slot(4)) is not None and s.epochs >= 1, 300,
              "slot 4 starting", sweep)  # fmt: skip
    subprocess.run(["scancel", f"{array.job_id}_4"], check=True, timeout=30)
    sweep.wait(timeout=600)
    slots = sweep.slots()
    assert [s.state for s in slots] == ["complete"] * 12
    assert slots[4].attempts == 2  # resumed the same trial, not a new one
    assert len(sweep.study().trials) == 12
    assert _peak(sacct_finished(array.job_id, 12)) <= 3
    kinds = [s["kind"] for s in sweep.submissions()]
    assert kinds.count("array") == 2
    second = [s for s in sweep.submissions() if s["kind"] == "array"][1]
    assert second["slots"] == [4]
    assert sweep.best()["final"]["test_acc"] > 0.9


def test_cancelled_sweep_resumes_only_missing_trials(devcluster, monkeypatch):
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "1.5")
    sweep = Sweep(spec(name="resumed", trials=8, parallelism=2, final=False))
    sweep.run()
    _wait_for(
        lambda: sum(s.state == "complete" for s in sweep.slots()) >= 2, 300, "2 trials", sweep
    )
    cancelled = sweep.cancel()
    assert cancelled
    _wait_for(lambda: not sweep._active_jobs(("array", "follow")), 60, "cancellation", sweep)
    missing = sweep.missing_slots()
    assert 0 < len(missing) < 8
    (array, _follow) = sweep.resume()
    assert array.array == len(missing)
    sweep.wait(timeout=600)
    assert [s.state for s in sweep.slots()] == ["complete"] * 8
    assert len(sweep.study().trials) == 8


def test_throttle_changes_the_running_array(devcluster, monkeypatch):
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "3")
    sweep = Sweep(spec(name="rethrottled", trials=8, parallelism=1, final=False))
    array, _follow = sweep.run()
    sweep.throttle(3)
    out = subprocess.run(["scontrol", "show", "job", array.job_id], capture_output=True, text=True,
                         timeout=30).stdout  # fmt: skip
    assert "ArrayTaskThrottle=3" in out
    sweep.wait(timeout=600)
    assert _peak(sacct_finished(array.job_id, 8)) >= 2


def test_pruned_trial_stops_early_and_frees_its_array_slot(devcluster, monkeypatch):
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "1")
    sweep = Sweep(spec(name="pruning", trials=9, parallelism=2, final=False,
                       sampler={"name": "random", "seed": 3},
                       pruner={"name": "asha", "min_resource": 1, "reduction_factor": 2},
                       space={"x": {"type": "uniform", "low": 0.0, "high": 1.0},
                              "epochs": {"type": "choice", "values": [6]}}))  # fmt: skip
    array, _follow = sweep.run()
    sweep.wait(timeout=600)
    slots = {s.slot: s for s in sweep.slots()}
    pruned = [s for s in slots.values() if s.state == "pruned"]
    assert pruned and all(s.epochs < 6 for s in pruned)
    rows = {r["id"].split("_")[1]: r for r in sacct_finished(array.job_id, 9)}
    ts = datetime.fromisoformat
    # A task that starts after a pruned task ended took the slot the pruned trial freed early.
    freed = min(ts(rows[str(s.slot)]["end"]) for s in pruned)
    later = [r for r in rows.values() if ts(r["start"]) >= freed]
    assert later, rows
    full = max(ts(rows[str(s.slot)]["end"]) - ts(rows[str(s.slot)]["start"])
               for s in slots.values() if s.state == "complete")  # fmt: skip
    short = min(ts(rows[str(s.slot)]["end"]) - ts(rows[str(s.slot)]["start"]) for s in pruned)
    assert short < full
