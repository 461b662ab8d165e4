"""W&B's import and run start (2 s here) happen beside training, not before its first step
(issue 25): the tracker queues W&B's calls for a thread of its own."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hpcdl.track import Tracker


def test_wandb_starts_beside_the_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Rows are written (metrics.jsonl) at once while W&B is still starting; W&B gets every
    row, in order, once its run exists, and close() waits for that and the run's end."""
    ready, runs = threading.Event(), []

    def init(**kwargs: Any) -> SimpleNamespace:
        ready.wait(30)  # a slow import and start
        run = SimpleNamespace(tags=(), summary={}, rows=[], finished=False)
        run.log, run.finish = run.rows.append, lambda: setattr(run, "finished", True)
        runs.append(run)
        return run

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init, Settings=dict))
    t = Tracker(tmp_path, enabled=True, config={}, name="t", wandb=True, wandb_mode="offline",
                wandb_project="p")  # fmt: skip
    started = time.monotonic()
    for step in (1, 2, 3):
        t.log("step", {"step": step}, echo=False)
    t.tag("pruned")
    assert time.monotonic() - started < 1 and not runs  # nothing waited for W&B
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    ready.set()
    t.close()
    (run,) = runs
    assert run.rows == [{"step/step": 1}, {"step/step": 2}, {"step/step": 3}]
    assert run.tags == ("pruned",) and run.finished


def test_once_started_the_calls_are_the_callers_again(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """The W&B thread ends once it made the queued calls: a second thread woken at every step
    beside torch's OpenMP threads slowed the docs' digits training sevenfold on 2 cores."""
    callers: list[str] = []

    def init(**kwargs: Any) -> SimpleNamespace:
        run = SimpleNamespace(tags=(), summary={}, finished=False)
        run.log = lambda row: callers.append(threading.current_thread().name)
        run.finish = lambda: setattr(run, "finished", True)
        return run

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init, Settings=dict))
    t = Tracker(tmp_path, enabled=True, config={}, name="t", wandb=True, wandb_mode="offline",
                wandb_project="p")  # fmt: skip
    beside = t._wandb
    assert beside is not None
    beside._thread.join(30)  # started, nothing queued: it hands the run over and ends
    assert not beside._thread.is_alive()
    for step in (1, 2):
        t.log("step", {"step": step}, echo=False)
    t.close()
    assert callers == [threading.current_thread().name] * 2
