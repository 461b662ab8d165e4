"""Leave a process whose gloo threads outlive its work without Python's finalization.

Why: on Python < 3.14, a thread that takes the GIL once the interpreter is finalizing is ended
with ``pthread_exit``. A gloo worker thread (``pt_gloo_runloop``) that releases a finished
collective's tensors at that instant needs the GIL; its forced unwind crosses a ``noexcept``
C++ destructor and the process aborts ("terminate called without an active exception",
status -6) after all its work was done. ``destroy_process_group`` ends those threads only when
nothing else holds the group, and DDP and DeepSpeed hold it for good (development notes,
"Flakes": the gloo abort at exit, with the core dump).

So :func:`install` (called by :func:`hpcdl.launch.init_distributed`) registers an exit hook:
if gloo threads are still alive when the interpreter exits, the hook flushes what Python's
finalization would have flushed (logging, the standard streams, multiprocessing's children)
and ends the process with ``os._exit`` and the exit status the interpreter would have used.
Python 3.14 parks such threads instead (gh-87135), so there the hook is not installed.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["gloo_threads", "install", "installed", "leave_status"]

# The names torch gives gloo's threads (``prctl(PR_SET_NAME)``), as /proc shows them.
GLOO_THREAD_NAMES = ("pt_gloo_runloop", "gloo_tcp_loop")

_installed = False
_system_exit_status: int | None = None  # what the last sys.exit asked for


def installed() -> bool:
    return _installed


def install() -> None:
    """Register the exit hook once per process (a no-op on Python >= 3.14)."""
    global _installed
    if _installed or sys.version_info >= (3, 14):
        return
    _installed = True
    _record_sys_exit()
    atexit.register(_leave_if_gloo_threads_alive)


def gloo_threads() -> list[str]:
    """The names of this process's gloo threads still alive (from /proc; [] where none)."""
    names = []
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name in GLOO_THREAD_NAMES:
            names.append(name)
    return names


def leave_status(uncaught: BaseException | None, system_exit_status: int | None) -> int:
    """The exit status CPython itself would give a process ending this way: 1 after an uncaught
    exception (130 for Ctrl-C), else what sys.exit asked for, else 0."""
    if isinstance(uncaught, KeyboardInterrupt):
        return 130
    if uncaught is not None:
        return 1
    return 0 if system_exit_status is None else system_exit_status


def _status_of(arg: Any) -> int:
    """sys.exit's argument as CPython turns it into a status: None is 0, an int is itself
    (masked to a byte by the kernel), anything else is printed to stderr and gives 1."""
    if arg is None:
        return 0
    if isinstance(arg, int):
        return arg & 0xFF
    return 1


def _record_sys_exit() -> None:
    """Wrap sys.exit so the exit hook knows the status: CPython keeps it in a C local during
    finalization, out of Python's reach. (The console script, argparse and submitit all leave
    through sys.exit; nothing in hpcdl raises SystemExit itself.)"""
    original = sys.exit

    def exit_and_record(status: Any = None) -> Any:
        global _system_exit_status
        _system_exit_status = _status_of(status)
        return original(status)  # CPython prints a non-int status before it finalizes

    sys.exit = exit_and_record


def _leave_if_gloo_threads_alive() -> None:
    alive = gloo_threads()
    if not alive:
        return  # the group was freed: the normal finalization is safe
    # PyErr_Print stores an uncaught exception here before the interpreter finalizes.
    uncaught = getattr(sys, "last_value", None)
    status = leave_status(uncaught, _system_exit_status)
    logging.getLogger(__name__).debug(
        "leaving with status %d past %d gloo thread(s) still alive", status, len(alive)
    )
    _flush_like_finalization()
    os._exit(status)


def _flush_like_finalization() -> None:
    """What Python's own exit does that this process must not lose: exit hooks registered
    before this one (logging's, multiprocessing's) and the standard streams."""
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
