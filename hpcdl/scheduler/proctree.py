"""The processes of a local job, read from /proc: the tree under its controller, whether one is
still the process that was signalled (a pid may be reused), and stopping a tree for good."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

#: How long a cancelled local job's processes have to end after SIGINT (a sweep worker unwinds
#: its trial) before SIGKILL.
CANCEL_GRACE_S = 10.0


def _stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name (which may hold spaces and parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them (the local controller runs under a shell), from
    one read of /proc for all of them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(roots)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def pid_alive(pid: int, started_near: float | None = None) -> bool:
    """Is ``pid`` running (not a zombie) and, if given, started within 2 min of ``started_near``
    (so a recycled pid is not mistaken for the job)?"""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return False
    if fields[0] == "Z":
        return False
    if started_near is None:
        return True
    boot = next(
        float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime")
    )  # fmt: skip
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return abs(started - started_near) < 120


def _start_ticks(pid: int) -> str:
    """The process's start time (clock ticks after boot; "" when it is gone)."""
    try:
        return _stat_fields(pid)[19]
    except (OSError, IndexError):
        return ""


def _same_alive(pid: int, started: str) -> bool:
    """``pid`` still runs (not a zombie) and is the process that started at ``started``."""
    return bool(started) and _start_ticks(pid) == started and pid_alive(pid)


def ignores_sigint(pid: int) -> bool:
    """Whether ``pid`` ignores SIGINT (its ``SigIgn`` mask): a process started in the background
    of a non-interactive shell inherits that, and SIGINT would never stop it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except OSError:
        pass
    return False


def _wait_gone(procs: list[tuple[int, str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_same_alive(p, t) for p, t in procs) and time.monotonic() < deadline:
        time.sleep(0.05)


def stop_trees(roots: list[int], grace_s: float = CANCEL_GRACE_S,
               last: Callable[[int], bool] = lambda pid: False) -> None:  # fmt: skip
    """Stop every process under ``roots`` and return once they are gone: SIGINT (a Python job
    unwinds on it), SIGKILL after ``grace_s`` for those still there, and at once for those that
    ignore SIGINT. The roots and the processes ``last`` names (submitit's local controller,
    which SIGKILLs its tasks 1 s after its own SIGINT: under load a job's unwinding was cut
    short) get their SIGINT only once the others are gone, within the same grace. Returning
    only then matters: a worker that still wrote after a cancel returned raced the next
    command (``sweep resume``, ``sweep move-storage``)."""
    tree = descendants(roots) if roots else []
    later = [pid for pid in tree if pid in roots or last(pid)]
    deadline = time.monotonic() + grace_s
    signalled = _interrupt([pid for pid in tree if pid not in later])
    _wait_gone(signalled, grace_s)
    signalled += _interrupt(later)
    _wait_gone(signalled, max(deadline - time.monotonic(), 2.0))
    for pid, started in signalled:
        if _same_alive(pid, started):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _wait_gone(signalled, 5.0)


def _interrupt(pids: list[int]) -> list[tuple[int, str]]:
    """SIGINT to each of ``pids`` (SIGKILL to one that ignores it): (pid, start time) of those
    signalled, since a pid may be reused."""
    signalled = []
    for pid in pids:
        started = _start_ticks(pid)
        sig = signal.SIGKILL if ignores_sigint(pid) else signal.SIGINT
        with suppress(ProcessLookupError):
            os.kill(pid, sig)
            signalled.append((pid, started))
    return signalled


@contextmanager
def children_stop_on_sigint() -> Iterator[None]:
    """Processes started inside this block get SIGINT's default disposition even when this
    process ignores it (started with ``&`` from a script, or under ``make``): an ignored signal
    stays ignored across ``exec``, and the local job it starts would outlive ``hpcdl cancel``'s
    SIGINT. A Python handler is reset to the default at ``exec``, so for the block SIGINT gets
    Python's own handler. Only the main thread may set handlers; elsewhere nothing changes and
    :func:`stop_trees` kills such processes at once."""
    import threading

    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if not ignored or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
