"""The pure parts of asynchronous checkpoints and of the two benchmarks of issue 25."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcdl.train.async_checkpoint import asynchronous, write_file
from hpcdl.train.bench_ckpt import blocked_s, render, training_s


@pytest.mark.parametrize(
    ("configured", "env", "expected"),
    [(False, None, False), (True, None, True), (False, "1", True), (True, "0", False),
     (True, "yes", True), (False, "", False)],
)  # fmt: skip
def test_the_environment_overrides_the_config_both_ways(monkeypatch, configured, env, expected):
    if env is None:
        monkeypatch.delenv("HPCDL_ASYNC_CHECKPOINTS", raising=False)
    else:
        monkeypatch.setenv("HPCDL_ASYNC_CHECKPOINTS", env)
    assert asynchronous(configured) is expected


def test_a_staged_file_is_written_whole_with_its_checksum(tmp_path: Path):
    import hashlib

    data = memoryview(b"x" * 100_000)
    assert write_file(tmp_path / "f.pt", data) == (100_000, hashlib.sha256(data).hexdigest())
    assert (tmp_path / "f.pt").read_bytes() == bytes(data)


def test_training_time_runs_from_the_start_event_to_the_last_step_row(tmp_path: Path):
    rows = [{"kind": "event", "event": "start", "time": 10.0},
            {"kind": "step", "step": 100, "time": 15.0},
            {"kind": "event", "event": "checkpoint", "step": 100, "time": 16.0},
            {"kind": "step", "step": 200, "time": 21.5},
            {"kind": "epoch", "epoch": 0, "time": 22.0}]  # fmt: skip
    rows.append({"kind": "event", "event": "checkpoint", "step": 200, "blocked_s": 9.0})  # final
    rows[2]["blocked_s"] = 0.25
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert training_s(tmp_path) == 11.5
    assert blocked_s(tmp_path, 200) == 0.25  # the periodic save, not the final one


def test_the_ckpt_table_says_what_each_kind_of_save_cost():
    r = {"model": "mlp", "model_options": {}, "zero_stage": 3, "world_size": 2, "steps": 300,
         "every": 100, "saves_per_run": 2, "checkpoint_mb": 12.5, "training_s":
         {"none": [10.0, 10.2], "sync": [12.0, 12.1], "async": [10.1, 10.2]},
         "lost_median": {"sync": 0.195, "async": 0.005},
         "blocked_median": {"sync": 0.18, "async": 0.004}}  # fmt: skip
    lines = render(r)
    assert "ZeRO-3, 2 ranks, 300 steps, a checkpoint every 100 (2 in the timed part" in lines[0]
    assert lines[-3].split()[-4:] == ["19.5", "%", "18.00", "%"]
    assert lines[-2].split()[-4:] == ["0.5", "%", "0.40", "%"]


def test_the_start_table_shows_each_rounds_phases_and_the_ratios_range():
    from hpcdl.hpo.bench_start import render

    rounds = [{"import_torch_s": 2.0, "claim_s": 0.9, "setup_s": 2.5, "start_s": 2.8, "ratio": 1.4},
              {"import_torch_s": 2.2, "claim_s": 1.0, "setup_s": None, "start_s": 3.5,
               "ratio": 1.59}]  # fmt: skip
    result = {"site": "devcluster", "rounds": rounds, "import_torch_s": 2.1, "claim_s": 0.95,
              "setup_s": 2.5, "start_s": 3.15, "ratio": 1.5, "ratio_range": [1.4, 1.59]}  # fmt: skip
    lines = render(result)
    assert lines[1].split() == ["round", "import", "torch", "claim", "set", "up", "first",
                                "step", "ratio"]  # fmt: skip
    assert lines[2].split() == ["0", "2.00", "s", "0.90", "s", "2.50", "s", "2.80", "s", "1.40"]
    assert lines[3].split()[5] == "-"  # a round without the trainer's start event
    assert lines[-1].split()[-6:] == ["1.50", "(range", "1.40-1.59;", "goal", "<=", "1.5)"]


def test_a_save_abandoned_by_a_timed_out_wait_never_commits_later(tmp_path: Path, monkeypatch):
    """The trainer's failure path waits 60 s for a save in flight, then goes on (a warm worker
    retries the trial in the same folder): that save must not write its manifest, ``latest``
    or prune later, behind the new attempt's back."""
    import threading

    from hpcdl.train import async_checkpoint
    from hpcdl.train.async_checkpoint import Writer

    release = threading.Event()
    real = async_checkpoint.write_file

    def stuck(path: Path, data: memoryview | None) -> tuple[int, str]:
        release.wait(30)
        return real(path, data)

    monkeypatch.setattr(async_checkpoint, "write_file", stuck)
    (tmp_path / "step00000010").mkdir()
    commits: list[dict] = []
    writer = Writer(tmp_path, "step00000010", 0, 1,
                    [(tmp_path / "step00000010" / "f.pt", memoryview(b"abc"))], commits.append)  # fmt: skip
    assert writer.wait(timeout=0.05) is False
    release.set()
    writer.thread.join(10)
    assert not writer.thread.is_alive()
    assert commits == [] and isinstance(writer.error, TimeoutError)

    (tmp_path / "step00000020").mkdir()
    done = Writer(tmp_path, "step00000020", 0, 1, [], commits.append)  # not stuck: committed
    assert done.wait(timeout=10) is True and len(commits) == 1
