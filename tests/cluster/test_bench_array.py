"""`hpcdl bench array` on the dev cluster at a small N: the table's shape and that every task of
every path ran exactly once (sacct). Its ratios are the benchmark's figures, not a test's
(docs/benchmarks.md): a loaded machine would fail any bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, sacct_finished

pytestmark = pytest.mark.slurm

N, THROTTLE = 8, 4  # two waves a path: the test stays near 30 s
PATHS = ["raw sbatch --array --wrap", "hpcdl command (from its script)", "hpcdl callable"]


def test_bench_array_table_and_every_task_once(devcluster: str, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = run_cli("bench", "array", str(N), "--throttle", str(THROTTLE), "--site", devcluster,
                   "--timeout", "240", "--out", str(out), timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"bench array: {N} tasks, throttle {THROTTLE}, site {devcluster}"
    assert lines[1] == "each task: python3 -c pass"
    assert lines[2] == "path" + " " * 30 + "wall s  submit s  tasks/s  vs raw  ran once"
    rows = lines[4 : 4 + len(PATHS)]
    assert [r[:32].rstrip() for r in rows] == PATHS
    assert all(len(line) <= 80 for line in lines[:7]), lines
    for row in rows:
        wall, submit, rate, ratio, once = row[32:].split()
        assert float(wall) > 0 and float(submit) >= 0 and float(rate) > 0 and float(ratio) > 0
        assert once == f"{N}/{N}", row
    assert rows[0].split()[-2] == "1.00"  # raw against itself
    assert lines[-1] == f"figures: {out / 'bench_array.json'}"
    figures = json.loads((out / "bench_array.json").read_text())
    assert [p["path"] for p in figures["paths"]] == PATHS
    for path in figures["paths"]:  # sacct: every task once, completed, on a node
        (job_id,) = path["job_ids"]
        tasks = sacct_finished(job_id, N)
        assert sorted(r["id"] for r in tasks) == sorted(f"{job_id}_{i}" for i in range(N)), tasks
        assert {r["state"] for r in tasks} == {"COMPLETED"}, tasks
        assert all(r["nodes"] not in ("", "None assigned") for r in tasks), tasks
    script = next((out / "jobs").glob("*bench-command*/*_submission.sh")).read_text()
    assert "submitit.core._submit" not in script  # the command array ran from its script


def test_bench_array_refuses_bad_input_with_one_line(devcluster: str) -> None:
    for args in (["0"], ["2000"], ["5", "--throttle", "0"], ["5", "--site", "local"]):
        proc = run_cli("bench", "array", *args)
        assert proc.returncode == 2, proc
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
