"""``hpcdl sync --follow`` beside a running local sweep whose trials grow offline W&B runs.
``wandb`` is a stand-in on PATH (no network in tests, as for ``hpcdl sync``'s own tests) that
records which run it was given and how large the run's file was then."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hpcdl.cli import main
from hpcdl.hpo import Sweep, SweepSpec

FAKE_WANDB = """#!/bin/sh
# wandb sync RUN_DIR: note the run and its .wandb file's size at this moment
size=$(cat "$2"/*.wandb | wc -c)
printf '{"run": "%s", "size": %s}\\n' "$2" "$size" >> "$SYNC_LOG"
"""


def test_follow_uploads_new_and_grown_runs_once_each_and_ends_with_the_sweep(
    tmp_path, monkeypatch, capsys
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "wandb").write_text(FAKE_WANDB)
    (bin_dir / "wandb").chmod(0o755)
    log = tmp_path / "sync.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SYNC_LOG", str(log))
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "0.25")
    spec = SweepSpec.model_validate({
        "name": "synced", "objective": "tests.helpers.sync_objectives:growing", "trials": 4,
        "parallelism": 2, "final": False, "sampler": {"name": "random", "seed": 0},
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "resources": {"site": "local"},
    })  # fmt: skip
    sweep = Sweep(spec)
    sweep.run()
    assert main(["sync", "synced", "--follow", "--interval", "0.2"]) == 0  # in-process
    out = capsys.readouterr().out
    assert sweep.finished() and out.endswith("4 run(s) uploaded\n"), out
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    by_run: dict[str, list[int]] = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row["size"])
    runs = sorted(str(p) for p in sweep.paths.root.rglob("offline-run-*"))
    assert sorted(by_run) == runs  # every run, those that appeared later included
    for run, sizes in by_run.items():
        final = sum(f.stat().st_size for f in Path(run).glob("*.wandb"))
        assert sizes[-1] == final, (run, sizes, final)  # its last state uploaded
        assert sizes == sorted(set(sizes)), (run, sizes)  # never the same state twice
    assert any(len(sizes) > 1 for sizes in by_run.values()), by_run  # uploaded while growing
    assert main(["sync", "synced", "--follow"]) == 0
    again = capsys.readouterr().out
    assert "synced " not in again and again.endswith("4 run(s) uploaded\n"), again
    assert len(log.read_text().splitlines()) == len(rows)  # nothing uploaded twice
