"""Test callables for submitit's ``checkpoint()`` protocol (importable in jobs as
``tests.helpers.checkpointable``: the tests put the repository on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from submitit.helpers import Checkpointable


class Counter(Checkpointable):
    """Counts to ``steps``, one JSON line per step in ``out`` (with the run it was made in:
    ``SLURM_RESTART_COUNT``); its state is ``done``, which ``checkpoint()`` carries over."""

    def __init__(self, out: str, steps: int, delay_s: float) -> None:
        self.out, self.steps, self.delay_s = out, steps, delay_s
        self.done = 0

    def _write(self, **record: object) -> None:
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\n")

    def __call__(self) -> int:
        run = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        self._write(event="start", run=run, done=self.done)
        while self.done < self.steps:
            time.sleep(self.delay_s)
            self._write(event="step", run=run, step=self.done + 1)
            self.done += 1
        self._write(event="end", run=run, done=self.done)
        return self.done


def plain(out: str) -> str:
    """A callable without ``checkpoint()``."""
    Path(out).write_text("ran")
    return out


def where(out: str, module: object) -> None:
    """Where a callable runs: its working directory and where ``module`` was imported from."""
    info = {"cwd": os.getcwd(), "lib": module.__file__, "version": module.VERSION}  # type: ignore[attr-defined]
    Path(out).write_text(json.dumps(info))
