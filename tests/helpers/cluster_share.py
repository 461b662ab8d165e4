"""How cluster tests share the one dev cluster when pytest-xdist runs several at once.

Most cluster tests only submit, wait for and cancel their own jobs: any number of them may run
side by side, as users of a real site do (the time they spend waiting on Slurm overlaps). A few
disturb jobs they do not own, and must run alone or apart:

- ``@pytest.mark.cluster_exclusive`` (a test): it sets a node DOWN, which ends every job on the
  node, someone else's too. It holds the cluster alone for the test.
- ``@pytest.mark.cluster_lock("NAME")`` (a module): the module's jobs use a resource that
  another such module must not use at the same time; for "preempt", a ``high`` partition job
  preempts whatever ``low`` job Slurm picks, so two modules that preempt would steal each
  other's jobs. Modules with the same name run one after the other.

Each module holds the cluster *shared* for its whole life, its module-scoped fixtures (which
submit jobs) included; an exclusive test trades its module's share for the exclusive hold and
back. Locks are ``flock`` on files in /tmp, so they also order separate pytest runs on the
machine (the lead's and a helper's, root's and the test user's). A turnstile lets a waiting
exclusive test in before modules that come later (no starvation by a stream of shared holds).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK = Path(os.environ.get("HPCDL_CLUSTER_TEST_LOCK", "/tmp/hpcdl-cluster-tests.lock"))


def _open(path: Path) -> int:
    """A descriptor to lock, whoever created the file: flock needs no write access, and
    O_CREAT on another user's file in sticky /tmp fails where protected_regular is set."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, 0o644)
        return fd


class ClusterShare:
    """One process's hold on the cluster: shared, exclusive, or none."""

    def __init__(self, lock: Path = LOCK) -> None:
        self.main = _open(lock)
        self.turnstile = _open(lock.with_name(lock.name + ".turnstile"))

    def _pass_turnstile(self, then: int) -> None:
        fcntl.flock(self.turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.main, then)
        finally:
            fcntl.flock(self.turnstile, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        self._pass_turnstile(fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self.main, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def exclusive_instead_of_shared(self) -> Iterator[None]:
        """Inside :meth:`shared`: give the share up, hold the cluster alone, share again.
        (flock would deadlock on upgrading in place: two holders waiting for each other.)"""
        fcntl.flock(self.main, fcntl.LOCK_UN)
        self._pass_turnstile(fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.main, fcntl.LOCK_UN)
            self._pass_turnstile(fcntl.LOCK_SH)


@contextlib.contextmanager
def named(name: str, lock: Path = LOCK) -> Iterator[None]:
    """Held by one module at a time, among the modules that ask for ``name``."""
    fd = _open(lock.with_name(f"{lock.name}.{name}"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
