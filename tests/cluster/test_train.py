"""Training without the cluster: bad configs, the model zoo, metrics, exact resume under mpiexec,
corrupted checkpoints, ZeRO-3 + bf16 through the local profile."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import HPCDL, REPO, run_cli

sys.path.insert(0, str(Path(__file__).parents[1] / "helpers"))
from train_setup import (
    env_with_helpers,
    history,
    last_step,
    rows,
    same_weights,
    write_config,
    write_digits,
)

from hpcdl.cli import main
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.preemption import after_checkpoint, restarts, task_id, time_limit_signal
from hpcdl.scheduler import SlurmRequeue
from hpcdl.track import Tracker, rewind_jsonl
from hpcdl.train.models import build_model, loss_fn

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"))


def _clean_env() -> dict[str, str]:
    """No launcher variables leak in: the processes must discover their ranks themselves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "PMI"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return {**env, **env_with_helpers()}


# -- bad configs: one clear line, nothing queued, nothing written ------------------------------
BAD = [
    ("unknown model", ["model.name=transformer"], "model.name: unknown model 'transformer' (available: mlp, cnn, resnet"),
    ("zero stage 5", ["zero_stage=5"], "zero_stage: Input should be 0, 1, 2 or 3 (got 5)"),
    ("batch vs ranks", ["batch.size=96", "job.nodes=2", "job.tasks_per_node=2"],
     "batch.size: 96 is not divisible by batch.micro 16 x 4 ranks = 64"),
    ("batch vs micro", ["batch.size=70"], "batch.size 70 is not a multiple of batch.micro 16"),
    ("missing dataset", ["data.train=/nonexistent/train"],
     "data.train: /nonexistent/train: no such dataset directory"),
    ("shape vs model", ["model.input_shape=[3,32,32]"],
     "model.input_shape: (3, 32, 32) does not match the samples of data.train field 'x': (1, 8, 8)"),
    ("own model vs data", ["model={name: 'train_models:CifarNet'}"],
     "model: 'train_models:CifarNet' cannot take samples of shape (1, 8, 8)"),
    ("unknown model option", ["model.hiden=[3]"], "model.hiden: unknown option for model 'mlp'"),
    ("missing field", ["data.target=label"], "/train has no field 'label' (fields: x, y)"),
    ("unknown key", ["epoch=3"], "epoch: unknown field"),
    ("fp16 on CPU", ["precision=fp16"], "precision: fp16 needs GPUs"),
    ("site limit", ["job.nodes=9"], "job: nodes: 9 exceeds partition 'cpu' limit 4"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "overrides", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_fails_before_queueing(
    tmp_path, digits, job_root, capsys, label, overrides, expected
):
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs")
    rc = main(["train", str(config), *overrides, "--site", "devcluster"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not job_root.exists() or not any(job_root.iterdir())  # nothing submitted
    assert not (tmp_path / "runs").exists()  # no run folder either


# -- the model zoo -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("mlp", {"hidden": [32, 16], "activation": "gelu", "dropout": 0.2}),
        ("cnn", {"channels": [8, 16, 16], "activation": "silu", "norm": "batch"}),
        ("resnet", {"depth": [1, 2, 1], "width": 8, "activation": "elu"}),
    ],
)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_zoo_models_take_images(name, options, shape):
    model = build_model(name, shape, 10, options)
    assert model(torch.zeros(4, *shape)).shape == (4, 10)


def test_zoo_structure_is_configurable():
    def params(**options):
        return sum(p.numel() for p in build_model("resnet", (1, 8, 8), 10, options).parameters())

    assert (
        params(depth=[1])
        < params(depth=[2])
        < params(depth=[2, 2])
        < params(depth=[2, 2], width=64)
    )
    with pytest.raises(ConfigError, match="unknown activation 'swish'"):
        build_model("mlp", (64,), 10, {"activation": "swish"})
    with pytest.raises(ConfigError, match="needs \\(channels, height, width\\)"):
        build_model("cnn", (64,), 10, {})
    with pytest.raises(ConfigError, match=r"model\.name: cannot import 'no_such_module'"):
        build_model("no_such_module:Net", (64,), 10, {})


@pytest.mark.parametrize("name", ["cross_entropy", "multi_margin", "mse"])
def test_losses(name):
    logits = torch.randn(8, 10, dtype=torch.bfloat16, requires_grad=True)
    loss = loss_fn(name, 0.1)(logits, torch.arange(8))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and logits.grad is not None


# -- metrics: JSONL always, W&B never fatal --------------------------------------------------------
def _tracker(run_dir: Path, mode: str = "offline") -> Tracker:
    return Tracker(run_dir, enabled=True, config={}, name="t", wandb=True, wandb_mode=mode,
                   wandb_project="hpcdl-test")  # fmt: skip


def test_tracker_survives_missing_or_broken_wandb(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    t = _tracker(tmp_path)
    t.log("step", {"step": 1, "loss": 0.5})
    t.close()
    assert "wandb is not installed" in capsys.readouterr().err

    class Broken:
        Settings = dict

        @staticmethod
        def init(**kwargs):
            raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setitem(sys.modules, "wandb", Broken)
    t = _tracker(tmp_path, mode="online")
    t.log("step", {"step": 2, "loss": 0.25})
    t.close()
    assert "W&B unavailable (ConnectionError: api.wandb.ai unreachable)" in capsys.readouterr().err
    assert [r["loss"] for r in rows(tmp_path, "step")] == [0.5, 0.25]


def test_tracker_writes_offline_wandb_run(tmp_path):
    t = _tracker(tmp_path)
    t.log("step", {"step": 1, "loss": 0.5})
    t.close()
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    run_id = (tmp_path / "wandb_id").read_text()
    t = _tracker(tmp_path)  # a requeued job continues the same W&B run
    t.close()
    assert (tmp_path / "wandb_id").read_text() == run_id
    runs = [p.name for p in tmp_path.glob("wandb/offline-run-*") if p.is_dir()]
    assert runs and all(run_id in name for name in runs), runs
    # W&B's own package list is off (0.4 s per start); hpcdl saves it once per process
    saved = list(tmp_path.glob("wandb/offline-run-*/files/requirements.txt"))
    assert len(saved) == 2 and saved[0].read_text() == saved[1].read_text()
    assert f"torch=={torch.__version__}\n" in saved[0].read_text()


def test_rewind_drops_rows_logged_after_the_checkpoint(tmp_path):
    lines = [{"kind": "step", "step": s} for s in (1, 2, 3, 4)]
    lines += [{"kind": "epoch", "step": 2}, {"kind": "event", "step": 4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"cut')
    rewind_jsonl(tmp_path / "metrics.jsonl", 2)
    assert [r["step"] for r in rows(tmp_path, "step")] == [1, 2]
    assert rows(tmp_path, "epoch") == [] and len(rows(tmp_path, "event")) == 1


# -- preemption helpers ------------------------------------------------------------------------
def test_the_task_id_names_the_array_task(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
                "SUBMITIT_LOCAL_JOB_ID"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    assert task_id(local=False) is None and task_id() is None and restarts() == 0
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
    assert task_id() == "4242" and task_id(local=False) is None  # a local job: no requeue
    monkeypatch.setenv("SLURM_JOB_ID", "120")
    assert task_id(local=False) == "120" == task_id()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert task_id(local=False) == "100_7" == task_id() and restarts() == 2
    with pytest.raises(HpcdlError, match="max_requeues=2 exhausted"):
        after_checkpoint(5, "step00000005", "/runs/x", max_requeues=2, rank=0, slurm=SlurmRequeue())


def test_preemption_signal_is_usr2_unless_the_site_says_otherwise(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert time_limit_signal() == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "TERM")
    assert time_limit_signal() == signal.SIGTERM
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "NOPE")
    with pytest.raises(HpcdlError, match="SUBMITIT_PREEMPT_SIGNAL='NOPE' is not a signal name"):
        time_limit_signal()


# -- real runs (subprocesses: each holds its own process group) ------------------------------
def _rank_pid(run_dir: Path, rank: int) -> int:
    """The pid of the mpiexec-started process of ``rank`` training ``run_dir``."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"run_dir={run_dir}".encode() in cmd and f"PMI_RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} process for {run_dir}")


def _mpiexec_train(config: Path, run_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([MPIEXEC, "-n", "2", HPCDL, "train", str(config), "--local",
                             f"run_dir={run_dir}"], env=_clean_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _slow_config(path: Path, digits: Path, runs: Path) -> Path:
    return write_config(path, digits, runs, model__name="train_models:SlowMLP",
                        model__delay_s=0.02, epochs=3, log__every_steps=4,
                        checkpoint__every_steps=20)  # fmt: skip


@pytest.fixture(scope="module")
def mpiexec_reference(tmp_path_factory: pytest.TempPathFactory, digits: Path) -> Path:
    """An uninterrupted mpiexec -n 2 run that the interrupted ones are compared with."""
    root = tmp_path_factory.mktemp("mpiexec-ref")
    config = _slow_config(root / "train.yaml", digits, root / "runs")
    out, err = _mpiexec_train(config, root / "runs/ref").communicate(timeout=240)
    assert "completed: 66 steps, 3 epochs" in out, err[-3000:]
    return root / "runs/ref"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "seed"),
    # the preemption signal; the time-limit signal (USR2) sets the same flag, and its path is
    # test_train_slurm's time-limit test (one mpiexec pair of runs costs ~100 s on 2 cores)
    [(signal.SIGTERM, 99)],
    ids=["TERM"],
)
def test_mpiexec_run_signalled_on_one_rank_resumes_exactly(
    tmp_path, digits, mpiexec_reference, sig, seed
):
    """mpiexec -n 2 trains without Slurm; a signal to rank 1 alone, at a seeded random step
    after the first periodic checkpoint, stops both ranks at the same later step with a
    checkpoint; the resumed run equals an uninterrupted one bit for bit."""
    config = _slow_config(tmp_path / "train.yaml", digits, tmp_path / "runs")
    ref, cut = mpiexec_reference, tmp_path / "runs/cut"
    at = random.Random(seed).randint(22, 38)
    interrupted = _mpiexec_train(config, cut)
    deadline = time.monotonic() + 120
    while last_step(cut) < at:
        assert interrupted.poll() is None and time.monotonic() < deadline, interrupted.stderr
        time.sleep(0.05)
    os.kill(_rank_pid(cut, 1), sig)
    _out, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode != 0
    assert f"hpcdl: received {sig.name}: checkpointing at the next step" in err, err[-2000:]
    assert f"error: stopped by {sig.name} at step" in err and f"run_dir={cut}" in err, err[-2000:]
    stop = [r for r in rows(cut, "event") if r["event"] == "preempted"]
    assert len(stop) == 1 and at < stop[0]["step"] < 66
    # rank 0 (which logs the event) got no signal: the ranks agree on rank 1's, not a guess
    assert stop[0]["signal"] == sig.name and err.count(f"stopped by {sig.name}") == 2, err[-2000:]
    periodic = [r["step"] for r in rows(cut, "event") if r["event"] == "checkpoint"][:-1]
    assert periodic[0] == 20 and stop[0]["step"] > max(periodic), (periodic, stop)

    resumed = subprocess.run([MPIEXEC, "-n", "2", HPCDL, "train", str(config), "--local",
                              f"run_dir={cut}"], env=_clean_env(), text=True, capture_output=True,
                             timeout=180)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = [r["event"] for r in rows(cut, "event")]
    assert events.count("resume") == 1 and events[-1] == "completed"
    assert history(cut) == history(ref) and history(ref)["step"][-1]["step"] == 66
    assert same_weights(cut, ref)
    result = json.loads((ref / "result.json").read_text())
    assert result["world_size"] == 2 and result["val_acc"] > 0.6


def test_corrupted_checkpoint_is_skipped_for_the_previous_one(tmp_path, digits):
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs", epochs=2,
                          checkpoint__every_steps=10, checkpoint__keep=3)  # fmt: skip
    run_dir = tmp_path / "runs/r"
    env = {"OMP_NUM_THREADS": "1"}
    first = run_cli("train", str(config), "--local", f"run_dir={run_dir}", env=env, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step*")) == [
        "step00000030",
        "step00000040",
        "step00000044",
    ]
    assert (ckpts / "latest").read_text() == "step00000044"
    optim = next((ckpts / "step00000044").glob("*optim_states.pt"))
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, wrong checksum
    optim.write_bytes(bytes(data))
    (ckpts / "step00000050").mkdir()  # a save that never completed

    again = run_cli("train", str(config), "--local", f"run_dir={run_dir}", "epochs=3", env=env,
                    timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"checkpoint {ckpts / 'step00000050'} is incomplete" in again.stderr
    assert (
        f"checkpoint {ckpts / 'step00000044'} is corrupted "
        f"(file {optim.name} does not match its checksum); trying the previous one"
    ) in again.stderr
    resume = [r for r in rows(run_dir, "event") if r["event"] == "resume"]
    assert resume[0]["checkpoint"] == "step00000040" and resume[0]["step"] == 40
    steps = [r["step"] for r in rows(run_dir, "step")]
    assert steps == sorted(set(steps)) and steps[-1] == 66  # rows after step 40 rewritten once
    assert json.loads((run_dir / "result.json").read_text())["step"] == 66


def test_zero3_bf16_through_the_local_profile(tmp_path, digits):
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs", zero_stage=3,
                          precision="bf16", epochs=8, job__tasks_per_node=2)  # fmt: skip
    proc = run_cli("train", str(config), "--wait", env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = Path(proc.stdout.split("run folder: ")[1].split()[0])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["val_acc"] > 0.8, result
    weights = torch.load(run_dir / "model.pt")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert weights["net.1.weight"].shape == (128, 64)  # gathered from both ZeRO-3 shards


def test_all_corrupted_is_an_error_and_another_world_size_is_found(tmp_path):
    import torch.distributed as dist

    from hpcdl.train.checkpoint import MANIFEST, Checkpointer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ckpts = Checkpointer(tmp_path / "checkpoints", keep=2)
        assert ckpts.latest_valid() is None  # nothing yet: a fresh start
        folder = tmp_path / "checkpoints/step00000010"
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"weights")
        manifest = {"world_size": 1, "files": {"model.pt": {"bytes": 7, "sha256": "0" * 64}}}
        (folder / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(HpcdlError, match=r"no valid checkpoint in .* \(1 corrupted\)"):
            ckpts.latest_valid()
        # a checkpoint of 4 ranks is found; ZeRO-0 fp32 (not partitioned) loads it directly
        good = {"model.pt": {"bytes": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}}
        (folder / MANIFEST).write_text(json.dumps({"world_size": 4, "files": good}))
        assert ckpts.latest_valid() == "step00000010" and ckpts.world_of("step00000010") == 4
        assert ckpts.find(partitioned=False) == ("step00000010", 4, None)
    finally:
        dist.destroy_process_group()


def test_data_staged_once_to_the_sites_scratch(tmp_path, digits):
    site = yaml.safe_load((REPO / "hpcdl/sites/local.yaml").read_text())
    site.update(name="scratchy", scratch=str(tmp_path / "scratch"))
    (tmp_path / "scratchy.yaml").write_text(yaml.safe_dump(site))
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs", epochs=2,
                          data__stage=True, job__site=str(tmp_path / "scratchy.yaml"), job__tasks_per_node=2)  # fmt: skip
    proc = run_cli("train", str(config), "--wait", env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    staged = sorted(
        p.name.split("-")[0] for p in (tmp_path / "scratch").iterdir() if not p.name.startswith(".")
    )
    assert staged == ["train", "val"]  # one copy each, shared by both ranks
    for split in ("train", "val"):
        (copy,) = (tmp_path / "scratch").glob(f"{split}-*")
        assert (copy / "manifest.json").read_bytes() == (
            digits / split / "manifest.json"
        ).read_bytes()


def test_staging_needs_a_scratch_folder(tmp_path, digits, capsys):
    site = yaml.safe_load((REPO / "hpcdl/sites/local.yaml").read_text())
    site.pop("scratch", None)
    site["name"] = "noscratch"
    (tmp_path / "noscratch.yaml").write_text(yaml.safe_dump(site))
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs", data__stage=True)
    assert main(["train", str(config), "--site", str(tmp_path / "noscratch.yaml")]) == 2
    assert (
        "data.stage: site 'noscratch' names no node-local scratch folder" in capsys.readouterr().err
    )
