"""A checkpointing stop (``StopTraining(checkpoint=True)``, PBT's boundary) with asynchronous
saves: the stop reaches the caller only once the boundary's checkpoint is committed, because the
caller copies it at once (:func:`hpcdl.hpo.pbt.snapshot_checkpoint` reads ``latest``). A save
still in flight would leave ``latest`` on the previous checkpoint (the copy takes the wrong
epoch), or on none; a save that failed would be copied from whatever ``latest`` still says."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "helpers"))
from train_setup import make_run, rows, train_run

from hpcdl.errors import HpcdlError
from hpcdl.train import async_checkpoint
from hpcdl.train.checkpoint import MANIFEST, tag_for
from hpcdl.train.stop import StopTraining

# epoch 0 ends at step 7 (30 micro-batches of 16, 4 per step: the stop waits for step 8)
PBT_LIKE = dict(epochs=2, batch__size=64, checkpoint__every_steps=0, log__every_steps=1000,
                checkpoint__async_save=True)  # fmt: skip


def boundary(epoch: int, metrics: dict) -> None:
    if epoch == 0:
        raise StopTraining("boundary", tag="pbt", checkpoint=True)


def test_the_stop_comes_after_the_boundary_checkpoint_is_committed(
    world1, synth, tmp_path, monkeypatch
):
    """The writer is slowed down: the stop must still find the boundary's checkpoint named by
    ``latest``, with its manifest, and its ``checkpoint`` event logged before ``stopped``."""
    monkeypatch.delenv("HPCDL_ASYNC_CHECKPOINTS", raising=False)
    real = async_checkpoint.write_file
    writing = threading.Event()

    def slow(path: Path, data: memoryview) -> tuple[int, str]:
        writing.set()
        threading.Event().wait(0.3)  # the training thread goes on meanwhile
        return real(path, data)

    monkeypatch.setattr(async_checkpoint, "write_file", slow)
    run = make_run(tmp_path, synth, "boundary", **PBT_LIKE)
    with pytest.raises(StopTraining):
        train_run(run, on_epoch=boundary)
    assert writing.is_set()  # the save was asynchronous
    ckpts = run / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    assert (ckpts / tag / MANIFEST).is_file()
    events = [r["event"] for r in rows(run, "event")]
    saved = [r["tag"] for r in rows(run, "event") if r["event"] == "checkpoint"]
    assert saved == [tag], events
    assert events.index("checkpoint") < events.index("stopped"), events


def test_a_boundary_checkpoint_that_failed_to_write_is_an_error_not_a_stop(
    world1, synth, tmp_path, monkeypatch
):
    """A full disk while the boundary's files are written: the caller gets the save's error
    (the trial's attempt fails and is retried), never a stop that says the checkpoint is
    there."""
    monkeypatch.delenv("HPCDL_ASYNC_CHECKPOINTS", raising=False)

    def full(path: Path, data: memoryview) -> tuple[int, str]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(async_checkpoint, "write_file", full)
    run = make_run(tmp_path, synth, "full", **PBT_LIKE)
    with pytest.raises(HpcdlError, match=r"checkpoint .* not saved .*No space left"):
        train_run(run, on_epoch=boundary)
    assert not (run / "checkpoints" / "latest").exists()
    assert not (run / "checkpoints" / tag_for(8) / MANIFEST).exists()
