"""Asynchronous saves within a memory budget: staging holds a rank's share of a checkpoint in
memory, so what would exceed half of the node's available memory (shared by its ranks) is
written directly, and the checkpoint is as complete and as verifiable as any other."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "helpers"))
from train_setup import make_run, train_run

from hpcdl.train import async_checkpoint
from hpcdl.train.async_checkpoint import StagingEngine, memory_budget, tensor_bytes
from hpcdl.train.checkpoint import complete_tags, verify_folder

MEMINFO = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n"


@pytest.mark.parametrize(
    ("meminfo", "ranks", "expected"),
    [(MEMINFO, 1, 4_096_000_000), (MEMINFO, 4, 1_024_000_000), (MEMINFO, 0, 4_096_000_000),
     ("MemTotal: 10 kB\n", 1, None), ("", 2, None)],
)  # fmt: skip
def test_the_budget_is_half_the_available_memory_over_the_nodes_ranks(meminfo, ranks, expected):
    assert memory_budget(meminfo, ranks) == expected


def test_the_budget_reads_this_node(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    budget = memory_budget()
    assert budget is not None and budget > 0


def test_a_state_dict_counts_its_tensors_bytes():
    state = {"a": torch.zeros(10), "b": [torch.zeros(3, dtype=torch.float64), {"c": torch.ones(2,
             dtype=torch.uint8)}], "step": 7, "name": "x"}  # fmt: skip
    assert tensor_bytes(state) == 40 + 24 + 2


class Inner:
    """A checkpoint engine that writes with torch.save, as DeepSpeed's does."""

    def save(self, state_dict, path):
        torch.save(state_dict, path)


def test_files_past_the_budget_are_written_directly(tmp_path):
    engine = StagingEngine(Inner(), budget=100)
    engine.save({"w": torch.zeros(20)}, str(tmp_path / "a.pt"))  # 80 bytes: staged
    engine.save({"w": torch.zeros(10)}, str(tmp_path / "b.pt"))  # 40 more: over, written
    engine.save({"w": torch.zeros(5)}, str(tmp_path / "c.pt"))  # 20: still fits
    files = engine.take()
    assert [(p.name, data is None) for p, data in files] == [
        ("a.pt", False), ("b.pt", True), ("c.pt", False)]  # fmt: skip
    assert not (tmp_path / "a.pt").exists() and (tmp_path / "b.pt").is_file()
    assert engine.staged_bytes == 0  # take() hands the memory over


def test_an_async_run_over_its_budget_saves_complete_checkpoints(
    world1, synth, tmp_path, monkeypatch
):
    """With a budget of a few bytes every file is written directly: every checkpoint still has
    its manifest, every file verifies, and a resume from it completes the run."""
    monkeypatch.delenv("HPCDL_ASYNC_CHECKPOINTS", raising=False)
    monkeypatch.setattr(async_checkpoint, "memory_budget", lambda: 16)
    direct: list[str] = []
    real = async_checkpoint.write_file

    def spy(path: Path, data: memoryview | None) -> tuple[int, str]:
        if data is None:
            direct.append(path.name)
        return real(path, data)

    monkeypatch.setattr(async_checkpoint, "write_file", spy)
    run = make_run(tmp_path, synth, "budget", epochs=1, checkpoint__async_save=True)
    assert train_run(run)["status"] == "completed"
    assert direct and any(name.endswith("model_states.pt") for name in direct), direct
    tags = complete_tags(run / "checkpoints")
    assert tags
    for _, tag in tags:
        assert verify_folder(run / "checkpoints" / tag)[1] is None
