"""Tasks Slurm holds after a failed launch: recognised in every spelling, and a sweep whose
round waits only on such tasks is not live (it stalled a chaos run: nothing said so)."""

from __future__ import annotations

import pytest

from hpcdl.hpo.lifecycle import SweepJob
from hpcdl.scheduler.holds import failed_launches, held_after_failed_launch
from hpcdl.scheduler.interface import JobHandle, TaskStatus


@pytest.mark.parametrize(
    ("reason", "held"),
    [
        ("launch failed requeued held", True),  # squeue %r
        ("launch_failed_requeued_held", True),  # scontrol show job, sacct
        ("(launch failed requeued held)", True),  # squeue's default NODELIST(REASON)
        ("Launch_Failed_Requeued_Held ", True),
        ("JobHeldUser", False),  # the user's own hold: left alone
        ("JobHeldAdmin", False),
        ("BeginTime", False),  # a plain requeue: Slurm starts it by itself
        ("JobLaunchFailure", False),  # failed for good, not held
        ("", False),
    ],
)
def test_the_reason_in_every_spelling(reason, held):
    assert held_after_failed_launch(reason) is held


def test_failed_launches_from_squeue_rows():
    rows = "15879_2|launch failed requeued held\n15879_3|Priority\n15880|JobHeldUser\n|\n"
    assert failed_launches(rows) == ["15879_2"]
    assert failed_launches("") == []


def _job(tasks: dict[str, TaskStatus]) -> SweepJob:
    handle = JobHandle(job_id="15879", name="w", site="s", scheduler="slurm", folder="/x",
                       array=len(tasks), submitted_at=0.0)  # fmt: skip
    return SweepJob("workers", list(range(len(tasks))), handle, tasks)


HELD = TaskStatus("PENDING", "launch failed requeued held")


@pytest.mark.parametrize(
    ("tasks", "held", "live"),
    [
        ({"15879_0": TaskStatus("COMPLETED"), "15879_1": HELD}, ["15879_1"], False),
        ({"15879_0": TaskStatus("RUNNING"), "15879_1": HELD}, ["15879_1"], True),
        ({"15879_0": TaskStatus("PENDING", "BeginTime"), "15879_1": HELD}, ["15879_1"], True),
        (
            {"15879_0": TaskStatus("COMPLETED"), "15879_1": TaskStatus("PENDING", "JobHeldUser")},
            [],
            True,
        ),
        ({"15879_0": TaskStatus("COMPLETED"), "15879_1": TaskStatus("COMPLETED")}, [], False),
    ],
)
def test_a_round_waiting_only_on_held_tasks_is_not_live(tasks, held, live):
    job = _job(tasks)
    assert job.held == held
    assert job.live is live


@pytest.mark.parametrize(
    ("sacct_row", "squeue_row", "expected"),
    [
        # seen on the dev cluster in the first seconds after a prolog failed the launch:
        # sacct says REQUEUED, squeue has the hold, and `sweep status` said nothing
        ("5_0|REQUEUED|", "5_0|PENDING|launch failed requeued held", ("PENDING", "launch failed requeued held")),
        ("5_0|PENDING|JobHeldUser", "5_0|PENDING|launch failed requeued held", ("PENDING", "launch failed requeued held")),
        ("5_0|PENDING|Dependency", "5_0|PENDING|DependencyNeverSatisfied", ("PENDING", "DependencyNeverSatisfied")),
        ("5_0|REQUEUED|", "", ("REQUEUED", "")),  # gone from the queue: sacct's word stands
        ("5_0|COMPLETED|", "5_0|PENDING|x", ("COMPLETED", "")),  # a finished task is never asked
    ],
)  # fmt: skip
def test_squeue_knows_a_requeued_or_pending_task_better(sacct_row, squeue_row, expected):
    from hpcdl.scheduler.state_rows import ASK_SQUEUE, parse_state_rows

    found: dict[str, TaskStatus] = {}
    parse_state_rows(sacct_row, found, overwrite=True)
    if found["5_0"].state in ASK_SQUEUE:
        parse_state_rows(squeue_row, found, overwrite=False)
    assert (found["5_0"].state, found["5_0"].reason) == expected


@pytest.mark.parametrize(
    ("sacct_rows", "squeue_rows", "expected"),
    [
        # requeued, then scancelled while it waited: sacct keeps REQUEUED, squeue lists it no more
        ("7_0|COMPLETED|\n7_1|REQUEUED|JobArrayTaskLimit", "", {"7_0": "COMPLETED", "7_1": "CANCELLED"}),
        ("7_1|REQUEUED|", "7_1|PENDING|BeginTime", {"7_1": "PENDING"}),  # waiting to start again
        ("7_1|REQUEUED|", "7_1|RUNNING|None", {"7_1": "RUNNING"}),
        ("7_1|REQUEUED|\n7_2|PENDING|", "7_[2-3]|PENDING|JobArrayTaskLimit", {"7_1": "CANCELLED", "7_2": "PENDING", "7_3": "PENDING"}),
    ],
)  # fmt: skip
def test_a_requeued_task_gone_from_the_queue_was_cancelled(sacct_rows, squeue_rows, expected):
    from hpcdl.scheduler.state_rows import parse_state_rows, settle_requeued

    found: dict[str, TaskStatus] = {}
    parse_state_rows(sacct_rows, found, overwrite=True)
    parse_state_rows(squeue_rows, found, overwrite=False)
    settle_requeued(found, squeue_rows)
    assert {t: s.state for t, s in found.items()} == expected
