"""hpcdl.exit_guard's pure parts: the status a guarded process leaves with, and the threads it
looks for (the abort itself: tests/cluster/test_gloo_exit.py)."""

from __future__ import annotations

import threading

import pytest

from hpcdl import exit_guard


@pytest.mark.parametrize(
    ("uncaught", "system_exit", "status"),
    [
        (None, None, 0),  # the script returned
        (None, 0, 0),
        (None, 3, 3),  # sys.exit(3)
        (None, 255, 255),  # submitit's sys.exit(-1), masked as the kernel does
        (RuntimeError("x"), None, 1),  # a traceback: Python exits 1
        (RuntimeError("x"), 3, 1),  # an exception after a caught SystemExit still fails
        (KeyboardInterrupt(), None, 130),  # Ctrl-C
    ],
)
def test_the_status_is_what_python_would_have_given(uncaught, system_exit, status):
    assert exit_guard.leave_status(uncaught, system_exit) == status


@pytest.mark.parametrize(("arg", "status"), [(None, 0), (0, 0), (2, 2), (-1, 255), (256, 0),
                                             ("a message", 1), (True, 1)])  # fmt: skip
def test_sys_exit_arguments_become_statuses_as_in_cpython(arg, status):
    assert exit_guard._status_of(arg) == status


def test_only_gloo_threads_are_counted():
    done = threading.Event()
    thread = threading.Thread(target=done.wait, name="pt_gloo_runloop")  # Python's name, not comm
    thread.start()
    try:
        assert exit_guard.gloo_threads() == []  # /proc's comm is the OS name ("python")
    finally:
        done.set()
        thread.join()
