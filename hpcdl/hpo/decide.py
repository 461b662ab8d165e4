"""The sweep's decisions as pure functions: what the lifecycle and the claim do, given what Slurm
said (task states, which tasks ran) and what the sweep folder holds (slots, journals).

Nothing here reads a file or asks Slurm: :mod:`hpcdl.hpo.lifecycle` and :mod:`hpcdl.hpo.trial`
gather the facts and act on the answer, so every rule is tested by tables in milliseconds
(``tests/unit/hpo/test_decide.py``) and the cluster tests prove only the wiring.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from hpcdl.hpo.folder import FINISHED_SLOT

RoundKind = Literal["array", "workers"]
FollowUp = Literal["stopped", "give_up", "resume", "final"]
Claim = Literal["new", "resume", "retry", "fail", "skip"]
AlertEvent = Literal["finished", "failed", "stuck"]


@dataclass(frozen=True)
class Round:
    """The last round of a sweep as the follow-up job sees it.

    ``kind``: ``array`` (task i runs slot i) or ``workers`` (warm workers claim slots);
    ``tasks``: each task's state (``JOB_I`` for array tasks; a one-worker round is the plain
    job ``JOB``)."""

    kind: RoundKind
    job_id: str
    slots: tuple[int, ...]
    tasks: Mapping[str, str]


def stopped_slots(
    last: Round,
    missing: Iterable[int],
    claims: Mapping[int, str | None],
    ran: Iterable[str] = (),
    started: Iterable[str] = (),
) -> list[int]:
    """Slots of the last round that someone stopped (``scancel`` of the array, ``hpcdl sweep
    cancel``), as opposed to faults to heal: the follow-up job leaves those to ``sweep resume``.

    ``missing``: slots with something left to run; ``claims``: each slot's task (``Slot.job``);
    ``ran``: tasks sacct says ran (a task cancelled while starting ran: a fault); ``started``:
    workers whose journal has a start line.

    - every task cancelled (the whole array): the round's missing slots;
    - one task per slot: the slots whose task was cancelled before it claimed its slot or ran;
    - warm workers: the round's unclaimed missing slots when a worker was cancelled while still
      pending (never started, never ran); a worker cancelled while running is a fault.
    """
    missing_set, ran_set = set(missing), set(ran)
    cancelled = [t for t, s in last.tasks.items() if s == "CANCELLED"]
    if not cancelled:
        return []
    unfinished = [i for i in last.slots if i in missing_set]
    if len(cancelled) == len(last.tasks):  # the whole array: the user stopped the sweep
        return unfinished
    if last.kind == "workers":
        # a claim names its task, JOB_I (or JOB), and a packed lane's +LANE after it
        mine = [i for i in unfinished
                if (claims.get(i) or "").split("+")[0].split("_")[0] == last.job_id]  # fmt: skip
        unclaimed = [i for i in unfinished if i not in mine]
        started_set = set(started)
        pending = [t for t in cancelled if t not in started_set and t not in ran_set]
        return unclaimed if pending else []
    out = []
    for i, slot_no in enumerate(last.slots):
        task = f"{last.job_id}_{i}"
        if (
            last.tasks.get(task) == "CANCELLED"
            and claims.get(slot_no) != task
            and task not in ran_set
        ):
            out.append(slot_no)
    return out


def follow_up(
    missing: Sequence[int], stopped: Sequence[int], rounds: int, max_retries: int
) -> FollowUp:
    """What the follow-up job does after a round: nothing left to run → make sure a ``final``
    job will run; the user stopped the round → ``stopped`` (``sweep resume`` continues); more
    rounds than retries → ``give_up``; else ``resume`` the missing slots in a new round."""
    if not missing:
        return "final"
    if stopped:
        return "stopped"
    if rounds > max_retries:
        return "give_up"
    return "resume"


def needs_final(final: bool, has_result: bool, missing: bool, final_live: bool) -> bool:
    """Whether a final job must be submitted: the spec asks for one, every slot finished, no
    result yet, and no final job (or final-running worker) is queued or running."""
    return final and not has_result and not missing and not final_live


def claim(
    state: str | None, attempts: int, job: str | None, me: str | None, max_retries: int
) -> Claim:
    """What a claim does with a slot (``state`` None: never claimed): ``new`` asks the study
    for a trial; ``resume`` continues this very task's trial after a Slurm requeue (not a new
    attempt); ``retry`` starts attempt ``attempts + 1`` of the same trial; ``fail`` marks it
    failed (retries used up); ``skip`` leaves a finished slot alone."""
    if state is None:
        return "new"
    if state in FINISHED_SLOT:
        return "skip"
    if state == "running" and job == me:  # outside any job both are None: the same process
        return "resume"
    if attempts > max_retries:
        return "fail"
    return "retry"


def told(study_state: str) -> str | None:
    """The slot state the study already holds for a trial (its last attempt told the study,
    then died before writing its slot, e.g. killed in Slurm's KillWait after ``sweep
    cancel``): ``complete``, ``pruned`` or ``failed``, adopted instead of running the trial
    again (Optuna refuses to tell a finished trial twice); None while the trial is open."""
    return {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(study_state)


def next_slot(slots: Sequence[tuple[int, str | None, str | None]], me: str | None) -> int | None:
    """Which slot a warm worker claims among ``(slot, state, job)``: first the one this task
    was running (a requeued worker resumes its trial before anything else; only a Slurm task id
    survives a requeue, so ``me`` is None on the local profile), then the first free or
    retry-marked slot; None when none is left."""
    mine = next((i for i, state, job in slots
                 if state == "running" and me is not None and job == me), None)  # fmt: skip
    if mine is not None:
        return mine
    return next((i for i, state, _ in slots if state in (None, "retry")), None)


def look_for_held(kind: RoundKind, stopped: bool, missing_others: int, parallelism: int) -> bool:
    """Whether a task that ends asks Slurm for siblings it holds after a failed launch (held
    for ever: the round's follow-up job, ``afterany`` on the array, waits for them).

    ``missing_others``: the round's unfinished slots other than this task's own. A stopped task
    (preempted, cancelled) leaves it to the others. A warm worker asks whenever slots are left
    that it could not claim (its array is at most ``parallelism`` tasks). One trial per task:
    only in the round's tail, when at most ``parallelism`` slots are left, which every running
    or held sibling fits in; earlier, slots of tasks that merely wait for the throttle are
    left too, and a query per ending task of a 2,500-task array is 2,500 queries of a long
    pending list for nothing (a task held earlier is still found in the tail)."""
    if stopped or missing_others <= 0:
        return False
    return kind == "workers" or missing_others <= parallelism


def alert(
    finished: bool,
    failed: bool,
    blocked: Sequence[str],
    live: bool,
    idle_s: float | None,
    stuck_after_s: float | None,
) -> AlertEvent | None:
    """Which alert a sweep's state calls for, None when there is nothing to say.

    ``finished``: nothing left to do (:meth:`SweepPaths.finished`); ``failed``: the sweep's
    jobs gave up (retries used up, no trial completed); ``blocked``: what keeps it from
    finishing (:meth:`Lifecycle.diagnose`: a job Slurm will never start, trials no job will
    run, no final job); ``live``: a job of the sweep is queued or running and able to start;
    ``idle_s``: seconds since the last trial record; ``stuck_after_s``: the user's "no progress
    for this long" (None: not asked)."""
    if finished:
        return "finished"
    if failed:
        return "failed"
    if blocked:
        return "stuck"
    if live and stuck_after_s is not None and idle_s is not None and idle_s >= stuck_after_s:
        return "stuck"
    return None


def alert_key(event: AlertEvent, round_no: int) -> str:
    """The name an alert is claimed under: ``finished`` once per sweep; ``failed`` and
    ``stuck`` once per round (a sweep resumed after either may fail or stick again)."""
    return "finished" if event == "finished" else f"{event}-round{round_no}"


def to_send(event: AlertEvent, key: str, notified: Collection[str]) -> bool:
    """Whether to send an alert: not claimed yet, and not a ``stuck`` for a round whose
    ``failed`` was sent (the same news twice) or for a sweep already ``finished``."""
    if key in notified or "finished" in notified:
        return False
    return not (event == "stuck" and key.replace("stuck", "failed", 1) in notified)
