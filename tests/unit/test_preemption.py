"""hpcdl.preemption's decisions by tables: which Slurm task this is, and what follows a stop.

Each row of the stop table is a case the tests play end to end (``[name]``: the file
``tests/cluster/test_<name>.py`` or ``tests/unit/train/test_<name>.py``; without a name, a case
only the unit tests reach): the stop as the process knows it, what Slurm answers when asked, the
step it ends with and the questions asked on the way. :func:`hpcdl.preemption.settle` walks
:func:`hpcdl.preemption.decide` with those answers, in memory: nothing here starts a process.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from hpcdl.errors import HpcdlError
from hpcdl.preemption import (
    Said,
    SlurmTask,
    Stop,
    after_checkpoint,
    decide,
    received_signal,
    settle,
    signal_of,
    slurm_task,
    task_id,
)
from hpcdl.rendezvous import master_port, slurm_layout

TL = "SIGUSR2"  # the site's time-limit signal (devcluster: USR2)
JOB = SlurmTask("4242", None, None, 0)
ARRAY = SlurmTask("2035_0", "2035", 0, 0)
PENDING = "scontrol requeue 4242 failed: Job is pending execution for job 4242"
DISABLED = "scontrol requeue 4242 failed: Requested operation is presently disabled for job 4242"


def again(n: int) -> SlurmTask:
    return SlurmTask("4242", None, None, n)


@dataclass
class Answers:
    """Slurm's answers for one row (what the scheduler's SlurmRequeue would have read)."""

    cancelled: bool = False
    refusal: str | None = None  # scontrol requeue's error, None: it succeeds
    requeued_by_slurm: bool = False
    asked: list[tuple[str, str]] = field(default_factory=list)  # (question, job), in order


class Slurm:
    """hpcdl.preemption.SlurmControl answering from a row's Answers."""

    def __init__(self, answers: Answers) -> None:
        self.a = answers

    def cancelled(self, job: str) -> bool:
        self.a.asked.append(("cancelled", job))
        return self.a.cancelled

    def requeue(self, job: str) -> None:
        self.a.asked.append(("requeue", job))
        if self.a.refusal is not None:
            raise HpcdlError(self.a.refusal)

    def requeued_by_slurm(self, job: str) -> bool:
        self.a.asked.append(("requeued_by_slurm", job))
        return self.a.requeued_by_slurm


C, R, S = "cancelled", "requeue", "requeued_by_slurm"
# (case [where it was played], stop, Slurm's answers, (action, why), what was asked in order)
ROWS = [
    ("trainer preempted by a higher tier (REQUEUE: TERM, GraceTime, SIGKILL) [train_slurm]",
     Stop("trainer", "SIGTERM", TL, JOB, 0, 3), Answers(), ("requeued", "requeued"), [C, R]),
    ("a trial's trainer in an array task, USR2: the exact task is requeued [sweep_train]",
     Stop("trainer", "SIGUSR2", TL, ARRAY, 0, 3), Answers(), ("requeued", "requeued"), [R]),
    ("a trial's trainer in an array task preempted (TERM)",
     Stop("trainer", "SIGTERM", TL, ARRAY, 0, 3), Answers(), ("requeued", "requeued"), [C, R]),
    ("trainer at its time limit (--signal=USR2@delay): no cancel check [train_slurm]",
     Stop("trainer", "SIGUSR2", TL, JOB, 0, 3), Answers(), ("requeued", "requeued"), [R]),
    ("time-limit signal sent by hand (scancel --signal=USR2): never read as a cancel [resize]",
     Stop("trainer", "SIGUSR2", TL, JOB, 0, 3), Answers(cancelled=True), ("requeued", "requeued"),
     [R]),
    ("a site's own time-limit signal (preemption.signal: USR1) [render]",
     Stop("trainer", "SIGUSR1", "SIGUSR1", JOB, 0, 3), Answers(), ("requeued", "requeued"), [R]),
    ("a site that preempts with HUP too (preempt_signals: [TERM, HUP]) [stop_signals]",
     Stop("trainer", "SIGHUP", TL, JOB, 0, 3), Answers(), ("requeued", "requeued"), [C, R]),
    ("trainer stopped by scancel (TERM): checkpointed, not requeued, fails [stop_signals]",
     Stop("trainer", "SIGTERM", TL, JOB, 0, 3), Answers(cancelled=True), ("fail", "cancelled"),
     [C]),
    ("node down: Slurm requeued the job, TERMed the ranks left ('pending execution') [node_down]",
     Stop("trainer", "SIGTERM", TL, JOB, 0, 3), Answers(refusal=PENDING), ("already", "by Slurm"),
     [C, R]),
    ("node down: another refusal, but sacct says REQUEUED/PENDING/NODE_FAIL [stop_signals]",
     Stop("trainer", "SIGTERM", TL, JOB, 0, 3), Answers(refusal=DISABLED, requeued_by_slurm=True),
     ("already", "by Slurm"), [C, R, S]),
    ("requeue refused, Slurm did not requeue: fails with Slurm's answer [stop_signals]",
     Stop("trainer", "SIGTERM", TL, JOB, 0, 3), Answers(refusal=DISABLED), ("fail", "refused"),
     [C, R, S]),
    ("restarts exhausted: SLURM_RESTART_COUNT 2, job.max_requeues 2 [train]",
     Stop("trainer", "SIGUSR2", TL, again(2), 0, 2), Answers(), ("fail", "exhausted"), []),
    ("job.max_requeues 0: the first stop already fails [train_slurm exhausted, containers]",
     Stop("trainer", "SIGTERM", TL, JOB, 0, 0), Answers(), ("fail", "exhausted"), []),
    ("a requeued run preempted again, requeues left [train_slurm time limit]",
     Stop("trainer", "SIGTERM", TL, again(1), 0, 3), Answers(), ("requeued", "requeued"), [C, R]),
    ("rank 1 of a preempted 2-node job: rank 0 requeues [train_slurm]",
     Stop("trainer", "SIGTERM", TL, JOB, 1, 3), Answers(), ("leave", "rank 0 requeues"), []),
    ("rank 1 with the requeues exhausted: every rank fails [train_slurm exhausted]",
     Stop("trainer", "SIGUSR2", TL, again(3), 1, 3), Answers(), ("fail", "exhausted"), []),
    ("trainer outside Slurm (local profile): says how to resume [stop_signals]",
     Stop("trainer", "SIGTERM", TL, None, 0, 3), Answers(), ("fail", "not Slurm"), []),
    ("trainer outside Slurm, TERM to rank 1 of mpiexec -n 2 [train]",
     Stop("trainer", "SIGUSR2", TL, None, 1, 3), Answers(), ("fail", "not Slurm"), []),
    ("worker TERMed between trials, slots left: requeued for them",
     Stop("worker", "SIGTERM", TL, ARRAY, work_left=True), Answers(), ("requeued", "requeued"),
     [C, R]),
    ("worker USR2 between trials (a toy trial cannot checkpoint) [sweep_slurm]",
     Stop("worker", "SIGUSR2", TL, ARRAY), Answers(), ("requeued", "requeued"), [R]),
    ("worker stopped after the round's last slot was done [sweep_slurm]",
     Stop("worker", "SIGTERM", TL, ARRAY, work_left=False), Answers(),
     ("leave", "nothing left"), []),
    ("scancel reached rank 1 first: rank 0's worker has no signal of its own, asks anyway",
     Stop("worker", None, TL, ARRAY), Answers(cancelled=True), ("leave", "cancelled"), [C]),
    ("a trainer whose ranks saw no signal of their own: never taken for a time limit",
     Stop("trainer", None, TL, JOB, 0, 3), Answers(cancelled=True), ("fail", "cancelled"), [C]),
    ("sweep cancel right after sweep run (slurmctld: COMPLETING, CANCELLED) [docs_walk]",
     Stop("worker", "SIGTERM", TL, ARRAY), Answers(cancelled=True), ("leave", "cancelled"), [C]),
    ("worker whose task Slurm requeued itself (a node failed)",
     Stop("worker", "SIGTERM", TL, ARRAY), Answers(refusal=PENDING), ("already", "by Slurm"),
     [C, R]),
    ("worker whose requeue is refused: left to the follow-up job",
     Stop("worker", "SIGTERM", TL, ARRAY), Answers(refusal=DISABLED), ("leave", "refused"),
     [C, R, S]),
    ("a local worker (not Slurm) [sweep_train]",
     Stop("worker", "SIGTERM", TL, None), Answers(), ("leave", "not Slurm"), []),
    ("worker task requeued 5 times: job.max_requeues limits the trials' trainer, not the task",
     Stop("worker", "SIGUSR2", TL, SlurmTask("2035_0", "2035", 0, 5)), Answers(),
     ("requeued", "requeued"), [R]),
    ("Checkpointable callable preempted by a high job, rank 0 wrote its pickle [checkpointable]",
     Stop("callable", "SIGTERM", TL, JOB, 0), Answers(), ("wait", "Slurm requeues"), []),
    ("Checkpointable callable preempted, rank 1 of 2 [checkpointable]",
     Stop("callable", "SIGTERM", TL, JOB, 1), Answers(), ("wait", "Slurm requeues"), []),
    ("Checkpointable callable at its time limit or USR2: submitit's handler [snapshot]",
     Stop("callable", "SIGUSR2", TL, JOB, 0), Answers(), ("leave", "submitit's"), []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "stop", "answers", "end", "asked"), ROWS, ids=[r[0] for r in ROWS]
)
def test_the_step_after_a_stop(case, stop, answers, end, asked):
    started = time.process_time()  # CPU time: a loaded machine stretches wall time, not this
    step = settle(stop, Slurm(answers))
    assert time.process_time() - started < 0.01
    assert (step.action, step.why) == end, case
    job = stop.task.job if stop.task else ""
    assert answers.asked == [(q, job) for q in asked], case
    assert step.said == (answers.refusal if step.why == "refused" else "")


def test_the_table_has_a_row_for_every_end():
    assert len(ROWS) >= 20
    ends = {end for *_, end, _ in ROWS}
    want = {"requeued", "already", "wait", "leave", "fail"}
    assert {a for a, _ in ends} == want


@pytest.mark.parametrize(
    ("said", "action"),
    [
        (Said(), "ask_cancelled"),
        (Said(cancelled=False), "requeue"),
        (Said(cancelled=False, requeue=""), "requeued"),
        (Said(cancelled=False, requeue=DISABLED), "ask_requeued"),
        (Said(cancelled=False, requeue=DISABLED, requeued_by_slurm=False), "fail"),
    ],
)
def test_decide_is_one_step_at_a_time(said, action):
    """A pure function of the stop and what Slurm said: the same answer every time."""
    stop = Stop("trainer", "SIGTERM", TL, JOB, 0, 3)
    assert decide(stop, said).action == action == decide(stop, said).action


# -- which Slurm task this is -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "task", "name"),
    [
        ({}, None, None),
        ({"SUBMITIT_LOCAL_JOB_ID": "77"}, None, "77"),  # a local job: no requeue
        ({"SLURM_JOB_ID": "120"}, SlurmTask("120", None, None, 0), "120"),
        ({"SLURM_JOB_ID": "120", "SLURM_RESTART_COUNT": "2"}, SlurmTask("120", None, None, 2),
         "120"),
        ({"SLURM_JOB_ID": "107", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "7"},
         SlurmTask("100_7", "100", 7, 0), "100_7"),
        ({"SLURM_JOB_ID": "107", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "7",
          "SLURM_RESTART_COUNT": "1", "SUBMITIT_LOCAL_JOB_ID": "77"},
         SlurmTask("100_7", "100", 7, 1), "100_7"),
        ({"SLURM_JOB_ID": "120", "SLURM_RESTART_COUNT": ""}, SlurmTask("120", None, None, 0),
         "120"),
    ],
)  # fmt: skip
def test_which_slurm_task_this_is(env, task, name):
    assert slurm_task(env) == task
    assert task_id(env) == name
    assert task_id(env, local=False) == (task.job if task else None)


def test_the_rendezvous_port_of_a_requeued_array_task_is_as_before():
    """The rendezvous reads the task from slurm_task: the same port and job id as when it read
    the variables itself (array job, task, restart count)."""
    env = {"SLURM_JOB_ID": "107", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "7",
           "SLURM_RESTART_COUNT": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NTASKS": "1", "SLURM_TASKS_PER_NODE": "1", "SLURM_JOB_NODELIST": "localhost"}  # fmt: skip
    layout = slurm_layout(env)
    assert layout.job_id == "100_7" and layout.master_port == master_port("100", "7", "2")
    first = slurm_layout({**env, "SLURM_RESTART_COUNT": "0"})
    assert first.master_port == master_port("100", "7") != layout.master_port
    plain = slurm_layout({k: v for k, v in env.items() if not k.startswith("SLURM_ARRAY")})
    assert plain.job_id == "107" and plain.master_port == master_port("107", None, "2")


@pytest.mark.parametrize(
    ("name", "sig"),
    [("TERM", signal.SIGTERM), ("SIGTERM", signal.SIGTERM), ("usr2", signal.SIGUSR2)],
)
def test_signal_names(name, sig):
    assert signal_of(name) == sig


def test_a_bad_signal_name_is_one_error():
    with pytest.raises(HpcdlError, match="preemption signal 'NOPE' is not a signal name"):
        signal_of("NOPE")


def test_a_rank_stopped_by_another_ranks_signal_is_not_taken_for_a_time_limit(monkeypatch):
    """Rank 0 stopped through the step's all-reduce has no signal of its own. It used to take
    the time-limit signal for it and so skipped the cancel check: a job scancel reached on
    another node first was requeued. Unknown now, it asks as for TERM."""
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert received_signal(SimpleNamespace(received=None)) is None
    assert received_signal(SimpleNamespace(received=None), int(signal.SIGTERM)) == "SIGTERM"
    answers = Answers(cancelled=True)
    with pytest.raises(HpcdlError, match="job 4242 was cancelled \\(another rank's signal"):
        after_checkpoint(5, "step00000005", "/runs/x", 3, 0, None, slurm=Slurm(answers))
    assert answers.asked == [(C, "4242")]
