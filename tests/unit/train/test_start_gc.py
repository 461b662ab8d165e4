"""The collector paused for a process's start and back once it is set up (issue 25):
hpcdl/train/start_gc.py and the trainer's call to it."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcdl.train import start_gc
from hpcdl.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parents[2] / "helpers"))
from train_setup import make_run, rows, train_run


@pytest.fixture(autouse=True)
def collector() -> Iterator[None]:
    """Every test starts and ends with the collector on, nothing paused and nothing frozen."""
    start_gc.resume()
    gc.enable()
    yield
    start_gc.resume()
    gc.enable()
    gc.unfreeze()


def test_only_a_paused_start_freezes_its_imports():
    """Freezing is for a start's imports: a process that did not pause (a notebook, a test)
    keeps every object collectable."""
    assert start_gc.freeze_imports() is False and gc.get_freeze_count() == 0
    assert start_gc.pause()
    assert start_gc.freeze_imports() is True and gc.get_freeze_count() > 0


@pytest.mark.parametrize(
    ("enabled_before", "paused_by_us", "enabled_after_resume"),
    [
        (True, True, True),  # ours: paused, and back on at resume
        (False, False, False),  # someone else turned it off: left off, resume does nothing
    ],
)
def test_pause_and_resume(enabled_before: bool, paused_by_us: bool, enabled_after_resume: bool):
    if not enabled_before:
        gc.disable()
    assert start_gc.pause() is paused_by_us
    assert not gc.isenabled() and start_gc.paused() is paused_by_us
    assert start_gc.pause() is False  # a second pause changes nothing
    assert start_gc.resume() is paused_by_us
    assert gc.isenabled() is enabled_after_resume and not start_gc.paused()
    assert start_gc.resume() is False


def test_the_limit_resumes_a_start_that_never_trains():
    """A custom objective or a failure before training: the collector is back at the limit."""
    assert start_gc.pause(limit_s=0.05)
    deadline = time.monotonic() + 10
    while start_gc.paused() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gc.isenabled() and not start_gc.paused()


def test_a_forked_child_gets_its_collector_back():
    """The child of a fork has no timer thread (packing's lanes): its collector is on at once.
    (The at-fork hook itself, called here in-process: unit tests start no process.)"""
    assert start_gc.pause()
    start_gc._after_fork_in_child()
    assert gc.isenabled() and not start_gc.paused()


def test_the_trainer_resumes_the_collector_before_its_first_step(
    world1: None, synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Paused at the process's start (worker_task_main, run_job), the collector stays off through
    the set-up (imports, engine) and is on for every step of the training."""
    seen: dict[str, list[bool]] = {"setup": [], "step": []}
    setup, micro_step = Trainer.setup, Trainer.micro_step

    def recorded_setup(self: Trainer) -> None:
        seen["setup"].append(gc.isenabled())
        setup(self)

    def recorded_step(self: Trainer, batch: object) -> bool:
        seen["step"].append(gc.isenabled())
        return micro_step(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "setup", recorded_setup)
    monkeypatch.setattr(Trainer, "micro_step", recorded_step)
    run_dir = make_run(tmp_path, synth, "gc", epochs=1, max_steps=2, checkpoint__every_steps=0)
    assert start_gc.pause()
    before = gc.get_freeze_count()
    train_run(run_dir)
    assert gc.get_freeze_count() > before  # the imports frozen before the model was built
    assert seen["setup"] == [False]
    assert seen["step"] and all(seen["step"])
    assert gc.isenabled() and not start_gc.paused()
    (start,) = [r for r in rows(run_dir, "event") if r["event"] == "start"]
    assert start["cpu_s"] > 0  # the process's CPU time at set-up: hpcdl bench start reads it
