"""A callable job that takes its time to stop after SIGINT, as a sweep worker does (it records
its trial's stop): tests/cluster/test_jobs_local.py's cancel test."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def run_until_stopped(folder: str) -> None:
    def stop(*_: object) -> None:
        Path(folder, "stopping").write_text("")
        time.sleep(5)  # submitit's local controller ends it before this sleep does

    signal.signal(signal.SIGINT, stop)
    Path(folder, "pid").write_text(str(os.getpid()))
    time.sleep(120)


def run_until_interrupted(folder: str, unwind_s: float = 0.0) -> None:
    """Sleeps until SIGINT and says so (``interrupted``): it unwound, it was not killed.
    ``unwind_s``: how long its unwinding takes first (a worker recording its trial's stop on a
    loaded machine; 3 s is longer than submitit's local controller waits after its own SIGINT
    before it kills its tasks)."""
    Path(folder, "pid").write_text(str(os.getpid()))
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        time.sleep(unwind_s)
        Path(folder, "interrupted").write_text("")
        raise
