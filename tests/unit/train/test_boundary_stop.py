"""A stop that checkpoints (``StopTraining(checkpoint=True)``, PBT's boundary) resumes exactly:
the run that stopped after its first epoch and was resumed ends with the weights of the run that
never stopped. On synth, an epoch is 30 micro-batches of 16 and a step (batch 64) is 4 of them:
each epoch ends with 2 micro-batches whose gradients wait for the next epoch's first step. A
checkpoint taken after the validation missed them (the PBT benchmark's kept trials drifted from
random search's after the first boundary); the stop now waits for that step."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "helpers"))
from train_setup import make_run, rows, same_weights, train_run

from hpcdl.train.stop import StopTraining

PBT_LIKE = dict(epochs=2, batch__size=64, checkpoint__every_steps=0, log__every_steps=1000)


def test_a_checkpointing_stop_resumes_to_the_uninterrupted_weights(world1, synth, tmp_path):
    ref = make_run(tmp_path, synth, "ref", **PBT_LIKE)
    assert train_run(ref)["status"] == "completed"

    run = make_run(tmp_path, synth, "boundary", **PBT_LIKE)
    stopped: list[int] = []

    def boundary(epoch: int, metrics: dict) -> None:
        if epoch == 0 and not stopped:
            stopped.append(epoch)
            raise StopTraining("boundary", tag="pbt", checkpoint=True)

    try:
        train_run(run, on_epoch=boundary)
        raise AssertionError("the boundary did not stop the run")
    except StopTraining:
        pass
    assert train_run(run)["status"] == "completed"
    assert same_weights(ref, run)
    epochs = lambda d: [(r["epoch"], r["val_acc"]) for r in rows(d, "epoch")]  # noqa: E731
    assert epochs(run)[-2:] == epochs(ref), (epochs(run), epochs(ref))
