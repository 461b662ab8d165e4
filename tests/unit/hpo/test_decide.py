"""The sweep's lifecycle and claim decisions, by tables (hpcdl.hpo.decide: no file, no Slurm).

Each row is a situation the dev cluster has shown (the chaos driver's faults, the sweep tests)
or a combination of them; the cluster tests prove the wiring, these the rules.
"""

from __future__ import annotations

import itertools

import pytest

from hpcdl.hpo.decide import Round, claim, follow_up, needs_final, next_slot, stopped_slots, told

STATES = ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
          "PREEMPTED", "OUT_OF_MEMORY", "REQUEUED"]  # fmt: skip


def arr(states: list[str], job: str = "70") -> Round:
    """A one-task-per-slot round of len(states) tasks for slots 0..n-1."""
    return Round("array", job, tuple(range(len(states))),
                 {f"{job}_{i}": s for i, s in enumerate(states)})  # fmt: skip


def workers(states: list[str], slots: int, job: str = "80") -> Round:
    tasks = (
        {job: states[0]} if len(states) == 1 else {f"{job}_{i}": s for i, s in enumerate(states)}
    )
    return Round("workers", job, tuple(range(slots)), tasks)


# -- stopped_slots: named scenarios ----------------------------------------------------------------
SCENARIOS = [
    # (name, round, missing, claims, ran, started, expected)
    ("nothing cancelled: a failed task is a fault", arr(["COMPLETED", "FAILED"]), [1], {0: "70_0", 1: "70_1"}, set(), set(), []),
    ("scancel of the whole array before any start", arr(["CANCELLED"] * 3), [0, 1, 2], {}, set(), set(), [0, 1, 2]),
    ("scancel of the whole array mid-trial", arr(["CANCELLED"] * 3), [0, 1, 2], {0: "70_0", 1: "70_1", 2: "70_2"}, {"70_0", "70_1", "70_2"}, set(), [0, 1, 2]),
    ("whole array cancelled after two recorded", arr(["CANCELLED"] * 3), [2], {0: "70_0", 1: "70_1"}, {"70_0", "70_1"}, set(), [2]),
    ("one pending task cancelled (user)", arr(["COMPLETED", "CANCELLED"]), [1], {0: "70_0"}, {"70_0"}, set(), [1]),
    ("one task cancelled mid-trial (a fault to heal)", arr(["COMPLETED", "CANCELLED"]), [1], {0: "70_0", 1: "70_1"}, {"70_0", "70_1"}, set(), []),
    ("cancelled while starting: sacct says it ran", arr(["COMPLETED", "CANCELLED"]), [1], {0: "70_0"}, {"70_0", "70_1"}, set(), []),
    ("cancelled after recording: nothing missing", arr(["COMPLETED", "CANCELLED"]), [], {0: "70_0", 1: "70_1"}, {"70_0", "70_1"}, set(), []),
    ("node failure then requeued task pending", arr(["COMPLETED", "PENDING"]), [1], {0: "70_0", 1: "70_1"}, {"70_0", "70_1"}, set(), []),
    ("NODE_FAIL of one task", arr(["NODE_FAIL", "COMPLETED"]), [0], {0: "70_0", 1: "70_1"}, {"70_0", "70_1"}, set(), []),
    ("preempted task", arr(["PREEMPTED", "COMPLETED"]), [0], {0: "70_0", 1: "70_1"}, {"70_0", "70_1"}, set(), []),
    ("timeout", arr(["TIMEOUT"]), [0], {0: "70_0"}, {"70_0"}, set(), []),
    ("two pending cancelled, one ran", arr(["CANCELLED", "CANCELLED", "COMPLETED"]), [0, 1], {2: "70_2"}, {"70_2"}, set(), [0, 1]),
    ("a slot claimed by another round's task", arr(["CANCELLED", "COMPLETED"]), [0], {0: "60_3"}, {"70_1"}, set(), [0]),
    ("workers: every worker cancelled", workers(["CANCELLED", "CANCELLED"], 6), [2, 3, 4, 5], {0: "80_0", 1: "80_1", 2: "80_0", 3: "80_1"}, {"80_0", "80_1"}, {"80_0", "80_1"}, [2, 3, 4, 5]),
    ("workers: one-worker round (a plain job) cancelled", workers(["CANCELLED"], 3), [1, 2], {0: "80"}, {"80"}, {"80"}, [1, 2]),
    ("workers: a running worker cancelled (fault)", workers(["CANCELLED", "RUNNING"], 4), [2, 3], {0: "80_0", 1: "80_1", 2: "80_0"}, {"80_0", "80_1"}, {"80_0", "80_1"}, []),
    ("workers: a pending worker cancelled", workers(["CANCELLED", "COMPLETED"], 4), [2, 3], {0: "80_1", 1: "80_1"}, {"80_1"}, {"80_1"}, [2, 3]),
    ("workers: pending worker cancelled, its slot claimed by the round", workers(["CANCELLED", "COMPLETED"], 4), [2, 3], {2: "80_1"}, {"80_1"}, {"80_1"}, [3]),
    ("workers: a cancelled worker that had started", workers(["CANCELLED", "COMPLETED"], 4), [3], {}, {"80_1"}, {"80_0", "80_1"}, []),
    ("workers: nothing cancelled", workers(["COMPLETED", "FAILED"], 4), [3], {}, {"80_0", "80_1"}, {"80_0", "80_1"}, []),
    ("workers: a slot claimed by an older round counts as unclaimed", workers(["CANCELLED", "COMPLETED"], 3), [0], {0: "79_0"}, {"80_1"}, {"80_1"}, [0]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "last", "missing", "claims", "ran", "started", "expected"),
                         SCENARIOS, ids=[s[0] for s in SCENARIOS])  # fmt: skip
def test_stopped_slots_scenarios(name, last, missing, claims, ran, started, expected):
    assert stopped_slots(last, missing, claims, ran, started) == expected


# -- stopped_slots: every state of a two-task array, with and without claims and sacct's "ran" ---
@pytest.mark.parametrize(("first", "second"), list(itertools.product(STATES, STATES)))
def test_two_task_array_every_state_pair(first, second):
    """Slot 1 is missing, unclaimed and never ran: it is the user's stop exactly when its task
    was cancelled; slot 0 (claimed, ran, recorded) never is."""
    got = stopped_slots(arr([first, second]), [1], {0: "70_0"}, {"70_0"}, set())
    assert got == ([1] if second == "CANCELLED" else [])


@pytest.mark.parametrize(
    ("state", "claimed", "ran"), list(itertools.product(STATES, [False, True], [False, True]))
)
def test_one_cancelled_neighbour_and_a_second_task(state, claimed, ran):  # fmt: skip
    """Task 0 cancelled; task 1 in ``state``: slot 1 is stopped only if its task was also
    cancelled (then the whole array was: every missing slot is the user's, claimed or not)."""
    claims = {1: "70_1"} if claimed else {}
    got = stopped_slots(arr(["CANCELLED", state]), [0, 1], claims, {"70_1"} if ran else set())
    if state == "CANCELLED":
        assert got == [0, 1]
    else:
        assert got == [0]


# -- follow_up ------------------------------------------------------------------------------------
FOLLOW = [
    ([], [], 1, 3, "final"),
    ([], [], 9, 3, "final"),
    ([], [0], 1, 3, "final"),
    ([2], [], 1, 3, "resume"),
    ([2], [], 3, 3, "resume"),
    ([2], [], 4, 3, "give_up"),
    ([2], [2], 4, 3, "stopped"),
    ([2, 3], [3], 1, 3, "stopped"),
    ([2], [], 1, 0, "give_up"),
    ([2], [], 0, 0, "resume"),
]


@pytest.mark.parametrize(("missing", "stopped", "rounds", "retries", "expected"), FOLLOW)
def test_follow_up(missing, stopped, rounds, retries, expected):
    assert follow_up(missing, stopped, rounds, retries) == expected


@pytest.mark.parametrize(("final", "has_result", "missing", "live"),
                         list(itertools.product([False, True], repeat=4)))  # fmt: skip
def test_needs_final_only_when_asked_done_and_none_will_run(final, has_result, missing, live):
    assert needs_final(final, has_result, missing, live) == (
        final and not has_result and not missing and not live
    )


# -- claim ----------------------------------------------------------------------------------------
CLAIMS = [
    # (state, attempts, job, me, max_retries, expected)
    (None, 0, None, "70_1", 2, "new"),
    (None, 0, None, None, 0, "new"),
    ("complete", 1, "70_1", "70_1", 2, "skip"),
    ("pruned", 1, "70_1", "71_0", 2, "skip"),
    ("failed", 3, "70_1", "70_1", 2, "skip"),
    ("running", 1, "70_1", "70_1", 2, "resume"),  # a Slurm requeue of the same task
    ("running", 3, "70_1", "70_1", 2, "resume"),  # a requeue is not an attempt, even at the limit
    ("running", 1, "70_1", "72_1", 2, "retry"),  # another task: the old attempt died
    ("running", 3, "70_1", "72_1", 2, "fail"),
    ("retry", 1, "70_1", "72_1", 2, "retry"),
    ("retry", 2, "70_1", "72_1", 2, "retry"),
    ("retry", 3, "70_1", "72_1", 2, "fail"),
    ("retry", 1, "70_1", "70_1", 0, "fail"),
    ("running", 1, None, None, 2, "resume"),  # in-process, outside any job: the same process
    ("running", 1, "4242", None, 2, "retry"),  # a local worker's id is not its task's
]


@pytest.mark.parametrize(("state", "attempts", "job", "me", "retries", "expected"), CLAIMS)
def test_claim(state, attempts, job, me, retries, expected):
    assert claim(state, attempts, job, me, retries) == expected


@pytest.mark.parametrize(("state", "attempts", "retries"),
                         list(itertools.product(["running", "retry"], [1, 2, 3, 4], [0, 1, 2, 3])))  # fmt: skip
def test_claim_by_another_task_retries_until_the_limit(state, attempts, retries):
    assert claim(state, attempts, "70_0", "71_0", retries) == (
        "fail" if attempts > retries else "retry"
    )


NEXT = [
    ([(0, None, None), (1, None, None)], "70_0", 0),
    ([(0, "complete", "70_0"), (1, None, None)], "70_0", 1),
    ([(0, "running", "70_1"), (1, None, None)], "70_0", 1),
    ([(0, "running", "70_1"), (1, None, None)], "70_1", 0),  # its own trial first
    ([(0, None, None), (1, "running", "70_1")], "70_1", 1),  # ... even before a free slot
    ([(0, "retry", "70_0"), (1, None, None)], "70_5", 0),
    ([(0, "complete", None), (1, "pruned", None), (2, "failed", None)], "70_0", None),
    ([(0, "running", "70_0"), (1, "running", "70_1")], "70_2", None),
    ([(0, "running", "70_0")], None, None),  # local: no id survives, no resume
    ([], "70_0", None),
]


@pytest.mark.parametrize(("slots", "me", "expected"), NEXT)
def test_next_slot(slots, me, expected):
    assert next_slot(slots, me) == expected


@pytest.mark.parametrize(("study_state", "expected"), [
    ("COMPLETE", "complete"), ("PRUNED", "pruned"), ("FAIL", "failed"),
    ("RUNNING", None), ("WAITING", None),
])  # fmt: skip
def test_a_trial_the_study_already_ended_is_adopted_not_rerun(study_state, expected):
    """sweep cancel: a worker told the study COMPLETE during Slurm's KillWait and was killed
    before its slot write; the resumed round must record that, not run the trial again (Optuna
    refuses a second tell: the retry failed and the follow-up gave up after its rounds)."""
    assert told(study_state) == expected
