"""Sweeps that really train (hpcdl's trainer on digits): W&B runs per trial, the final test score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from helpers.train_setup import write_config, write_digits

from hpcdl.hpo import Sweep, SweepSpec

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
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    proc = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(offline)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


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
    sweep = Sweep(sweep_spec(tmp_path, digits, name="digits-slurm", parallelism=3,
                             resources={"site": devcluster, "time": "20m", "tasks_per_node": 1}))  # fmt: skip
    array, final, _follow = sweep.run()
    sweep.wait(timeout=1200)
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


def test_bench_hpo_compares_asha_with_random(tmp_path, digits):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump(sweep_spec(tmp_path, digits).model_dump(mode="json")))
    proc = subprocess.run([str(Path(sys.executable).parent / "hpcdl"), "bench", "hpo", str(spec),
                           "--trials", "2", "--epochs", "2", "--seeds", "1"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ASHA / random, epochs in all: median" in proc.stdout
    assert "Hyperband / random, epochs to target: median" in proc.stdout
    assert "random to target" in proc.stdout and "hyperband in all" in proc.stdout
    assert "submission timing skipped" in proc.stdout


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
