"""The locks that let cluster tests run side by side (tests/helpers/cluster_share.py), checked
with threads in one process: flock locks belong to open file descriptions, so two holders in
one process conflict as two processes would."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tests.helpers.cluster_share import ClusterShare, named

WAIT_S = 0.3  # long enough for a blocked thread to have got the lock if it could


def _start(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_shared_holds_overlap(tmp_path: Path) -> None:
    lock = tmp_path / "cluster.lock"
    a, b = ClusterShare(lock), ClusterShare(lock)
    with a.shared():
        got = threading.Event()

        def second() -> None:
            with b.shared():
                got.set()

        _start(second)
        assert got.wait(5)  # no wait for the first holder


def test_an_exclusive_test_waits_for_shared_holders_and_they_wait_for_it(tmp_path: Path) -> None:
    lock = tmp_path / "cluster.lock"
    module, other, late = ClusterShare(lock), ClusterShare(lock), ClusterShare(lock)
    order: list[str] = []
    release_other = threading.Event()
    other_holds = threading.Event()

    def other_module() -> None:
        with other.shared():
            other_holds.set()
            release_other.wait(5)
            order.append("other ends")

    _start(other_module)
    assert other_holds.wait(5)
    exclusive_has_it = threading.Event()
    leave_exclusive = threading.Event()

    def exclusive_test() -> None:
        with module.shared(), module.exclusive_instead_of_shared():
            order.append("exclusive starts")
            exclusive_has_it.set()
            leave_exclusive.wait(5)
            order.append("exclusive ends")

    _start(exclusive_test)
    time.sleep(WAIT_S)
    assert not exclusive_has_it.is_set()  # the other module still shares the cluster
    late_started = threading.Event()

    def late_module() -> None:
        with late.shared():
            order.append("late starts")
            late_started.set()

    _start(late_module)
    time.sleep(WAIT_S)
    assert not late_started.is_set()  # the turnstile: the waiting exclusive test goes first
    release_other.set()
    assert exclusive_has_it.wait(5)
    time.sleep(WAIT_S)
    assert not late_started.is_set()  # nobody shares while it is exclusive
    leave_exclusive.set()
    assert late_started.wait(5)
    assert order == ["other ends", "exclusive starts", "exclusive ends", "late starts"]


def test_named_locks_order_modules_that_ask_for_the_same_name(tmp_path: Path) -> None:
    lock = tmp_path / "cluster.lock"
    got = threading.Event()
    with named("preempt", lock):

        def second() -> None:
            with named("preempt", lock):
                got.set()

        thread = _start(second)
        with named("other", lock):  # another name is free
            pass
        time.sleep(WAIT_S)
        assert not got.is_set()
    thread.join(5)
    assert got.is_set()
