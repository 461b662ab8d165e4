"""hpcdl.exit_guard's pure parts: reading a thread from /proc and deciding it is idle (the abort
itself and both guards: tests/cluster/test_gloo_exit.py)."""

from __future__ import annotations

import pytest

from hpcdl import exit_guard

STATUS = "Name:\tpt_gloo_runloop\nState:\t{state}\nvoluntary_ctxt_switches:\t{v}\nnonvoluntary_ctxt_switches:\t{n}\n"


def test_a_threads_state_and_switches_are_read_from_proc_status():
    text = STATUS.format(state="S (sleeping)", v=12, n=3)
    assert exit_guard._state_and_switches(text) == ("S", 15)
    assert exit_guard._state_and_switches("Name:\tx\n") == ("?", 0)


A, B = "101", "102"


@pytest.mark.parametrize(
    ("samples", "idle"),
    [
        ([{A: ("S", 5)}] * 3, True),  # asleep, nobody switched it
        ([{A: ("S", 5)}] * 2, False),  # too few samples to tell
        ([{A: ("S", 5)}, {A: ("S", 6)}, {A: ("S", 6)}], False),  # it ran between samples
        ([{A: ("S", 5)}, {A: ("S", 6)}, {A: ("S", 6)}, {A: ("S", 6)}], True),  # then settled
        ([{A: ("R", 5)}] * 3, False),  # running
        ([{A: ("D", 5)}] * 3, True),  # in the kernel (I/O): not waiting for the GIL
        ([{A: ("S", 5), B: ("S", 9)}] * 3, True),
        ([{A: ("S", 5), B: ("S", 9)}, {A: ("S", 5)}, {A: ("S", 5)}], False),  # one ended
        ([{A: ("S", 5), B: ("R", 9)}] * 3, False),
    ],
)
def test_threads_are_idle_when_asleep_and_unswitched_over_the_last_samples(samples, idle):
    assert exit_guard.idle(samples) is idle
