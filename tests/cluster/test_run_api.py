"""``hpcdl.Run``, the Python API of a training run (digits on the local profile and on the dev
cluster, the run folder's snapshot, rollback of a failed submission), and the hpo <-> train
contract (the Objective protocol, pruning by StopTraining, Optuna's public API only)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO
from helpers.train_setup import write_config, write_digits

import hpcdl
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.job import Job
from hpcdl.scheduler import JobHandle

WAIT_S = 600


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"))


def _logs(handle: JobHandle) -> str:
    """The end of rank 0's stdout and stderr, for assertion messages."""
    parts = []
    for path in handle.log_paths():
        text = path.read_text() if path.is_file() else "(missing)"
        parts.append(f"--- {path}\n{text[-3000:]}")
    return "\n".join(parts)


def _train_and_wait(run: hpcdl.Run) -> dict:
    handle = run.submit()
    state = run.wait(timeout=WAIT_S, poll=2)  # raises with the job's log tail on timeout
    assert state == "COMPLETED", _logs(handle)
    return run.result()


def _site_profile(tmp_path: Path, base: str, **changes) -> Path:
    profile = yaml.safe_load((REPO / f"hpcdl/sites/{base}.yaml").read_text())
    profile.update(changes)
    path = tmp_path / f"{profile['name']}.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


# -- training through the Python API -------------------------------------------------------------
def test_run_trains_digits_on_the_local_profile(tmp_path, digits):
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs", name="api")
    run = hpcdl.Run.from_config(config, ["epochs=6", "job.tasks_per_node=2"], site="local")
    result = _train_and_wait(run)
    assert result["status"] == "completed" and result["world_size"] == 2
    assert result["val_acc"] > 0.8, result
    assert run.folder.parent == tmp_path / "runs" and run.folder.name.startswith("api-")
    assert json.loads((run.folder / "result.json").read_text()) == result
    assert (run.folder / "model.pt").is_file()
    assert run.site_values()["site"] == "local"


@pytest.mark.slurm
def test_run_trains_digits_on_the_dev_cluster(devcluster, tmp_path, digits):
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs", name="api-slurm")
    run = hpcdl.Run(config, ["job.nodes=2", "job.tasks_per_node=1", "epochs=6"], site=devcluster)
    result = _train_and_wait(run)
    assert result["world_size"] == 2 and result["val_acc"] > 0.8, result
    assert run.handle is not None and run.handle.site == devcluster
    values = run.site_values()
    assert values["site"] == devcluster and values["scheduler"] == "slurm"
    assert values["scratch"] == "/tmp/hpcdl-scratch/$SLURMD_NODENAME"  # as written: per node


# -- the run folder ------------------------------------------------------------------------------
def test_run_folder_holds_the_resolved_config_and_the_sites_values(tmp_path, digits, monkeypatch):
    site = _site_profile(
        tmp_path, "local", name="snap", wandb_mode="disabled", scratch="/scratch/$USER",
        preemption={"signal": "TERM", "delay_s": 45},
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "train.yaml", digits, Path("runs"), log__wandb_mode=None)
    run = hpcdl.Run(config, ["epochs=3", "run_dir=runs/snap"], site=str(site))
    assert run.run_dir is None  # nothing written before prepare()/submit()
    folder = run.prepare()
    assert folder == tmp_path / "runs/snap" and run.new
    stored = yaml.safe_load((folder / "config.yaml").read_text())
    assert stored["run_dir"] == str(folder) and stored["epochs"] == 3
    assert stored["data"]["train"] == str(digits / "train")  # absolute: valid on any node
    assert stored["job"]["site"] == str(site)
    assert json.loads((folder / "site.json").read_text()) == {
        "site": "snap",
        "scheduler": "local",
        "wandb_mode": "disabled",  # the config leaves it to the site
        "scratch": "/scratch/$USER",
        "preemption": {
            "signal": "TERM",
            "delay_s": 45,
            "preempt_signals": ["TERM"],
            "grace_time_s": 60,
        },
    }
    loaded = hpcdl.Run.load(folder)
    assert loaded.run_dir == folder and loaded.config == run.config
    assert hpcdl.Run(config, ["log.wandb_mode=offline"], site=str(site)).prepare() != folder
    with pytest.raises(HpcdlError, match=r"has no result\.json"):
        run.result()


def test_run_folder_is_reused_to_resume_only_with_the_same_settings(tmp_path, digits):
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs")
    folder = tmp_path / "runs/resumed"
    first = hpcdl.Run(config, [f"run_dir={folder}"])
    first.prepare()
    again = hpcdl.Run(config, [f"run_dir={folder}", "epochs=30"])  # more epochs: a resume
    assert again.prepare() == folder and not again.new
    with pytest.raises(ConfigError, match=r"run_dir: .* holds a run with a different 'seed'"):
        hpcdl.Run(config, [f"run_dir={folder}", "seed=7"]).prepare()


def test_run_from_a_config_object_applies_overrides(tmp_path, digits):
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs")
    base = hpcdl.Run(config).config
    run = hpcdl.Run(base, ["optimizer.lr=0.01", "job.nodes=2"], site="devcluster")
    assert run.config.optimizer.lr == 0.01 and run.config.job.site == "devcluster"
    assert run.config.job.world_size == 4  # 2 nodes x the config's 2 tasks
    job = run.job()
    assert job.requeue and job.nodes == 2 and job.name == base.name
    with pytest.raises(ConfigError, match="zero_stage"):
        hpcdl.Run(base, ["zero_stage=5"])


# -- rollback ------------------------------------------------------------------------------------
def test_rejected_config_writes_nothing(tmp_path, digits, job_root):
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs")
    run = hpcdl.Run(config, ["job.partition=nope"], site="devcluster")
    with pytest.raises(ConfigError, match="partition: unknown partition 'nope'"):
        run.submit()
    assert not (tmp_path / "runs").exists() and not job_root.exists()


def test_failed_submission_removes_the_new_run_folder(tmp_path, digits, monkeypatch):
    def refuse(self, site=None, test_only=False):
        raise HpcdlError("submission failed: sbatch: error: no way")

    monkeypatch.setattr(Job, "submit", refuse)
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs")
    run = hpcdl.Run(config, site="local")
    with pytest.raises(HpcdlError, match="no way"):
        run.submit()
    assert not any((tmp_path / "runs").iterdir()) and run.run_dir is None
    kept = tmp_path / "runs/kept"  # a folder being resumed stays, checkpoints and all
    hpcdl.Run(config, [f"run_dir={kept}"]).prepare()
    with pytest.raises(HpcdlError, match="no way"):
        hpcdl.Run(config, [f"run_dir={kept}"], site="local").submit()
    assert (kept / "config.yaml").is_file()


@pytest.mark.slurm
def test_submission_refused_by_slurm_removes_the_run_folder(devcluster, tmp_path, digits, job_root):
    """A partition the profile declares but the cluster does not have: hpcdl's checks pass,
    sbatch refuses, and the run folder made for the job is gone again."""
    profile = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
    ghost = {**profile["partitions"][0], "name": "ghost", "default": False}
    site = _site_profile(tmp_path, "devcluster", name="ghosts",
                         partitions=[*profile["partitions"], ghost])  # fmt: skip
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs")
    run = hpcdl.Run(config, ["job.partition=ghost"], site=str(site))
    with pytest.raises(HpcdlError, match=r"(?i)partition"):
        run.submit()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# -- hpo <-> train: the Objective protocol -------------------------------------------------------
def test_objectives_are_resolved_to_the_protocol():
    from hpcdl.hpo.objective import TrainObjective
    from hpcdl.hpo.protocol import FunctionObjective, Objective, as_objective
    from tests.helpers import objectives

    assert isinstance(objectives.curve, Objective)
    assert as_objective(objectives.curve, "x") is objectives.curve
    assert isinstance(as_objective(TrainObjective, "t"), TrainObjective)  # a class: instantiated
    wrapped = as_objective(objectives.plain, "tests.helpers.objectives:plain")
    assert isinstance(wrapped, FunctionObjective) and isinstance(wrapped, Objective)
    assert wrapped.check(None) is None
    with pytest.raises(HpcdlError, match="objectives:plain has no final"):
        wrapped.final({}, None, Path("."))
    with pytest.raises(HpcdlError, match="neither an Objective nor a function"):
        as_objective(42, "m:forty_two")


def test_a_plain_function_objective_still_runs_a_sweep(job_root):
    from hpcdl.hpo import Sweep, SweepSpec

    spec = SweepSpec.model_validate({
        "name": "plain", "objective": "tests.helpers.objectives:plain", "trials": 2,
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}}, "parallelism": 1,
        "sampler": {"name": "random", "seed": 0}, "final": False,
        "resources": {"site": "local", "time": "10m"},
    })  # fmt: skip
    sweep = Sweep(spec)
    sweep.run()
    sweep.wait(timeout=120)
    assert [s.state for s in sweep.slots()] == ["complete", "complete"]
    assert all(len(t.intermediate_values) == 4 for t in sweep.study().trials)


def test_trial_reporter_uses_the_public_api_and_keeps_the_first_value(tmp_path):
    from hpcdl.hpo.study import TrialReporter, storage

    study = optuna.create_study(
        study_name="r", storage=storage(tmp_path), pruner=optuna.pruners.ThresholdPruner(lower=0.5)
    )
    number = study.ask().number
    other = study.ask().number
    reporter = TrialReporter(study, storage(tmp_path), other)  # another process's storage
    reporter.report(0.9, 1)
    reporter.report(0.1, 1)  # a resumed trial reports its epoch again: the first value stays
    assert not reporter.should_prune()
    reporter.report(0.2, 2)
    assert reporter.should_prune()  # below the threshold
    trials = {t.number: t for t in study.get_trials()}
    assert trials[other].intermediate_values == {1: 0.9, 2: 0.2}
    assert trials[number].intermediate_values == {}


def test_pruning_reaches_the_objective_as_stop_training(tmp_path, monkeypatch):
    """The pruner's decision is StopTraining(tag="pruned") raised by ctx.report (the trainer
    tags the W&B run with it); the slot and the study record the trial as pruned."""
    import hpcdl.hpo.trial as trial_module
    from hpcdl.hpo import SweepSpec
    from hpcdl.hpo.protocol import BaseObjective
    from hpcdl.hpo.study import storage
    from hpcdl.train.stop import StopTraining

    seen: list[BaseException] = []

    class Falling(BaseObjective):
        def run(self, params, ctx):
            try:
                for epoch in range(1, 4):
                    ctx.report(epoch, 0.3 / epoch)
            except BaseException as exc:
                seen.append(exc)
                raise
            return 0.1

    spec = SweepSpec.model_validate({
        "name": "stop", "objective": "tests.helpers.objectives:curve", "trials": 1,
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}}, "final": False,
    })  # fmt: skip
    paths = trial_module.SweepPaths(tmp_path / "stop")
    paths.slots.mkdir(parents=True)
    study = optuna.create_study(study_name="stop", storage=storage(paths.root),
                                direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=0.2))  # fmt: skip
    slot = trial_module.claim(paths, spec, study, 0)
    monkeypatch.setattr(trial_module, "resolve_objective", lambda spec: Falling())
    done = trial_module.run_trial(paths, spec, study, slot)
    assert done.state == "pruned" and done.epochs == 2  # 0.15 < 0.2 at epoch 2
    (stop,) = seen
    assert isinstance(stop, StopTraining) and stop.tag == "pruned"
    assert "pruned at epoch 2" in str(stop)
    assert paths.read_slot(0).state == "pruned"
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
