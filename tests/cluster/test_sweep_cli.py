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
    status = run_cli("sweep", "status", "cli-toy", "--wide", env={"COLUMNS": "80"})
    assert status.returncode == 0 and status.stdout.count("cli-toy-t0000") == 5
    assert "finished" in status.stdout.splitlines()
    best = json.loads(run_cli("sweep", "best", "cli-toy", "--json").stdout)
    assert set(best["params"]) == {"x", "epochs"} and "test_acc" in best["final"]
    out = tmp_path / "rep"
    proc = run_cli("sweep", "report", "cli-toy", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert "cli-toy-t00000" in (out / "report.html").read_text()


LONG_NAMES = {
    "optimizer.lr": {"type": "loguniform", "low": 1.0e-4, "high": 3.0e-2},
    "optimizer.weight_decay": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-1},
    "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
    "model.activation": {"type": "choice", "values": ["relu", "gelu", "tanh"]},
    "batch.size": {"type": "choice", "values": [32, 64, 128]},
    "schedule.warmup_steps": {"type": "int", "low": 0, "high": 100},
    "x": {"type": "uniform", "low": 0.0, "high": 1.0},
}


def test_status_fits_80_columns_without_cutting_a_cell(tmp_path):
    """Seven parameters with long dotted names: every trial's state, metric and parameter values
    appear whole in an 80-column terminal, with a legend for the short headers."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({**TOY, "name": "wide-space", "space": LONG_NAMES,
                                    "pruner": {"name": "none"}, "trials": 4}))  # fmt: skip
    proc = run_cli("sweep", "run", str(spec), "--wait", "--timeout", "300", timeout=400)
    assert proc.returncode == 0, proc.stderr
    from hpcdl.hpo import Sweep

    rows = Sweep.load("wide-space").status()
    out = run_cli("sweep", "status", "wide-space", env={"COLUMNS": "80"}).stdout
    lines = out.splitlines()
    assert "…" not in out and "..." not in out, out
    assert max(len(line) for line in lines) <= 80, out
    assert "wd = optimizer.weight_decay" in out and "ws = schedule.warmup_steps" in out, out
    tokens = out.split()
    for r in rows:
        assert r["state"] == "complete"
        assert f"{r['val_acc']:.4g}" in tokens
        for key, value in r["params"].items():
            assert (f"{value:.3g}" if isinstance(value, float) else str(value)) in tokens, key
    header = next(line for line in lines if line.startswith("slot"))
    assert "state" in header and "val_acc" in header
    assert any(line.startswith("workers") and "COMPLETED" in line for line in lines), out
    wide = run_cli("sweep", "status", "wide-space", "--wide", env={"COLUMNS": "80"}).stdout
    assert "optimizer.weight_decay" in wide.splitlines()[2] and "wide-space-t00003" in wide


def test_resume_submits_a_missing_final_job_then_has_nothing_to_do(tmp_path, capsys):
    """Every trial finished but no final result (its job died): `sweep resume` submits a final
    job; once the result is there, a second resume says there is nothing to resume."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({**TOY, "name": "refinal", "trials": 2}))
    proc = run_cli("sweep", "run", str(spec), "--wait", "--timeout", "300", timeout=400)
    assert proc.returncode == 0, proc.stderr
    from hpcdl.hpo import Sweep

    sweep = Sweep.load("refinal")
    (sweep.paths.final / "result.json").unlink()
    status = run_cli("sweep", "status", "refinal", env={"COLUMNS": "80"}).stdout
    assert "stuck: every trial finished but there is no final result" in status, status
    proc = run_cli("sweep", "resume", "refinal")
    assert proc.returncode == 0 and "submitted the final job" in proc.stdout, proc.stderr
    sweep.wait(timeout=120)
    assert sweep.best()["final"]["test_acc"] > 0
    _wait_for_jobs(sweep)
    assert main(["sweep", "resume", "refinal"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: sweep 'refinal' has finished: no missing trials, nothing to resume"]


def _wait_for_jobs(sweep, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while any(j.live for j in sweep.jobs()):
        assert time.monotonic() < deadline, [(j.kind, j.state) for j in sweep.jobs()]
        time.sleep(0.5)


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
    ("collective timeout too short", {"collective_timeout_s": 1}, "collective_timeout_s: Input should be greater than or equal to 10"),
    ("bad space key", {"space": {"optimizer..lr": {"type": "uniform", "low": 0, "high": 1}}}, "dotted config path"),
    ("trials per task 2", {"trials_per_task": 2}, "trials_per_task 2: give 1 (one trial per array task) or leave it out"),
    ("trials per task 0", {"trials_per_task": 0}, "trials_per_task 0: give 1"),
    ("trials per task text", {"trials_per_task": "all"}, "trials_per_task: Input should be a valid integer"),
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
