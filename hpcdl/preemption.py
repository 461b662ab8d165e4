"""Preemption, in one place: signal → flag → checkpoint at a step boundary → the decision after
the stop → a requeue through the scheduler; for the trainer, a sweep's workers and Checkpointable
callables. Stdlib only, so even the task payload (:mod:`hpcdl.task_runner`) imports it.

- here: which Slurm task this is (:func:`slurm_task`, the one reader of ``SLURM_JOB_ID``,
  ``SLURM_ARRAY_*``, ``SLURM_RESTART_COUNT``); signal names (:func:`signal_of`,
  :func:`time_limit_signal`); the flag every rank installs first (:class:`PreemptionFlag`, read
  through :class:`StopFlag`); the site's :class:`Policy` and the ``grace_too_short`` report;
  the decision after a stop (:func:`decide`, pure) and the loop that carries it out
  (:func:`settle`); a Checkpointable callable's handler (:func:`checkpoint_on_preemption`).
- ``hpcdl/scheduler/_requeue.py`` (``SlurmRequeue``): the Slurm commands :func:`settle` runs
  (scontrol show job, sacct, scontrol requeue), handed in as a :class:`SlurmControl`;
  ``hpcdl/scheduler/checkpointable.py``: submitit's internals (its handler, the job's pickle).
- ``hpcdl/train/trainer.py`` all-reduces the flags with the metrics at step boundaries (all
  ranks checkpoint at the same step), then calls :func:`after_checkpoint`; which settings a run
  uses: ``hpcdl/train/config.py`` (``preemption_settings``). ``hpcdl/hpo/worker.py``: one flag
  for all of a worker's trials; stopped between trials, it asks :func:`settle`.

The decision table (``tests/unit/test_preemption.py``): the columns of :class:`Stop` (who
stopped: ``trainer`` with its checkpoint written, ``worker`` between trials, ``callable``
checkpointed inside its handler; the signal and the site's time-limit signal; the Slurm task
or none; the rank; restarts against ``max_requeues``; slots left), those of :class:`Said` (what
Slurm answered so far), and the :class:`Step` that follows.

Why not submitit's ``Checkpointable`` for training: submitit's handler runs ``checkpoint()`` on
global rank 0 only, inside the signal handler (at an arbitrary point of a step), then requeues
and exits rank 0 alone. A DeepSpeed checkpoint is a collective every rank must enter at the same
step, and ZeRO shards optimizer state over all ranks, so rank 0 cannot save it alone. The flag
replaces submitit's handler (the task function runs after submitit installed its own).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any, Literal, Protocol

from hpcdl.errors import HpcdlError


# -- which Slurm task this is --------------------------------------------------------------------
@dataclass(frozen=True)
class SlurmTask:
    """This process's Slurm task, as its environment says."""

    job: str  # what scontrol requeue and scancel take: ARRAYJOB_TASK in an array, else the job id
    array_job: str | None  # SLURM_ARRAY_JOB_ID (None outside an array)
    array_task: int | None  # SLURM_ARRAY_TASK_ID
    restarts: int  # SLURM_RESTART_COUNT: how many times Slurm has requeued this job already


def slurm_task(env: Mapping[str, str] | None = None) -> SlurmTask | None:
    """Which Slurm task this process belongs to; None outside Slurm (a local job, mpiexec).
    The one answer for requeues, journals, slots, events and the rendezvous port."""
    env = os.environ if env is None else env
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    if array_job and array_task:
        return SlurmTask(f"{array_job}_{array_task}", array_job, int(array_task), restarts)
    if env.get("SLURM_JOB_ID"):
        return SlurmTask(env["SLURM_JOB_ID"], None, None, restarts)
    return None


def task_id(env: Mapping[str, str] | None = None, local: bool = True) -> str | None:
    """The task's name in journals and slots: :func:`slurm_task`'s ``job``, else submitit's
    local job id (unless ``local`` is false: only Slurm tasks can be requeued), else None."""
    task = slurm_task(env)
    if task is not None:
        return task.job
    return (os.environ if env is None else env).get("SUBMITIT_LOCAL_JOB_ID") if local else None


def restarts() -> int:
    """How many times Slurm has requeued this job already (0 outside Slurm)."""
    task = slurm_task()
    return 0 if task is None else task.restarts


# -- signal names --------------------------------------------------------------------------------
def signal_of(name: str) -> signal.Signals:
    """``TERM``, ``SIGTERM``, ``usr2`` ... as a signal; HpcdlError for anything else."""
    try:
        return signal.Signals[f"SIG{str(name).upper().removeprefix('SIG')}"]
    except KeyError:
        raise HpcdlError(f"preemption signal {name!r} is not a signal name") from None


def time_limit_signal() -> signal.Signals:
    """The site's time-limit signal (``SUBMITIT_PREEMPT_SIGNAL``, as the batch script exports
    it; USR2 by default, never USR1, which NCCL swallows): sent ``delay_s`` before the time
    limit, and what submitit's own handler catches."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    try:
        return signal_of(name)
    except HpcdlError:
        raise HpcdlError(f"SUBMITIT_PREEMPT_SIGNAL={name!r} is not a signal name") from None


# -- the flag ------------------------------------------------------------------------------------
class StopFlag(Protocol):
    """What the trainer and a sweep's trials read of :class:`PreemptionFlag`: set once this rank
    must stop (a preemption or time-limit signal, on this rank or, after the step's all-reduce,
    on another)."""

    requested: bool


class PreemptionFlag:
    """Set when this rank receives a preemption signal; read at step boundaries (no work inside
    a signal handler: the main thread may be in the middle of a collective). It listens to the
    time-limit signal and SIGTERM from the start (a signal may come before the config is read);
    :func:`configure` then applies the site's list."""

    def __init__(self) -> None:
        self.signum = time_limit_signal()
        self.requested = False
        self.received: signal.Signals | None = None  # the first signal, and when (monotonic)
        self.received_at: float | None = None
        self.previous: dict[signal.Signals, object] = {}  # the handlers ours replaced
        self.listen([self.signum, signal.SIGTERM])

    def listen(self, signums: list[signal.Signals]) -> None:
        """Handle exactly ``signums`` (plus the time-limit signal); others get their old handler."""
        for signum in [*self.previous]:
            if signum not in signums and signum != self.signum:
                signal.signal(signum, self.previous.pop(signum))  # type: ignore[arg-type]
        for signum in signums:
            if signum not in self.previous:
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            _say(f"received {signal.Signals(signum).name}: checkpointing at the next step")
            self.received, self.received_at = signal.Signals(signum), time.monotonic()
        self.requested = True


def received_signal(flag: object, agreed: int | None = None) -> str | None:
    """The signal that stopped this rank: ``agreed`` by the ranks (the trainer's reduction), else
    its own; None when another rank's (a guessed time-limit signal skipped decide's cancel check)."""
    received = signal.Signals(agreed) if agreed else getattr(flag, "received", None)
    return received.name if received else None


# -- the site's policy ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """The site's preemption settings as the ranks use them."""

    signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)
    grace_time_s: float = 60.0  # between a preemption signal and SIGKILL
    delay_s: float = 120.0  # between the time-limit signal and the limit

    def budget(self, received: signal.Signals | None) -> float | None:
        """Seconds a checkpoint has after ``received`` (None: no signal on this rank)."""
        if received is None:
            return None
        return self.grace_time_s if received in self.signals else self.delay_s


def configure(flag: object, settings: Mapping[str, Any]) -> Policy:
    """The policy of the site's preemption ``settings`` (``preempt_signals``, ``grace_time_s``,
    ``delay_s``); a :class:`PreemptionFlag` starts listening to its signals."""
    policy = Policy(
        tuple(signal_of(n) for n in settings["preempt_signals"]),
        float(settings["grace_time_s"]),
        float(settings["delay_s"]),
    )
    if isinstance(flag, PreemptionFlag):
        flag.listen(list(policy.signals))
    return policy


def grace_report(flag: object, policy: Policy, last_save_s: float | None) -> dict[str, Any] | None:
    """The ``grace_too_short`` event when the time left after this rank's signal looks too
    short for a checkpoint as long as the last one (the save is tried anyway: if SIGKILL cuts
    it, its manifest is missing and the resume falls back to the last periodic checkpoint)."""
    received, at = getattr(flag, "received", None), getattr(flag, "received_at", None)
    budget = policy.budget(received)
    since = 0.0 if at is None else time.monotonic() - at
    if received is None or at is None or budget is None or since + (last_save_s or 0) <= budget:
        return None
    return {
        "event": "grace_too_short",
        "signal": received.name,
        "since_signal_s": round(since, 3),
        "last_save_s": None if last_save_s is None else round(last_save_s, 3),
        "budget_s": budget,
        "why": f"{received.name} came {since:.1f}s ago and the last checkpoint took "
        f"{last_save_s or 0:.1f}s: more than the {budget:g}s before SIGKILL; saving anyway, "
        "a cut save falls back to the last periodic checkpoint",
    }


# -- the decision after a stop -------------------------------------------------------------------
Who = Literal["trainer", "worker", "callable"]
Action = Literal[
    "ask_cancelled", "requeue", "ask_requeued",  # what to ask or do next (settle does it)
    "requeued", "already", "wait", "leave", "fail",  # where it ends
]  # fmt: skip


@dataclass(frozen=True)
class Stop:
    """What a stopped process knows. ``who``: ``trainer`` (its checkpoint is written: a stop
    that is not requeued fails the job, whose log says how to resume), ``worker`` (a sweep
    worker between trials: nothing is lost, the follow-up job runs what is left), ``callable``
    (a Checkpointable callable: rank 0 wrote its pickle in the handler)."""

    who: Who
    signal: str | None  # "SIGTERM"; None: another rank's, unknown here (asks as TERM does)
    time_limit: str  # the site's time-limit signal, "SIGUSR2"
    task: SlurmTask | None  # None: not a Slurm job
    rank: int = 0
    max_requeues: int | None = None  # job.max_requeues (the trainer); None: no limit of ours
    work_left: bool = True  # a worker's round still has slots


@dataclass(frozen=True)
class Said:
    """What Slurm answered so far (None: not asked yet)."""

    cancelled: bool | None = None  # scancel stopped the job (it sends SIGTERM too)
    requeue: str | None = None  # scontrol requeue: "" done, else its refusal
    requeued_by_slurm: bool | None = None  # Slurm put the job back itself (a node failed)


@dataclass(frozen=True)
class Step:
    """What :func:`decide` says comes next, and why."""

    action: Action
    why: str  # a short reason: "cancelled", "exhausted", "refused", "by Slurm", ...
    said: str = ""  # Slurm's refusal, when why == "refused"


def decide(stop: Stop, said: Said = Said()) -> Step:
    """The next step after ``stop``, given what Slurm ``said``; pure (tables test it)."""
    give_up: Action = "fail" if stop.who == "trainer" else "leave"
    if stop.who == "callable":  # Slurm's PreemptMode=REQUEUE requeues it after SIGKILL
        if stop.signal == stop.time_limit:  # submitit's handler: checkpoint, scontrol requeue
            return Step("leave", "submitit's")
        return Step("wait", "Slurm requeues")
    if stop.task is None:
        return Step(give_up, "not Slurm")
    if stop.max_requeues is not None and stop.task.restarts >= stop.max_requeues:
        return Step(give_up, "exhausted")  # every rank: the job ends FAILED, saying so
    if not stop.work_left:
        return Step("leave", "nothing left")
    if stop.rank != 0:
        return Step("leave", "rank 0 requeues")  # one requeue per job (or array task)
    if stop.signal != stop.time_limit and said.cancelled is None:
        return Step("ask_cancelled", "scancel sends SIGTERM too")
    if said.cancelled:
        return Step(give_up, "cancelled")  # it must not come back
    if said.requeue is None:
        return Step("requeue", "stopped")
    if said.requeue == "":
        return Step("requeued", "requeued")
    if "pending execution" in said.requeue:  # a node failed: Slurm requeued it (and sent TERM)
        return Step("already", "by Slurm")
    if said.requeued_by_slurm is None:
        return Step("ask_requeued", "refused")
    if said.requeued_by_slurm:
        return Step("already", "by Slurm")
    return Step(give_up, "refused", said.requeue)


class SlurmControl(Protocol):
    """What :func:`settle` asks of Slurm (``hpcdl.scheduler.SlurmRequeue``); ``requeue`` raises
    HpcdlError with Slurm's answer when refused."""

    def cancelled(self, job: str) -> bool: ...
    def requeue(self, job: str) -> None: ...
    def requeued_by_slurm(self, job: str) -> bool: ...


def settle(stop: Stop, slurm: SlurmControl) -> Step:
    """Carry out :func:`decide`: ask Slurm what it asks, requeue when it says so; the last step."""
    said, job = Said(), stop.task.job if stop.task else ""
    while True:
        step = decide(stop, said)
        if step.action == "ask_cancelled":
            said = replace(said, cancelled=slurm.cancelled(job))
        elif step.action == "ask_requeued":
            said = replace(said, requeued_by_slurm=slurm.requeued_by_slurm(job))
        elif step.action == "requeue":
            try:
                slurm.requeue(job)
                said = replace(said, requeue="")
            except HpcdlError as exc:
                said = replace(said, requeue=str(exc))
        else:
            return step


def after_checkpoint(step: int, tag: str, run_dir: str, max_requeues: int, rank: int,
                     sig: str | None = None, *, slurm: SlurmControl) -> str:  # fmt: skip
    """The trainer, on every rank, once its stop checkpoint is complete: rank 0 requeues the
    job; every rank raises (so the job ends FAILED) if it cannot or must not be requeued.
    Returns the requeued job."""
    limit = time_limit_signal().name
    task = slurm_task()
    done = settle(Stop("trainer", sig, limit, task, rank, max_requeues), slurm)
    sig = sig or "another rank's signal"
    resume = f"resubmit with run_dir={run_dir} to continue from checkpoint {tag}"
    if task is None:
        raise HpcdlError(f"stopped by {sig} at step {step} (not a Slurm job, no requeue): {resume}")
    if done.why == "exhausted":
        raise HpcdlError(
            f"preempted at step {step} after {task.restarts} requeue(s), "
            f"job.max_requeues={max_requeues} exhausted: not requeued; {resume}"
        )
    if done.why == "cancelled":
        raise HpcdlError(f"job {task.job} was cancelled ({sig} at step {step}): not requeued")
    if done.why == "refused":
        raise HpcdlError(f"{done.said}; {resume}")
    if done.action == "already":
        _say(f"job {task.job} was already requeued by Slurm after step {step}", sys.stdout)
    elif done.action == "requeued":
        _say(f"requeued job {task.job} after step {step} "
             f"(requeue {task.restarts + 1} of at most {max_requeues})", sys.stdout)  # fmt: skip
    return task.job


# -- Checkpointable callables --------------------------------------------------------------------
# The seam to submitit (hpcdl.scheduler.checkpointable): called in the task before the callable
# starts, it returns this task's global rank and the function that saves the job's checkpoint
# (its path), or None outside a submitit Slurm task.
Bind = Callable[[], tuple[int, Callable[[], str]] | None]


@dataclass(frozen=True)
class PreemptCheckpoint:
    """A Checkpointable callable's job runs in a partition that Slurm preempts by requeueing
    (``PreemptMode=REQUEUE``): ``signals`` (the site's ``preempt_signals``, SIGTERM) get the
    callable checkpointed, then the task waits up to ``wait_s`` for Slurm's SIGKILL."""

    signals: tuple[str, ...]
    wait_s: float
    bind: Bind


class _OnPreemption:
    """The handler of the site's preemption signals for a Checkpointable callable's task.

    submitit binds SIGTERM to a handler that only logs it, so a callable preempted by Slurm
    (SIGTERM, ``GraceTime``, SIGKILL, requeue) would start over. On the first signal, global rank
    0 does what submitit does with its own signal: ``checkpoint()``, and the returned submission
    replaces the job's ``<job id>_submitted.pkl``, which every task of the requeued job loads
    (one per job, or per array task: that is why only rank 0 writes it). Then every rank waits
    for the SIGKILL instead of going on (work after the checkpoint would be redone, or lost) or
    exiting: Slurm requeues a preempted job only if it is still running when the grace time ends
    (one that ends within it is recorded COMPLETED), so no Slurm command is needed, and a SIGTERM
    from ``scancel`` or the time limit still ends the job. A signal that no SIGKILL follows within
    ``wait_s`` was no preemption: the task carries on. Messages go to stderr by ``print``: a
    signal handler must not take the logging lock the interrupted code may hold.
    """

    def __init__(self, rank: int, save: Callable[[], str], wait_s: float) -> None:
        self.rank, self.save, self.wait_s, self.fired = rank, save, wait_s, False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.fired:  # Slurm repeats SIGTERM at the end of the grace time: still waiting
            return
        self.fired, name = True, signal.Signals(signum).name
        if self.rank == 0:  # raises when checkpoint() returns None: the job ends here
            path = self.save()
            _say(f"preempted by {name}: checkpoint saved in {path}; waiting for Slurm's requeue")
        else:
            _say(f"preempted by {name}: rank {self.rank} stops; rank 0 checkpoints")
        deadline = time.monotonic() + self.wait_s
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 5.0))
        _say(f"no SIGKILL {self.wait_s:.0f}s after {name}: not a preemption, carrying on")


def checkpoint_on_preemption(preempt: PreemptCheckpoint) -> None:
    """Install :class:`_OnPreemption` for the signals :func:`decide` gives a ``callable`` to
    wait on (the time-limit signal stays submitit's: checkpoint, ``scontrol requeue``, a few
    times at most)."""
    bound = preempt.bind()
    if bound is None:
        _say("not a submitit Slurm task: no checkpoint on preemption")
        return
    handler, limit = _OnPreemption(*bound, preempt.wait_s), time_limit_signal()
    for signum in (signal_of(name) for name in preempt.signals):
        stop = Stop("callable", signum.name, limit.name, slurm_task(), bound[0])
        if decide(stop).action == "wait":
            signal.signal(signum, handler)


def _say(message: str, to: Any = None) -> None:
    print(f"hpcdl: {message}", file=to or sys.stderr, flush=True)
