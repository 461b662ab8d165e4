"""Preemption: a signal handler on every rank, a collective stop decision, then requeue.

Two kinds of signal stop a run early. Slurm sends the time-limit signal (``--signal=USR2@delay``;
never USR1, which NCCL swallows) to every task some seconds before the time limit. And when a
higher-priority job preempts this one (``PreemptMode=REQUEUE``), Slurm sends SIGTERM to every
step, waits the partition's ``GraceTime``, then SIGKILLs and requeues: the site profile lists
those signals (``preemption.preempt_signals``, TERM by default) and the grace time. submitit's own
handler merely logs SIGTERM ("Bypassing signal SIGTERM"), so without ours a preempted run would
fall back to its last periodic checkpoint. hpcdl handles every one of them in three steps:

1. every rank installs :class:`PreemptionFlag`, which only sets a flag (no work inside a signal
   handler: the main thread may be in the middle of a collective);
2. at each optimizer-step boundary the trainer all-reduces the flags together with its metrics,
   so all ranks see the same answer at the same step and none is left waiting for another;
3. all ranks write the checkpoint, then rank 0 requeues the job (the exact array task inside an
   array), at most ``max_requeues`` times (``SLURM_RESTART_COUNT`` counts them).

Why not submitit's ``Checkpointable``: submitit's handler runs ``checkpoint()`` on global rank 0
only, inside the signal handler (that is, at an arbitrary point of a step), then requeues and
exits rank 0 alone. A DeepSpeed checkpoint is a collective every rank must enter at the same
step, and ZeRO shards optimizer state over all ranks, so rank 0 cannot save it alone: the other
ranks' state would be lost and rank 0 would hang in the save. Our handler replaces submitit's
(the task function runs after submitit installed its own).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

from hpcdl.errors import HpcdlError
from hpcdl.task_env import signal_of, task_id, time_limit_signal


class StopFlag(Protocol):
    """What the trainer and a sweep's trials read of :class:`PreemptionFlag`: set once this rank
    must stop (a preemption or time-limit signal, on this rank or, after the step's all-reduce,
    on another)."""

    requested: bool


class PreemptionFlag:
    """Set when this rank receives a preemption signal; read at step boundaries. It listens to
    the time-limit signal and SIGTERM from the start (a signal may come before the config is
    read); :func:`configure` then applies the site's list."""

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
            print(
                f"hpcdl: received {signal.Signals(signum).name}: checkpointing at the next step",
                file=sys.stderr,
                flush=True,
            )
            self.received, self.received_at = signal.Signals(signum), time.monotonic()
        self.requested = True


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


def configure(flag: object, site_values: dict[str, Any], site: str | None) -> Policy:
    """The site's preemption policy (the run folder's ``site.json`` first, else the live
    profile, else the defaults); a :class:`PreemptionFlag` starts listening to its signals."""
    from hpcdl.site import Preemption, load_site

    recorded = site_values.get("preemption") or {}
    try:
        live = load_site(site_values.get("site") or site).preemption.model_dump()
    except HpcdlError:
        live = Preemption().model_dump()
    values = {**live, **recorded}
    policy = Policy(
        tuple(signal_of(n) for n in values["preempt_signals"]),
        float(values["grace_time_s"]),
        float(values["delay_s"]),
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
    if received is None or at is None or budget is None:
        return None
    since = time.monotonic() - at
    needed = since + (last_save_s or 0.0)
    if needed <= budget:
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


def received_signal(flag: object) -> str:
    """The signal that stopped this rank (the time-limit signal if it was another rank's)."""
    received = getattr(flag, "received", None)
    return (received or time_limit_signal()).name


def restarts() -> int:
    """How many times Slurm has requeued this job already."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def after_checkpoint(
    step: int, tag: str, run_dir: str, max_requeues: int, rank: int, sig: str | None = None
) -> str:
    """Called on every rank once the preemption checkpoint is complete. Rank 0 requeues the job;
    every rank raises (so the job ends FAILED) if it cannot or must not be requeued."""
    sig = sig or time_limit_signal().name
    resume = f"resubmit with run_dir={run_dir} to continue from checkpoint {tag}"
    target = task_id(local=False)
    if target is None:
        raise HpcdlError(f"stopped by {sig} at step {step} (not a Slurm job, no requeue): {resume}")
    done = restarts()
    if done >= max_requeues:
        raise HpcdlError(
            f"preempted at step {step} after {done} requeue(s), job.max_requeues={max_requeues} "
            f"exhausted: not requeued; {resume}"
        )
    if rank == 0:
        from hpcdl.scheduler import requeue_job  # Slurm's commands: only on the requeue path

        try:
            outcome = requeue_job(target, sig)
        except HpcdlError as exc:
            raise HpcdlError(f"{exc}; {resume}") from None
        if outcome == "cancelled":
            raise HpcdlError(f"job {target} was cancelled ({sig} at step {step}): not requeued")
        if outcome == "already":  # a node of the job failed: Slurm requeued it (and sent TERM)
            print(
                f"hpcdl: job {target} was already requeued by Slurm after step {step}", flush=True
            )
            return target
        print(
            f"hpcdl: requeued job {target} after step {step} "
            f"(requeue {done + 1} of at most {max_requeues})",
            flush=True,
        )
    return target
