"""``hpcdl reproduce RUN`` end to end on the local profile: a tiny run trained in this process,
re-run from its folder bit-identically (metrics, result, weights); a folder without its config,
changed data and other code are refused with one line, exit 2, before anything runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_line_error

sys.path.insert(0, str(Path(__file__).parents[1] / "helpers"))
from train_setup import same_weights, write_config, write_digits

from hpcdl.cli import main

# 8 steps over 2 epochs (4 of each): the second epoch starts from the first's state
TINY = {"model": {"name": "mlp", "hidden": [16]}, "epochs": 2, "max_steps": 8, "log__wandb": False,
        "log__every_steps": 1, "checkpoint__every_steps": 0, "batch__size": 320,
        "batch__micro": 160}  # fmt: skip


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                   check=True, capture_output=True, timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(project, digits, run folder): a run trained from a git project with an uncommitted
    change (the diff is part of what is recorded)."""
    root = tmp_path_factory.mktemp("reproduce")
    project = root / "project"
    project.mkdir()
    (project / "train.py").write_text("print('v1')\n")
    _git(project, "init", "-q")
    _git(project, "add", "train.py")
    _git(project, "commit", "-q", "-m", "v1")
    (project / "train.py").write_text("print('v1, edited')\n")  # uncommitted
    digits = write_digits(root / "digits")
    config = write_config(root / "tiny.yaml", digits, root / "runs", **TINY)
    run_dir = root / "runs/tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        assert main(["train", str(config), "--local", f"run_dir={run_dir}"]) == 0
    return project, digits, run_dir


def test_a_local_run_is_reproduced_bit_identically(trained, tmp_path, capsys, monkeypatch):
    project, _, run_dir = trained
    recorded = json.loads((run_dir / "provenance.json").read_text())
    assert recorded["code"]["commit"] and recorded["code"]["diff_sha256"]
    assert "edited" in (run_dir / "code.diff").read_text()
    assert {"train", "val"} <= recorded["data"].keys() and recorded["versions"]["torch"]
    monkeypatch.chdir(project)
    capsys.readouterr()
    assert main(["reproduce", str(run_dir), "--out", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out
    assert "bit-identical:" in out and "weight tensors equal" in out, out
    assert same_weights(run_dir, tmp_path / "again")  # checked here too, not only by the command
    a, b = (json.loads((d / "result.json").read_text()) for d in (run_dir, tmp_path / "again"))
    assert (a["val_loss"], a["val_acc"], a["step"]) == (b["val_loss"], b["val_acc"], b["step"])


def test_what_a_rerun_lacks_or_what_changed_is_one_line(trained, tmp_path, capsys, monkeypatch):
    project, digits, run_dir = trained
    monkeypatch.chdir(project)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "config.yaml").unlink()
    line = one_line_error(capsys, main(["reproduce", str(copy)]))
    assert line.startswith(f"error: {copy}: config.yaml: missing: the run's resolved config"), line
    assert not (copy / "reproduced").exists()  # nothing written
    for name in ("model.pt", "provenance.json"):
        shutil.rmtree(copy)
        shutil.copytree(run_dir, copy)
        (copy / name).unlink()
        assert f"{name}: missing" in one_line_error(capsys, main(["reproduce", str(copy)]))
    # the code: another commit here than the recorded one
    (project / "train.py").write_text("print('v2')\n")
    line = one_line_error(capsys, main(["reproduce", str(run_dir)]))
    assert "code: the run was made at commit " in line and "with uncommitted changes" in line
    assert f"and apply {run_dir / 'code.diff'}, or pass --any-code" in line, line
    (project / "train.py").write_text("print('v1, edited')\n")  # as recorded again
    # the data: a manifest that changed since
    manifest = digits / "val/manifest.json"
    saved = manifest.read_bytes()
    try:
        manifest.write_bytes(saved + b"\n")
        line = one_line_error(capsys, main(["reproduce", str(run_dir)]))
        assert f"data.val: {digits / 'val'} changed since the run (manifest sha256" in line, line
    finally:
        manifest.write_bytes(saved)
    assert not (run_dir / "reproduced").exists()
