"""Opt-in timing of a worker's study-storage writes (``HPCDL_TIME_STORAGE=1`` in the jobs'
environment; ``hpcdl bench scale`` and the scale test set it).

Each Optuna storage write a worker makes (a new trial, a parameter, an intermediate value, the
final state and value) is timed as the worker sees it: on the journal file, the file lock,
the append and the catch-up with the other workers' appends that every journal write does; on
PostgreSQL, one transaction to its commit. The worker writes the durations of each trial's
writes into its journal (``workers/TASK.jsonl``, ``storage_s``); nothing is timed otherwise.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

ENV = "HPCDL_TIME_STORAGE"
#: Optuna's BaseStorage methods that write a trial (what a worker calls per trial), and the
#: RDBStorage's own that Optuna's cache in front of it calls instead of the first two.
WRITES = (
    "create_new_trial",
    "_create_new_trial",
    "set_trial_param",
    "_set_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
)
_durations: list[float] = []
_depth = [0]  # a timed write calling another (create_new_trial -> _create_new_trial): once


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def instrument(store: Any) -> Any:
    """``store`` with its trial writes timed (in place, once), when enabled."""
    if not enabled() or getattr(store, "_hpcdl_timed", False):
        return store
    for name in WRITES:
        if hasattr(store, name):
            setattr(store, name, _timed(getattr(store, name)))
    store._hpcdl_timed = True
    return store


def _timed(method: Any) -> Any:
    @functools.wraps(method)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        _depth[0] += 1
        try:
            return method(*args, **kwargs)
        finally:
            _depth[0] -= 1
            if _depth[0] == 0:
                _durations.append(time.perf_counter() - t0)

    return timed


def take() -> list[float]:
    """The durations (s) timed since the last call, in order."""
    out = [round(d, 6) for d in _durations]
    _durations.clear()
    return out
