"""`hpcdl sweep …` from the command line (local profile, toy objective) and bad sweep specs."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import run_cli

from hpcdl.cli import main

TOY = {
    "name": "cli-toy",
    "objective": "tests.helpers.objectives:curve",
    "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0},
              "epochs": {"type": "int", "low": 1, "high": 3}},
    "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
    "pruner": {"name": "median"},
    "trials": 5,
    "parallelism": 2,
    "resources": {"site": "local", "time": "10m"},
}  # fmt: skip


def test_run_wait_status_best_report(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump(TOY))
    proc = run_cli("sweep", "run", str(spec), "--wait", "--timeout", "300", timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert "best trial" in proc.stdout and "held-out test split: test_acc=" in proc.stdout
    status = run_cli("sweep", "status", "cli-toy", env={"COLUMNS": "250"})
    assert status.returncode == 0 and status.stdout.count("cli-toy-t0000") == 5
    best = json.loads(run_cli("sweep", "best", "cli-toy", "--json").stdout)
    assert set(best["params"]) == {"x", "epochs"} and "test_acc" in best["final"]
    out = tmp_path / "rep"
    proc = run_cli("sweep", "report", "cli-toy", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert "cli-toy-t00000" in (out / "report.html").read_text()


BAD_SPECS = [
    ("no train or objective", {"objective": None}, "give `train`"),
    ("bad param type", {"space": {"x": {"type": "normal", "low": 0, "high": 1}}}, "space.x"),
    ("low above high", {"space": {"x": {"type": "uniform", "low": 1, "high": 0}}}, "low (1.0) must be below high"),
    ("loguniform at zero", {"space": {"x": {"type": "loguniform", "low": 0, "high": 1}}}, "loguniform needs low > 0"),
    ("grid with tpe", {"space": {"x": {"type": "grid", "values": [1, 2]}}}, "is a grid parameter"),
    ("grid too small", {"sampler": {"name": "grid"}, "trials": 9,
                        "space": {"x": {"type": "grid", "values": [1, 2]}}}, "exceed the grid's 2 points"),
    ("unknown sampler", {"sampler": {"name": "bohb"}}, "sampler.name"),
    ("unknown pruner", {"pruner": {"name": "asha2"}}, "pruner.name"),
    ("zero trials", {"trials": 0}, "trials"),
    ("bad direction", {"direction": "up"}, "direction"),
    ("bad name", {"name": "my sweep"}, "use letters, digits"),
    ("bad objective", {"objective": "not a ref"}, "must look like package.module:function"),
    ("unknown field", {"trails": 3}, "trails: unknown field"),
    ("bad space key", {"space": {"optimizer..lr": {"type": "uniform", "low": 0, "high": 1}}}, "dotted config path"),
]  # fmt: skip


@pytest.mark.parametrize("label,change,expected", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_sweep_specs(tmp_path, capsys, job_root, label, change, expected):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({**TOY, **change}))
    rc = main(["sweep", "run", str(spec)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert str(spec) in err[0] and expected in err[0]
    assert not job_root.exists()


def test_unknown_sweep_name(capsys):
    assert main(["sweep", "status", "nope"]) == 2
    assert "no sweep named 'nope'" in capsys.readouterr().err


def test_sync_unknown_sweep(capsys):
    assert main(["sync", "nope"]) == 2
    assert "no sweep named 'nope'" in capsys.readouterr().err
