"""When an ending task asks Slurm for siblings held after a failed launch (hpcdl.hpo.decide:
look_for_held): warm workers whenever slots they could not claim are left, one-trial tasks
(``trials_per_task: 1``) in the round's tail only. The query (squeue's reasons, parsed in
tests/unit/scheduler/test_holds.py) and the release are not run on the dev cluster: a task held
after a failed launch needs a failing Prolog, which it does not have."""

from __future__ import annotations

import pytest

from hpcdl.hpo.decide import look_for_held

# (kind, stopped, missing slots other than the task's own, parallelism, look?)
TABLE = [
    ("array", False, 0, 4, False),  # nothing left: nobody to release
    ("array", False, 1, 4, True),  # the tail: a held sibling's slot fits in it
    ("array", False, 4, 4, True),
    ("array", False, 5, 4, False),  # mid-round: throttled siblings are still to start
    ("array", False, 2_000, 100, False),  # no query per task of a long array
    ("array", False, 1, 1, True),  # parallelism 1: the last task looks
    ("array", True, 1, 4, False),  # preempted or cancelled: it comes back, or was stopped
    ("workers", False, 0, 4, False),
    ("workers", False, 7, 4, True),  # a worker claims any slot: one left is a held sibling's
    ("workers", True, 7, 4, False),
]


@pytest.mark.parametrize(("kind", "stopped", "missing", "parallelism", "look"), TABLE)
def test_look_for_held(kind, stopped, missing, parallelism, look):
    assert look_for_held(kind, stopped, missing, parallelism) is look
