"""Sweeps that really train (hpcdl's trainer on digits): W&B runs per trial, the final test score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import release_requeued
from helpers.train_setup import rows, write_config, write_digits

from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.worker import read_journals

WANDB = str(Path(sys.executable).parent / "wandb")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"))


def sweep_spec(tmp_path: Path, digits: Path, **changes) -> SweepSpec:
    train = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs")
    data = {
        "name": "digits",
        "train": str(train),
        "overrides": {"epochs": 6, "zero_stage": 0, "log.every_steps": 1000, "checkpoint.every_steps": 0},
        "space": {"optimizer.lr": {"type": "loguniform", "low": 1e-3, "high": 3e-2},
                  "model.activation": {"type": "choice", "values": ["relu", "tanh"]}},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
        "pruner": {"name": "asha", "min_resource": 1, "reduction_factor": 3},
        "trials": 6,
        "parallelism": 2,
        "resources": {"site": "local", "time": "20m", "tasks_per_node": 1},
    }  # fmt: skip
    return SweepSpec.model_validate({**data, **changes})


def wandb_run(run_dir: Path) -> dict:
    """The run's W&B record as ``wandb leet`` reads it back: one offline folder per process
    that ran it (a requeued trial has two), all with the run's id; the last one is returned."""
    parts = []
    for offline in sorted((run_dir / "wandb").glob("offline-run-*")):
        proc = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(offline)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        parts.append(json.loads(proc.stdout))
    assert parts and len({p["run_id"] for p in parts}) == 1, [p["run_id"] for p in parts]
    return parts[-1]


def _dotted(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def check_wandb_runs(sweep: Sweep) -> None:
    for slot in sweep.slots():
        run = wandb_run(sweep.paths.trial_dir(slot))
        assert run["run_id"] == slot.run_id
        assert f"sweep:{sweep.spec.name}" in run["tags"]
        assert ("pruned" in run["tags"]) == (slot.state == "pruned")
        for key, value in slot.params.items():
            assert _dotted(run["config"], key) == value
        assert run["config"]["epochs"] == 6  # the sweep's override on top of the base config
    final = wandb_run(sweep.paths.final)
    assert "final" in final["tags"]


def test_digits_sweep_on_the_local_profile(tmp_path, digits):
    sweep = Sweep(sweep_spec(tmp_path, digits))
    sweep.run()
    sweep.wait(timeout=900)
    assert {s.state for s in sweep.slots()} <= {"complete", "pruned"}
    check_wandb_runs(sweep)
    best = sweep.best()
    assert best["final"]["test_acc"] >= 0.9 and best["final"]["test_samples"] == 180
    # `hpcdl sync` finds every offline run; without an API key it says so, one line, exit 2.
    hpcdl = str(Path(sys.executable).parent / "hpcdl")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    listed = subprocess.run([hpcdl, "sync", "digits", "--dry-run"], capture_output=True, text=True,
                            timeout=60, env=env).stdout.split()  # fmt: skip
    assert len(listed) == 7 and all("offline-run-" in p for p in listed)  # 6 trials + final
    proc = subprocess.run([hpcdl, "sync", "digits"], capture_output=True, text=True, timeout=300,
                          env=env, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: 7 of 7 run(s) did not sync")
    assert proc.stdout.count("FAILED") == 7


@pytest.mark.slurm
def test_digits_sweep_on_the_cluster_then_final_job(devcluster, tmp_path, digits):
    """Three warm workers train the trials; worker 0 gets the time-limit signal (USR2) in the
    middle of its first trial: the trial checkpoints, the task is requeued, comes back, resumes
    that trial first (same attempt, same W&B run) and goes on; then the final job runs."""
    spec = sweep_spec(tmp_path, digits, name="digits-slurm", parallelism=3,
                      resources={"site": devcluster, "time": "20m", "tasks_per_node": 1})  # fmt: skip
    # 10 ms per step: a pruned digits trial otherwise ends within a second of its start, and
    # worker 0 may finish its trials before the test sees one running
    slow = {"model.name": "tests.helpers.train_models:SlowMLP", "model.delay_s": 0.01}
    sweep = Sweep(spec.model_copy(update={"overrides": {**spec.overrides, **slow}}))
    array, final, _follow = sweep.run()
    worker = f"{array.job_id}_0"
    hit = _signal_mid_trial(sweep, worker, deadline=time.monotonic() + 300)
    deadline = time.monotonic() + 900
    while not (sweep.paths.final / "result.json").is_file():  # the requeued worker starts soon
        assert time.monotonic() < deadline, f"no final result: {sweep.status()}"
        release_requeued(worker)
        time.sleep(1)
    sweep.wait(timeout=120)
    slot = sweep.paths.read_slot(hit)
    assert slot is not None and slot.job == worker and slot.attempts == 1, slot
    assert slot.state in ("complete", "pruned"), slot
    events = [r for r in rows(sweep.paths.trial_dir(slot), "event")
              if r["event"] in ("start", "preempted", "resume")]  # fmt: skip
    assert [e["event"] for e in events] == ["start", "preempted", "resume"], events
    assert events[2]["step"] == events[1]["step"] > 0 and events[2]["restarts"] == 1
    starts = [ln for ln in read_journals(sweep.paths)[worker] if ln["event"] == "start"]
    assert [ln["restarts"] for ln in starts] == [0, 1], starts
    assert sorted(s.trial for s in sweep.slots()) == list(range(6))
    assert {s.state for s in sweep.slots()} <= {"complete", "pruned"}
    check_wandb_runs(sweep)
    result = json.loads((sweep.paths.final / "result.json").read_text())
    assert result["test_acc"] >= 0.9
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,Start,End", "-j", f"{array.job_id},{final.job_id}"],
                         capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
    times = {r.split("|")[0]: r.split("|")[1:] for r in out.splitlines()}
    array_end = max(
        datetime.fromisoformat(v[1]) for k, v in times.items() if k.startswith(f"{array.job_id}_")
    )
    assert datetime.fromisoformat(times[final.job_id][0]) >= array_end
    assert yaml.safe_load((sweep.paths.final / "config.yaml").read_text())["data"][
        "train"
    ].endswith("trainval")


def _signal_mid_trial(sweep: Sweep, task: str, deadline: float) -> int:
    """USR2 to ``task`` once its trial has started training (set-up done: it checkpoints at the
    next step); its slot."""
    while time.monotonic() < deadline:
        for slot in sweep.slots():
            if slot.job != task or slot.state != "running":
                continue
            metrics = sweep.paths.trial_dir(slot) / "metrics.jsonl"
            # a string test, not json.loads: the last line may be half-written
            if metrics.is_file() and '"event": "start"' in metrics.read_text():
                subprocess.run(["scancel", "--signal=USR2", task], check=True, timeout=30)
                return slot.slot
        time.sleep(0.2)
    raise AssertionError(f"no trial of {task} started training: {sweep.status()}")


def test_bench_hpo_compares_asha_with_random(tmp_path, digits):
    # ASHA with max_rungs, as configs/sweep_digits.yaml: the capped pruner in real trials
    pruner = {"name": "asha", "min_resource": 1, "reduction_factor": 4, "max_rungs": 1}
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        yaml.safe_dump(sweep_spec(tmp_path, digits, pruner=pruner).model_dump(mode="json"))
    )
    proc = subprocess.run([str(Path(sys.executable).parent / "hpcdl"), "bench", "hpo", str(spec),
                           "--trials", "2", "--epochs", "2", "--seeds", "1"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ASHA / random, epochs in all: median" in proc.stdout
    assert "Hyperband / random, epochs to target: median" in proc.stdout
    assert "random to target" in proc.stdout and "hyperband in all" in proc.stdout
    assert "submission timing skipped" in proc.stdout
    # the replayed pruners stand for live ones: the live runs' epochs per trial, replayed
    assert "ASHA without max_rungs (replayed on random's curves) / random" in proc.stdout
    assert "gave the epochs each trial ran in 1/1 seed(s)" in proc.stdout
    # off a terminal: no bar, but a plain line now and then (here: at the end) on stderr
    assert "hpcdl: random, ASHA, Hyperband: 2 trials each, 1 seed(s): 3/3 after" in proc.stderr


def test_bench_hpo_bad_budget(capsys):
    from hpcdl.cli import main

    assert main(["bench", "hpo", "--trials", "1"]) == 2
    assert "--trials/--epochs: need at least 2 trials" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--slots", "-1", "--site", "devcluster"], ["--slots", "3"]])
def test_bench_hpo_bad_slots(capsys, args):
    from hpcdl.cli import main

    assert main(["bench", "hpo", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --slots: give a count >= 1, --site and --trials >= 1"], err


def test_failed_training_is_retried_then_recorded_failed(tmp_path, digits):
    spec = sweep_spec(
        tmp_path, digits, name="failing", trials=1, parallelism=1, final=False, max_retries=1
    )
    spec = spec.model_copy(
        update={
            "overrides": {**spec.overrides, "model.name": "tests.helpers.train_models:FailingMLP"}
        }
    )
    sweep = Sweep(spec)
    sweep.run()
    sweep.wait(timeout=600)
    (slot,) = sweep.slots()
    assert slot.state == "failed" and slot.attempts == 2
    assert "FailingMLP breaks on purpose" in slot.error
    assert sweep.study().trials[0].state.name == "FAIL"
    runs = sorted((sweep.paths.trial_dir(slot) / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one per attempt, same run id
    for run_dir in runs:
        proc = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(run_dir)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        run = json.loads(proc.stdout)
        assert run["run_id"] == slot.run_id and "failed" in run["tags"]
