"""Asynchronous saves of ZeRO-3 with its optimizer offloaded to the CPU (``offload_optimizer:
{device: cpu}``): DeepSpeed keeps the fp32 partitions and the optimizer state in host memory
and saves them from there. A run preempted mid-epoch and resumed ends with the weights and the
history of the run that was never stopped, as the other resume tests check for the default
path (one rank, in this process)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "helpers"))
from train_setup import Flag, history, make_run, rows, same_weights, train_run

from hpcdl import preemption


@pytest.fixture(autouse=True)
def one_cpu_device(monkeypatch):
    """DeepSpeed's CPU accelerator counts its devices (NUMA nodes) with ``numactl`` under
    ZeRO-3 offload unless ``LOCAL_SIZE`` says it: one here, what it finds on this machine."""
    monkeypatch.setenv("LOCAL_SIZE", "1")
    monkeypatch.delenv("HPCDL_ASYNC_CHECKPOINTS", raising=False)


# hpcdl builds a torch optimizer; DeepSpeed wants its own CPU Adam under ZeRO-Offload unless
# told that the client's optimizer is meant (on CPU there is no faster one to prefer)
OFFLOAD = dict(zero_stage=3, checkpoint__async_save=True,
               deepspeed={"zero_force_ds_cpu_optimizer": False,
                          "zero_optimization": {"offload_optimizer": {"device": "cpu"}}})  # fmt: skip


def test_zero3_offload_resumes_exactly_from_an_async_checkpoint(
    world1, synth, tmp_path, monkeypatch
):
    monkeypatch.setattr(preemption, "after_checkpoint", lambda *args, **kw: "4242")
    reference = make_run(tmp_path, synth, "ref", **OFFLOAD)
    assert train_run(reference)["status"] == "completed"

    run = make_run(tmp_path, synth, "cut", **OFFLOAD)
    assert train_run(run, Flag(at=5)) == {"status": "requeued", "step": 10, "job": "4242"}
    saved = [r for r in rows(run, "event") if r["event"] == "checkpoint"]
    assert [r["step"] for r in saved] == [10]
    assert train_run(run)["status"] == "completed"
    assert history(run) == history(reference)
    assert same_weights(run, reference)


def test_the_offloaded_optimizer_state_is_in_the_checkpoint(world1, synth, tmp_path):
    """The engine offloads (the config reached DeepSpeed), and the optimizer state it keeps on
    the CPU is saved (the optim_states file) and committed by the writer thread."""
    from hpcdl.train.trainer import Trainer

    run = make_run(tmp_path, synth, "files", epochs=1, **OFFLOAD)
    trainer = Trainer(run, Flag())
    trainer.setup()
    assert trainer.engine.zero_optimization_stage() == 3
    assert trainer.engine.optimizer.offload_optimizer is True
    assert trainer.checkpoints.asynchronous
    trainer.setup = lambda: None  # type: ignore[method-assign]  (done above)
    assert trainer.run()["status"] == "completed"
    tag = (run / "checkpoints/latest").read_text().strip()
    names = sorted(p.name for p in (run / "checkpoints" / tag).iterdir())
    assert any(n.endswith("optim_states.pt") for n in names), names
    saved = [r["tag"] for r in rows(run, "event") if r["event"] == "checkpoint"]
    assert saved[-1] == tag
