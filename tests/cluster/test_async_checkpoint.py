"""Asynchronous checkpoints (``checkpoint.async_save``) are as crash-safe as synchronous ones:
a SIGKILL while a save is being written beside training leaves the previous checkpoint usable,
and the resumed run equals an uninterrupted one bit for bit (issue 25). The uninterrupted run
(ZeRO-3, one fixture for the module) also shows that eager training never imports
``torch._dynamo``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.train_setup import env_with_helpers, history, rows, same_weights, write_config

REPO = Path(__file__).resolve().parents[2]
WRITE_S = 0.25  # each checkpoint file's write is slowed this much in the killed run

# `hpcdl train`, saying at its exit which heavy modules it imported (argv[1]: the file), and
# with every checkpoint file's write slowed (argv[2] seconds): a kill must land inside a save,
# which for this model is otherwise a few milliseconds long
TRAIN = """
import atexit, json, sys, time
import hpcdl.train.async_checkpoint as a
out, slow_s = sys.argv[1], float(sys.argv[2])
write = a.write_file
def slow(path, data):
    time.sleep(slow_s)
    return write(path, data)
a.write_file = slow
heavy = ("torch", "deepspeed", "torch._dynamo", "torch._inductor")
def dump():
    with open(out, "w") as f:
        f.write(json.dumps([m for m in heavy if m in sys.modules]))
import hpcdl.exit_guard as guard
leave = guard.leave
def leaving(status):  # the CLI may end with os._exit (gloo threads alive): no atexit then
    dump()
    leave(status)
guard.leave = leaving
atexit.register(dump)
from hpcdl.cli import console_main
sys.argv = ["hpcdl", *sys.argv[3:]]
console_main()
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(env_with_helpers())
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env["PYTHONPATH"]])
    env.pop("HPCDL_ASYNC_CHECKPOINTS", None)  # the config asks for asynchronous saves
    return env


def _train(config: Path, run_dir: Path, slow_s: float = 0.0) -> subprocess.Popen[str]:
    modules = run_dir.parent / f"{run_dir.name}.modules.json"
    argv = [str(modules), str(slow_s), "train", str(config), "--local", f"run_dir={run_dir}"]
    return subprocess.Popen([sys.executable, "-c", TRAIN, *argv], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)  # fmt: skip


def _finish(proc: subprocess.Popen[str], timeout: float = 180) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (out + err)[-3000:]
    return err


@pytest.fixture(scope="module")
def config(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("async")
    return write_config(tmp / "train.yaml", synth, tmp / "runs", epochs=2, batch__size=32,
                        zero_stage=3, log__every_steps=5, log__wandb=False,
                        checkpoint__every_steps=10, checkpoint__keep=2,
                        checkpoint__async_save=True)  # fmt: skip


@pytest.fixture(scope="module")
def reference(config: Path) -> Path:
    """An uninterrupted run of ``config``."""
    ref = config.parent / "ref"
    _finish(_train(config, ref))
    return ref


def test_eager_training_never_imports_torch_dynamo(reference: Path):
    """The ZeRO-3 run (DeepSpeed engine, AdamW, asynchronous saves) ended without
    torch._dynamo or torch._inductor (2-3 s of imports before this fix)."""
    modules = reference.parent / f"{reference.name}.modules.json"
    assert json.loads(modules.read_text()) == ["torch", "deepspeed"]


@pytest.mark.parametrize("seed", [25])
def test_sigkill_during_an_async_save_resumes_from_the_previous_checkpoint_exactly(
    config: Path, reference: Path, tmp_path: Path, seed: int
):
    """The run is killed at a seeded random point inside the save of step 20 (its folder
    exists, its manifest does not); the resume warns about that folder, starts from the save
    of step 10, and ends with the history and weights of the uninterrupted run."""
    step, into = 20, random.Random(seed).uniform(0.0, 3 * WRITE_S)
    cut = tmp_path / "cut"
    ckpts = cut / "checkpoints"
    killed = _train(config, cut, slow_s=WRITE_S)
    folder = ckpts / f"step{step:08d}"
    deadline = time.monotonic() + 120
    while not folder.is_dir():
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the save never started"
        time.sleep(0.005)
    time.sleep(into)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert not (folder / "MANIFEST.json").exists(), f"the kill at +{into:.2f}s missed the save"
    previous = f"step{step - 10:08d}"
    assert (ckpts / previous / "MANIFEST.json").is_file()

    err = _finish(_train(config, cut))
    assert f"checkpoint {folder} is incomplete" in err, err[-3000:]
    resume = [r for r in rows(cut, "event") if r["event"] == "resume"]
    assert [(r["checkpoint"], r["step"]) for r in resume] == [(previous, step - 10)]
    ref = reference
    assert history(cut) == history(ref) and history(ref)["step"][-1]["step"] == 30
    assert same_weights(cut, ref)
    # every save of the uninterrupted run was committed and announced, its notes removed
    saved = [r["step"] for r in rows(ref, "event") if r["event"] == "checkpoint"]
    assert saved == [10, 20, 30], saved
    assert not (ref / "checkpoints" / ".writes").exists()
