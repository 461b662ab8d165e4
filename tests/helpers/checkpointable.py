"""Test callables for submitit's ``checkpoint()`` protocol (importable in jobs as
``tests.helpers.checkpointable``: the tests put the repository on PYTHONPATH)."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

from submitit.core.utils import DelayedSubmission
from submitit.helpers import Checkpointable


class Counter(Checkpointable):
    """Counts to ``steps``, one JSON line per step in ``out`` (with the run it was made in:
    ``SLURM_RESTART_COUNT``); its state is ``done``, which ``checkpoint()`` carries over. A
    requeued run steps every ``requeued_delay_s`` (default ``delay_s``): tests need the first
    run long, the rest short.

    A step is done once its line is in ``out``, and ``checkpoint()`` reads the count from there
    (and marks where it was taken with a ``checkpoint`` line). Python runs a signal handler
    between any two bytecodes of the main thread, so the handler may come between a step's line
    and ``done += 1``; masking the signal in the main thread does not hold it off, since the
    kernel hands a process's signal to any thread that does not mask it (numpy's OpenBLAS pool).
    """

    def __init__(
        self, out: str, steps: int, delay_s: float, requeued_delay_s: float | None = None
    ) -> None:
        self.out, self.steps, self.delay_s = out, steps, delay_s
        self.requeued_delay_s = delay_s if requeued_delay_s is None else requeued_delay_s
        self.done = 0

    def _write(self, **record: object) -> None:
        # one write(2) of the whole line: a handler that stops the task (submitit's SystemExit
        # on USR2) leaves a step's line written or not, never buffered for a later flush
        fd = os.open(self.out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)

    def __call__(self) -> int:
        run = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        delay = self.requeued_delay_s if run else self.delay_s
        self._write(event="start", run=run, done=self.done)
        while self.done < self.steps:
            time.sleep(delay)
            self._write(event="step", run=run, step=self.done + 1, t=time.time())
            self.done += 1
        self._write(event="end", run=run, done=self.done)
        return self.done

    def checkpoint(self, *args: object, **kwargs: object) -> DelayedSubmission:
        text = Path(self.out).read_text() if Path(self.out).exists() else ""
        written = [r["step"] for r in map(json.loads, text.splitlines()) if r["event"] == "step"]
        state = copy.copy(self)  # the running count goes on if no SIGKILL follows
        state.done = max(written, default=self.done)
        self._write(event="checkpoint", done=state.done)
        return DelayedSubmission(state, *args, **kwargs)


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
