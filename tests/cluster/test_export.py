"""`hpcdl export`: full weights out of a checkpoint of any ZeRO stage and precision, in one CPU
process, equal to the completed run's ``model.pt`` for its final checkpoint; bad inputs are one
line and write nothing.

Tiny trainings on a synthetic dataset: ZeRO-0 and ZeRO-2 in this process (world size 1, gloo),
ZeRO-3 under ``mpiexec -n 2`` (two real shards to merge). The exports run through the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HPCDL

sys.path.insert(0, str(Path(__file__).parents[1] / "helpers"))
from train_setup import env_with_helpers, make_run, train_run

from hpcdl.cli import main
from hpcdl.train.config import read_run_config
from hpcdl.train.export import load_exported, safetensors_available
from hpcdl.train.models import build_model

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


@pytest.fixture(scope="module")
def runs(world1, synth, tmp_path_factory) -> dict[str, Path]:
    """Completed runs of 15 steps (checkpoints at 10 and 15) by (ZeRO stage, precision)."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for stage, precision in ((0, "bf16"), (2, "bf16"), (2, "fp32")):
        name = f"z{stage}-{precision}"
        run_dir = make_run(tmp, synth, name, epochs=1, zero_stage=stage, precision=precision)
        assert train_run(run_dir)["status"] == "completed"
        out[name] = run_dir
    return out


@pytest.fixture(scope="module")
def zero3_world2(synth, tmp_path_factory) -> Path:
    """ZeRO-3 + bf16 on two ranks (mpiexec): each rank holds half of every parameter."""
    tmp = tmp_path_factory.mktemp("z3")
    from train_setup import write_config

    config = write_config(tmp / "z3.yaml", synth, tmp / "runs", epochs=1, batch__size=32,
                          log__wandb=False, zero_stage=3, precision="bf16",
                          checkpoint__every_steps=10)  # fmt: skip
    run_dir = tmp / "runs/z3"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "PMI"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([MPIEXEC, "-n", "2", HPCDL, "train", str(config), "--local",
                           f"run_dir={run_dir}"], env={**env, **env_with_helpers()}, text=True,
                          capture_output=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "result.json").read_text())["world_size"] == 2
    files = sorted(p.name for p in (run_dir / "checkpoints/step00000015").glob("*optim_states.pt"))
    assert len(files) == 2, files  # two shards to merge
    return run_dir


@pytest.fixture
def cli(capsys):
    def run(*args: str) -> tuple[int, str, str]:
        rc = main(["export", *args])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu")


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- equal to model.pt ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["z0-bf16", "z2-bf16", "z2-fp32"])
def test_export_of_the_final_checkpoint_equals_model_pt(runs, cli, tmp_path, name):
    """What is compared: ``model.pt`` holds the weights the engine computes with (bf16 for a
    bf16 run, gathered 16-bit under ZeRO-3). The export in that dtype equals it bit for bit:
    for ZeRO-1..3 it is the fp32 master copy rounded to bf16, exactly what DeepSpeed copies into
    the bf16 weights after each step. The default fp32 export of a ZeRO-2 run is the master copy
    itself (so it rounds to model.pt); for ZeRO-0 it is the module weights upcast."""
    run_dir = runs[name]
    precision = name.split("-")[1]
    final = load(run_dir / "model.pt")
    assert {t.dtype for t in final.values()} == {
        torch.bfloat16 if precision == "bf16" else torch.float32
    }

    rc, out, err = cli(str(run_dir), "--dtype", precision, "--out", str(tmp_path / "w.pt"))
    assert rc == 0, err
    assert "exported step00000015 (step 15, 6 tensors" in out
    assert equal(load(tmp_path / "w.pt"), final)

    rc, out, err = cli(str(run_dir))  # defaults: newest valid checkpoint, fp32, pt, in the run
    assert rc == 0, err
    default = run_dir / "export/step00000015/model.pt"
    fp32 = load(default)
    assert {t.dtype for t in fp32.values()} == {torch.float32}
    assert equal({k: v.to(final[k].dtype) for k, v in fp32.items()}, final)

    meta = json.loads((run_dir / "export/step00000015/model.json").read_text())
    assert meta["checkpoint"] == "step00000015" and meta["step"] == 15
    assert meta["zero_stage"] == int(name[1]) and meta["precision"] == precision
    assert meta["input_shape"] == [1, 8, 8] and meta["num_classes"] == 4
    cfg = read_run_config(run_dir)  # the model rebuilt from the run's own config takes them
    model = build_model(cfg.model.name, (1, 8, 8), 4, cfg.model.options)
    model.load_state_dict(fp32)
    rebuilt = load_exported(default)  # the README's two lines
    assert equal(rebuilt.state_dict(), fp32)


def test_export_of_zero3_bf16_shards_from_two_ranks(zero3_world2, tmp_path):
    """The CLI in a fresh process (no process group): both ZeRO-3 shards merged; the final
    checkpoint equals model.pt (gathered bf16) exactly; an earlier one loads and differs."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    proc = subprocess.run([HPCDL, "export", str(zero3_world2), "--dtype", "bf16", "--out",
                           str(tmp_path / "final.pt")], env=env, text=True, capture_output=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "from fp32 master weights (ZeRO-3 optimizer shards" in proc.stdout
    final = load(zero3_world2 / "model.pt")
    assert equal(load(tmp_path / "final.pt"), final)
    assert load(tmp_path / "final.pt")["net.1.weight"].shape == (128, 64)

    proc = subprocess.run([HPCDL, "export", str(zero3_world2), "--checkpoint", "step00000010",
                           "--out", str(tmp_path / "s10.pt")], env=env, text=True,
                          capture_output=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    early = load_exported(tmp_path / "s10.pt")
    assert json.loads((tmp_path / "s10.json").read_text())["checkpoint"] == "step00000010"
    assert not equal({k: v.bfloat16() for k, v in early.state_dict().items()}, final)


@pytest.mark.skipif(not safetensors_available(), reason="safetensors is not installed")
def test_safetensors_export(runs, cli, tmp_path):
    from safetensors.torch import load_file

    run_dir = runs["z2-bf16"]
    rc, _out, err = cli(str(run_dir), "--format", "safetensors", "--dtype", "bf16", "--out",
                       str(tmp_path / "w.safetensors"))  # fmt: skip
    assert rc == 0, err
    assert equal(load_file(str(tmp_path / "w.safetensors")), load(run_dir / "model.pt"))


# -- bad inputs: one line, nothing written --------------------------------------------------------
def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def copy_run(runs, tmp_path) -> Path:
    """A copy of the ZeRO-2 bf16 run to damage."""
    return Path(shutil.copytree(runs["z2-bf16"], tmp_path / "copy"))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def one_line_error(rc: int, err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]


def test_bad_inputs_are_one_line_and_write_nothing(copy_run, cli, tmp_path):
    before = tree(copy_run)
    ckpts = copy_run / "checkpoints"
    cases = [
        ([str(tmp_path / "nope")], f"{tmp_path / 'nope'} is not a run folder (no config.yaml)"),
        ([str(copy_run), "--checkpoint", "step00000099"],
         f"checkpoint {ckpts / 'step00000099'} cannot be exported: no such checkpoint"),
        ([str(copy_run), "--format", "onnx"], "unknown export format 'onnx' (choose from "),
        ([str(copy_run), "--dtype", "int8"], "unknown dtype 'int8' (choose from fp32, bf16, fp16)"),
        ([str(copy_run), "--out", str(copy_run / "model.pt")],
         f"{copy_run / 'model.pt'} already exists"),
        ([str(copy_run), "--out", str(copy_run / "config.yaml" / "w.pt")],
         "is not a folder"),
        ([str(copy_run), "--out", "/proc/hpcdl-export-test/w.pt"],
         "cannot write /proc/hpcdl-export-test/w.pt"),
    ]  # fmt: skip
    if not safetensors_available():
        cases.append(([str(copy_run), "--format", "safetensors"],
                      "needs the safetensors package, which is not installed"))  # fmt: skip
    for args, expected in cases:
        rc, _out, err = cli(*args)
        one_line_error(rc, err, expected)
        assert tree(copy_run) == before, args
    assert not Path("/proc/hpcdl-export-test").exists()
    assert list(tmp_path.iterdir()) == [copy_run]


def test_corrupt_checkpoints(copy_run, cli, tmp_path):
    """A named corrupt or incomplete checkpoint is refused; without --checkpoint the newest one
    that verifies is exported, with a warning about the newer corrupt one."""
    ckpts = copy_run / "checkpoints"
    flip_a_byte(next((ckpts / "step00000015").glob("*optim_states.pt")))
    rc, _out, err = cli(
        str(copy_run), "--checkpoint", "step00000015", "--out", str(tmp_path / "a.pt")
    )
    one_line_error(rc, err, "cannot be exported: file bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
                   " does not match its checksum")  # fmt: skip
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "a.json").exists()

    rc, _out, err = cli(str(copy_run), "--out", str(tmp_path / "b.pt"))
    assert rc == 0, err
    assert f"checkpoint {ckpts / 'step00000015'} is corrupted (file " in err
    assert json.loads((tmp_path / "b.json").read_text())["checkpoint"] == "step00000010"

    (ckpts / "step00000010" / "MANIFEST.json").unlink()  # a save that never completed
    rc, _out, err = cli(
        str(copy_run), "--checkpoint", "step00000010", "--out", str(tmp_path / "c.pt")
    )
    one_line_error(rc, err, "cannot be exported: no MANIFEST.json (its save never completed)")
    shutil.rmtree(ckpts / "step00000015")
    rc, _out, err = cli(str(copy_run), "--out", str(tmp_path / "c.pt"))
    one_line_error(rc, err, f"no complete checkpoint in {ckpts}")
    assert not (tmp_path / "c.pt").exists()
