"""An elastic sweep on the dev cluster (issue 24): ``resources.nodes: 1-2`` with ``time_min``.
The worker starts on one node, gets the time-limit signal (USR2) in the middle of its digits
trial, is requeued, comes back on two nodes, and the trial resumes there at the step it
stopped at (same attempt, same slot), then finishes. Which count Slurm picks is pinned while the
worker is pending (``scontrol update NumNodes``): other sessions share the dev cluster. The
checks before queueing are tables in tests/unit/hpo/test_sweep_elastic.py.

Two starts of a DeepSpeed worker (about a minute or two): behind ``-m scale``."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import release_requeued
from helpers.train_setup import rows, write_config, write_digits

from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.scheduler import log_tail

pytestmark = [pytest.mark.slurm, pytest.mark.scale]


@pytest.fixture
def scale_selected(request: pytest.FixtureRequest) -> None:
    expr = request.config.getoption("markexpr") or ""
    if "scale" not in expr or "not scale" in expr:
        pytest.skip("the elastic sweep (two starts of a training worker) runs only with -m scale")


def _scontrol(*args: str) -> None:
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def _events(run_dir: Path) -> list[dict]:
    try:
        return [r for r in rows(run_dir, "event") if r["event"] in ("start", "preempted", "resume")]
    except FileNotFoundError:
        return []


def test_an_elastic_sweep_resumes_its_trial_on_another_node_count(
    devcluster, tmp_path, scale_selected
):
    digits = write_digits(tmp_path / "digits")
    train = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs")
    spec = SweepSpec.model_validate({
        "name": "elastic-sweep", "train": str(train),
        # 10 ms per step: the trial is still training when the signal comes
        "overrides": {"epochs": 3, "zero_stage": 0, "log.every_steps": 1000,
                      "checkpoint.every_steps": 0,
                      "model.name": "tests.helpers.train_models:SlowMLP", "model.delay_s": 0.01},
        "space": {"optimizer.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
        "sampler": {"name": "random", "seed": 0}, "trials": 1, "parallelism": 1, "final": False,
        # pending until the test has pinned its first count
        "resources": {"site": devcluster, "nodes": "1-2", "tasks_per_node": 1, "time": "20m",
                      "time_min": "10m", "begin": "now+600"},
    })  # fmt: skip
    sweep = Sweep(spec)
    try:
        workers = sweep.run()[0]
        worker = workers.job_id  # one worker: a plain job
        _scontrol("update", f"JobId={worker}", "NumNodes=1-1", "NumTasks=1", "StartTime=now")
        deadline = time.monotonic() + 300
        slot = None
        while slot is None:  # training has started: USR2 makes it checkpoint at its next step
            assert time.monotonic() < deadline, f"{sweep.status()}\n{log_tail(workers)}"
            running = [s for s in sweep.slots() if s.state == "running"]
            if running and _events(sweep.paths.trial_dir(running[0])):
                slot = running[0]
            time.sleep(0.3)
        subprocess.run(["scancel", "--signal=USR2", worker], check=True, timeout=30)
        deadline = time.monotonic() + 400
        while (sweep.paths.read_slot(slot.slot) or slot).state == "running":
            if time.monotonic() > deadline:
                pytest.fail(f"trial not finished: {sweep.status()}\n{log_tail(workers, 60)}")
            release_requeued(worker, "NumNodes=2-2", "NumTasks=2")
            time.sleep(1)
        sweep.wait(timeout=60)
    finally:
        sweep.cancel()
    done = sweep.paths.read_slot(slot.slot)
    assert done is not None and done.state == "complete" and done.attempts == 1, done
    events = _events(sweep.paths.trial_dir(done))
    assert [e["event"] for e in events] == ["start", "preempted", "resume"], events
    start, stop, resume = events
    assert start["world_size"] == 1 and resume["world_size"] == 2, events
    assert resume["step"] == stop["step"] > 0 and resume["checkpoint_world_size"] == 1, events
    epochs = [r["epoch"] for r in rows(sweep.paths.trial_dir(done), "epoch")]
    assert epochs[-1] == 2, epochs  # the three epochs, the last one's row
