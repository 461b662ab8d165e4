"""Test callables for submitit's ``checkpoint()`` protocol (importable in jobs as
``tests.helpers.checkpointable``: the tests put the repository on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from submitit.helpers import Checkpointable

HELD = {signal.SIGTERM, signal.SIGUSR2}  # the devcluster's preemption and time-limit signals


class Counter(Checkpointable):
    """Counts to ``steps``, one JSON line per step in ``out`` (with the run it was made in:
    ``SLURM_RESTART_COUNT``); its state is ``done``, which ``checkpoint()`` carries over. A step
    is written and counted with the preemption signals held, so a checkpoint never falls
    between the two (as ``checkpoint()`` must only read whole state). A requeued run steps
    every ``requeued_delay_s`` (default ``delay_s``): tests need the first run long, the rest
    short."""

    def __init__(
        self, out: str, steps: int, delay_s: float, requeued_delay_s: float | None = None
    ) -> None:
        self.out, self.steps, self.delay_s = out, steps, delay_s
        self.requeued_delay_s = delay_s if requeued_delay_s is None else requeued_delay_s
        self.done = 0

    def _write(self, **record: object) -> None:
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\n")

    def __call__(self) -> int:
        run = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        delay = self.requeued_delay_s if run else self.delay_s
        self._write(event="start", run=run, done=self.done)
        while self.done < self.steps:
            time.sleep(delay)
            signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
            try:
                self._write(event="step", run=run, step=self.done + 1, t=time.time())
                self.done += 1
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
        self._write(event="end", run=run, done=self.done)
        return self.done


class NoResume(Counter):
    """A Counter whose ``checkpoint()`` returns ``None`` (submitit: the job ends, no requeue)."""

    def checkpoint(self, *args: object, **kwargs: object) -> None:
        return None


def plain(out: str) -> str:
    """A callable without ``checkpoint()``."""
    Path(out).write_text("ran")
    return out


def where(out: str, module: object) -> None:
    """Where a callable runs: its working directory and where ``module`` was imported from."""
    info = {"cwd": os.getcwd(), "lib": module.__file__, "version": module.VERSION}  # type: ignore[attr-defined]
    Path(out).write_text(json.dumps(info))
