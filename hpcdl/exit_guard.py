"""Leave a process whose gloo threads outlive its work without the abort Python 3.11 gives it.

Why: on Python < 3.14, a thread that takes the GIL once the interpreter is finalizing is ended
with ``pthread_exit``. A gloo worker thread (``pt_gloo_runloop``) that is waiting for the GIL to
free a finished collective's tensors when finalization starts gets it only then; its forced
unwind crosses a ``noexcept`` C++ destructor and the process aborts ("terminate called without
an active exception", status -6) after all its work was done. ``destroy_process_group`` ends
those threads only when nothing else holds the group, and DDP and DeepSpeed hold it for good
(development notes, "Flakes": the gloo abort at exit, with the core dump).

Two guards, neither of which guesses an exit status:

- :func:`install` (called by :func:`hpcdl.launch.init_distributed`) registers an exit hook that,
  while gloo threads are alive, releases the GIL until every one of them is idle (asleep, and
  switched by nobody) before the interpreter finalizes: a thread still freeing a collective that
  completed as the program ended finishes first. A collective still *in flight* at exit (an
  async op never waited for) can complete later, during finalization; that the hook cannot stop.
- :func:`leave` is for a process that knows its own exit status (the ``hpcdl`` command): with
  gloo threads alive it flushes what Python's finalization would (logging, multiprocessing's
  children, MPI, the standard streams) and ends the process with ``os._exit(status)``, so not
  even an in-flight collective can abort it.

Python 3.14 parks such threads instead (gh-87135); both guards still do no harm there.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

__all__ = ["gloo_threads", "install", "leave", "wait_until_idle"]

# The names torch gives gloo's threads (``prctl(PR_SET_NAME)``), as /proc shows them.
GLOO_THREAD_NAMES = ("pt_gloo_runloop", "gloo_tcp_loop")
IDLE_SAMPLES = 3  # consecutive unchanged samples that make a thread idle
SAMPLE_S = 0.02
WAIT_MAX_S = 2.0

_installed = False


def install() -> None:
    """Register the exit hook (once per process)."""
    global _installed
    if not _installed:
        _installed = True
        atexit.register(wait_until_idle)


def gloo_threads() -> dict[str, tuple[str, int]]:
    """This process's gloo threads still alive: {thread id: (state, context switches)} from
    /proc ({} where there is none)."""
    found: dict[str, tuple[str, int]] = {}
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return {}
    for task in tasks:
        try:
            if (task / "comm").read_text().strip() not in GLOO_THREAD_NAMES:
                continue
            found[task.name] = _state_and_switches((task / "status").read_text())
        except OSError:  # the thread ended meanwhile
            continue
    return found


def _state_and_switches(status: str) -> tuple[str, int]:
    """A thread's state letter and its voluntary + involuntary context switches, from
    /proc/TID/status (``State:\\tS (sleeping)``, ``voluntary_ctxt_switches:\\t12``, ...)."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    state = fields.get("State", "?").split()[0] if fields.get("State", "").split() else "?"
    switches = sum(
        int(fields.get(key, "0").strip() or 0)
        for key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
    )
    return state, switches


def idle(samples: list[dict[str, tuple[str, int]]]) -> bool:
    """Whether the last :data:`IDLE_SAMPLES` samples show every gloo thread asleep with its
    context switches unchanged (a thread that wanted the GIL, released meanwhile by the sampler,
    would have run and switched)."""
    if len(samples) < IDLE_SAMPLES:
        return False
    last = samples[-IDLE_SAMPLES:]
    if any(set(s) != set(last[0]) for s in last):
        return False  # a thread came or went
    return all(all(state in ("S", "D") for state, _ in s.values()) for s in last) and all(
        s == last[0] for s in last
    )


def wait_until_idle(max_s: float = WAIT_MAX_S) -> bool:
    """Release the GIL until every gloo thread is idle (at most ``max_s``); True if they are
    (or there is none). The exit hook :func:`install` registers."""
    samples = [gloo_threads()]
    if not samples[0]:
        return True
    deadline = time.monotonic() + max_s
    while not idle(samples):
        if time.monotonic() > deadline:
            logging.getLogger(__name__).debug("gloo threads still busy after %.1f s", max_s)
            return False
        time.sleep(SAMPLE_S)  # releases the GIL: a thread waiting for it gets it now
        samples.append(gloo_threads())
    return True


def leave(status: int) -> None:
    """End the process with ``status`` now if gloo threads are alive (after flushing what
    Python's own exit would); return otherwise, for the caller to exit normally."""
    if not gloo_threads():
        return
    _flush_like_finalization()
    os._exit(status)


def _flush_like_finalization() -> None:
    """What Python's own exit does that this process must not lose: the exit hooks of
    logging and multiprocessing, MPI's finalization, and the standard streams."""
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        with contextlib.suppress(Exception):  # leaving regardless
            mp_util._exit_function()  # joins non-daemon children, ends daemon ones
    logging.shutdown()
    # mpi4py finalizes MPI in an exit hook that os._exit skips; under mpiexec (MPICH's hydra) a
    # rank that leaves unfinalized is a "BAD TERMINATION" and its peers are SIGKILLed (seen:
    # rank 0 killed before it printed the result, exit 9: docs/train.md's mpiexec line).
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        with contextlib.suppress(Exception):  # leaving regardless
            if mpi.Is_initialized() and not mpi.Is_finalized():
                mpi.Finalize()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
