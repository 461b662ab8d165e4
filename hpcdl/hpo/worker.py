"""Warm trial workers: one process (or one process group) runs trial after trial.

By default a sweep round on Slurm is an array of ``min(parallelism, missing slots)`` tasks, each
a worker that claims the round's slots until none is left (``trials_per_task: 1`` keeps one
trial per array task, :func:`hpcdl.hpo.trial.array_task_main`). The interpreter, the imports
and the process group stay up across trials, so a pruned or finished trial hands its slot to the
next one at once, without a scheduler round trip or a start-up.

- A multi-node worker loops on every rank: rank 0 claims and broadcasts the slot (``None``, the
  end of the loop, is broadcast too), and a new engine is built per trial over the same group.
- One preemption flag serves all the worker's trials (installed first, so no signal is lost
  between trials). A trial that checkpointed for a requeue ends the worker; Slurm brings the
  same task back and :func:`hpcdl.hpo.trial.claim` gives it that trial first (same task id).
- Each worker keeps a journal, ``workers/<task>.jsonl``: a ``start`` line per process start
  and a ``trial`` line per trial (claim and end times). Its existence tells the lifecycle that
  the task started; ``hpcdl bench hpo`` reads the timings.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import optuna

from hpcdl import preemption
from hpcdl.hpo import decide, packing, store_timing
from hpcdl.hpo.folder import FINISHED_SLOT, SweepPaths
from hpcdl.hpo.spec import SweepSpec
from hpcdl.hpo.study import open_study
from hpcdl.hpo.trial import (
    _broadcast_slot,
    _maybe_init_distributed,
    _rank,
    _world,
    claim,
    run_trial,
)
from hpcdl.preemption import StopFlag, task_id
from hpcdl.util import append_jsonl, configure_logging, get_logger, process_age, read_jsonl

log = get_logger(__name__)


def journal_dir(paths: SweepPaths) -> Path:
    return paths.workers


def journal(paths: SweepPaths, task: str | None = None) -> Path:
    """The journal of task ``task`` (default: this one)."""
    return journal_dir(paths) / f"{task or task_id() or os.getpid()}.jsonl"


def note(paths: SweepPaths, event: str, **fields: Any) -> None:
    """One line in this task's journal (rank 0 only: one line per task, not per rank)."""
    if _rank() != 0:
        return
    journal_dir(paths).mkdir(exist_ok=True)
    line = {"event": event, "time": time.time(), "pid": os.getpid(), **fields}
    append_jsonl(journal(paths), line)


def read_journals(paths: SweepPaths) -> dict[str, list[dict[str, Any]]]:
    """``{task id: its journal lines}`` for every task of the sweep that started."""
    folder = journal_dir(paths)
    if not folder.is_dir():
        return {}
    return {p.stem: read_jsonl(p) for p in sorted(folder.glob("*.jsonl"))}


def started(paths: SweepPaths, task: str) -> bool:
    """Whether Slurm task ``task`` ever ran a worker (its journal exists)."""
    return journal(paths, task).is_file()


def work(
    paths: SweepPaths,
    spec: SweepSpec,
    study: optuna.Study,
    slots: list[int] | None,
    flag: StopFlag | None = None,
) -> list[str]:
    """Claim and run the round's slots until none is left, the task is being stopped (``flag``)
    or a trial checkpointed for a requeue; every rank loops. Returns what each trial ended as."""
    done: list[str] = []
    while True:
        stop = _any_rank(bool(getattr(flag, "requested", False)))
        asked = time.time()
        mine = claim(paths, spec, study, None, among=slots) if _rank() == 0 and not stop else None
        slot = _broadcast_slot(mine)
        if slot is None:
            return done
        claimed = time.time()
        slot = run_trial(paths, spec, study, slot, flag)
        # the claim's time: the sweep lock's wait, the slot reads and the study's ask
        timed = ({"storage_s": store_timing.take(), "claim_s": round(claimed - asked, 6)}
                 if store_timing.enabled() else {})  # fmt: skip
        note(paths, "trial", slot=slot.slot, trial=slot.trial, state=slot.state,
             claimed=claimed, ended=time.time(), attempts=slot.attempts, **timed)  # fmt: skip
        done.append(f"{slot.trial}:{slot.state}")
        if slot.state not in FINISHED_SLOT:  # checkpointed: Slurm requeues this task
            return done


def _any_rank(flag: bool) -> bool:
    """True on every rank when any rank's flag is set (one all-reduce in a process group)."""
    if _world() == 1:
        return flag
    import torch
    import torch.distributed as dist

    box = torch.tensor([int(flag)])
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def worker_task_main(sweep_dir: str, slots: list[int], pack: tuple[int, int] | None = None) -> str:
    """Entry point of one Slurm array task of a warm-worker round (every rank runs it).
    ``pack``: the round's lanes and GPUs per node when it was submitted (None: the spec's, as
    rounds queued before it was passed)."""
    from hpcdl.train import start_gc
    from hpcdl.train.run import finish_distributed

    flag = preemption.PreemptionFlag()  # first: a signal may come at any time
    start_gc.pause()  # until the first trial's trainer is set up (imports make no cycles)
    configure_logging()  # the task's stderr is its log
    paths = SweepPaths(Path(sweep_dir))
    spec = paths.load_spec()
    _maybe_init_distributed(spec.collective_timeout_s)
    log.info("sweep worker %s started (pid %d, rank %d)", task_id(), os.getpid(), _rank())
    note(paths, "start", restarts=preemption.restarts(), process_started=_process_started())
    worker = int(os.environ.get("HPCDL_ARRAY_TASK_ID", "0"))
    lanes, gpus = round_packing(pack, spec)
    if lanes > 1:  # trial packing: several trials at once, each on its share
        done = packed(paths, spec, slots, flag, worker, lanes, gpus)
    else:
        done = work(paths, spec, open_study(spec, paths.root, worker=worker), slots, flag)
    finish_distributed()  # the ranks leave together
    stopped = bool(getattr(flag, "requested", False))
    if _rank() == 0 and not stopped:
        _release_round(paths, spec, slots)
    elif _rank() == 0 and not (done and done[-1].endswith(":running")):
        _requeue_between_trials(paths, slots, flag)
    return f"ran {len(done)} trial(s): {', '.join(done) or 'none left'}"


def _process_started() -> float | None:
    """When the kernel started this process (wall clock), for ``hpcdl bench start``: the
    interpreter's and the imports' time is part of a worker's start."""
    try:
        return round(time.time() - process_age(), 3)
    except (OSError, ValueError, IndexError):  # no /proc: not Linux
        return None


def round_packing(pack: tuple[int, int] | None, spec: SweepSpec) -> tuple[int, int]:
    """The lanes and GPUs per node a worker runs: its round's, which a ``sweep resume
    trials_per_node=N`` after the round was queued does not change (the spec's otherwise)."""
    if pack is None:
        return spec.lanes, spec.resources.gpus_per_node
    return int(pack[0]), int(pack[1])


def packed(
    paths: SweepPaths,
    spec: SweepSpec,
    slots: list[int],
    flag: StopFlag,
    worker: int,
    lanes_n: int,
    gpus_per_node: int,
) -> list[str]:
    """Run ``lanes_n`` warm-worker loops at once, one process each on its share of the
    task's CPUs and GPUs (:mod:`hpcdl.hpo.packing`); what every lane's trials ended as, a
    lane's checkpointed (still running) trial last, so the caller knows a trial was requeued.
    Each lane opens the study itself: a database connection must not cross a fork."""
    cpus, allotted, gpus = packing.allocation(gpus_per_node)
    lanes = packing.plan(lanes_n, cpus, allotted, gpus)

    def lane_loop(lane: packing.Lane) -> list[str]:
        note(paths, "lane", lane=lane.index, cpus=sorted(os.sched_getaffinity(0)),
             threads=lane.threads, gpus=os.environ.get("CUDA_VISIBLE_DEVICES"))  # fmt: skip
        study = open_study(spec, paths.root, worker=worker * len(lanes) + lane.index)
        return work(paths, spec, study, slots, flag)

    per_lane = packing.run_lanes(lanes, lane_loop, flag)
    ended = [d for done in per_lane for d in done[:-1]]
    last = sorted((done[-1] for done in per_lane if done), key=lambda d: d.endswith(":running"))
    return ended + last


def _requeue_between_trials(paths: SweepPaths, slots: list[int], flag: StopFlag) -> None:
    """The worker was stopped with no trial to checkpoint (the signal fell between two trials,
    or during one that ended anyway): while the round has slots left, requeue the task so it
    comes back for them, as it would after a trial's checkpoint. A cancelled task stays
    cancelled; a task Slurm requeued itself (preemption, node failure) is left as it is."""
    from hpcdl.scheduler import SlurmRequeue

    task, sig = preemption.slurm_task(), preemption.received_signal(flag)
    target = task.job if task else None
    try:
        limit = preemption.time_limit_signal().name
        stop = preemption.Stop("worker", sig, limit, task, _rank(),
                               work_left=bool(paths.missing_slots(slots)))  # fmt: skip
        step = preemption.settle(stop, SlurmRequeue())
    except Exception as exc:  # the follow-up job or 'sweep resume' runs the slots instead
        step = preemption.Step("leave", "refused", str(exc))
    sig = sig or "another rank's signal"
    if step.why == "refused":
        log.warning(
            "stopped by %s between trials; could not requeue %s: %s", sig, target, step.said
        )
    if step.action != "requeued":
        return
    note(paths, "requeued", signal=sig)
    log.info("stopped by %s between trials: requeued %s for the round's slots left", sig, target)


def _release_round(paths: SweepPaths, spec: SweepSpec, slots: list[int]) -> None:
    """Every slot of the round finished: cancel the round's tasks still waiting in the queue.
    A requeued worker (preemption, node failure) waits there for Slurm's requeue delay (about
    two minutes) only to find nothing left, and the final job, ``afterany`` on the array,
    would wait for it."""
    from hpcdl.hpo.final import log_event
    from hpcdl.scheduler import get_scheduler
    from hpcdl.site import load_site

    task = preemption.slurm_task()
    array = task.array_job if task else None
    if array is None:
        return
    missing = paths.missing_slots(slots)
    if missing:  # a sibling's slot: it may be held after a failed launch
        if decide.look_for_held("workers", False, len(missing), spec.parallelism):
            _release_failed_launches(paths, spec, array)
        return
    try:
        get_scheduler(load_site(spec.resources.site)).cancel_pending(array)
    except Exception as exc:  # best effort: the tasks would find nothing to do anyway
        log.warning("could not cancel the round's waiting tasks: %s", exc)
        return
    log_event(paths, "worker", f"every slot of the round finished: cancelled the waiting "
              f"tasks of {array} (nothing left for them)")  # fmt: skip


def _release_failed_launches(paths: SweepPaths, spec: SweepSpec, array: str) -> None:
    """The round has slots left that no worker can claim (they belong to a sibling task): when
    Slurm holds that task after its launch failed, release it, or the slot, the follow-up job
    (``afterany`` on the array) and the whole sweep wait for ever."""
    from hpcdl.hpo.final import log_event
    from hpcdl.scheduler import get_scheduler
    from hpcdl.site import load_site

    try:
        held = get_scheduler(load_site(spec.resources.site)).release_failed_launches([array])
    except Exception as exc:  # best effort: 'sweep status' names them, 'sweep resume' releases
        log.warning("could not release the round's held tasks: %s", exc)
        return
    if held:
        log_event(paths, "worker", f"released {', '.join(held)}: Slurm held them after a "
                  "failed launch, and the round's slots left are theirs")  # fmt: skip


def array_task_main(sweep_dir: str, slots: list[int]) -> str:
    """Entry point of one array task of a ``trials_per_task: 1`` round: slot
    ``slots[HPCDL_ARRAY_TASK_ID]``."""
    paths = SweepPaths(Path(sweep_dir))
    spec = paths.load_spec()
    slot_no = slots[int(os.environ["HPCDL_ARRAY_TASK_ID"])]
    _maybe_init_distributed(spec.collective_timeout_s)
    note(paths, "start", restarts=preemption.restarts())
    study = open_study(spec, paths.root, worker=slot_no)
    slot = _broadcast_slot(claim(paths, spec, study, slot_no) if _rank() == 0 else None)
    if slot is None:
        _release_held_siblings(paths, spec, slots, slot_no, stopped=False)
        return f"slot {slot_no}: nothing to do"
    claimed = time.time()
    slot = run_trial(paths, spec, study, slot)
    note(paths, "trial", slot=slot.slot, trial=slot.trial, state=slot.state,
         claimed=claimed, ended=time.time(), attempts=slot.attempts)  # fmt: skip
    # still running: it checkpointed for a requeue, and comes back itself
    _release_held_siblings(paths, spec, slots, slot_no, stopped=slot.state not in FINISHED_SLOT)
    return f"slot {slot_no}: trial {slot.trial} {slot.state} value={slot.value}"


def _release_held_siblings(
    paths: SweepPaths, spec: SweepSpec, slots: list[int], mine: int, stopped: bool
) -> None:
    """At the end of a one-trial task: release the round's tasks Slurm holds after a failed
    launch, as a warm worker does at its end (:func:`_release_round`), when the rule says to
    look (:func:`hpcdl.hpo.decide.look_for_held`)."""
    task = preemption.slurm_task()
    if _rank() != 0 or task is None or task.array_job is None:
        return
    # Slots without a file were never claimed, so are missing: more of them than the rule's
    # tail says no at the cost of one listing, where reading every slot file of a 2,500-task
    # array at the end of each of its tasks would not be cheap on a shared filesystem.
    present = {name for name in os.listdir(paths.slots) if name.endswith(".json")}
    unclaimed = sum(1 for i in slots if i != mine and f"{i}.json" not in present)
    if not decide.look_for_held("array", stopped, unclaimed, spec.parallelism) and unclaimed:
        return
    others = [i for i in paths.missing_slots(slots) if i != mine]
    if decide.look_for_held("array", stopped, len(others), spec.parallelism):
        _release_failed_launches(paths, spec, task.array_job)


def local_worker_main(sweep_dir: str) -> str:
    """One local worker process: claim free slots until none are left; the last worker to
    finish runs the final retraining."""
    from hpcdl.hpo.final import final_main

    paths = SweepPaths(Path(sweep_dir))
    spec = paths.load_spec()
    note(paths, "start", process_started=_process_started())
    study = open_study(spec, paths.root, worker=int(os.environ.get("HPCDL_ARRAY_TASK_ID", "0")))
    done = work(paths, spec, study, None)
    with paths.lock():
        complete = not paths.missing_slots(range(spec.trials))
        run_final = spec.final and complete and not paths.final_started.exists()
        if run_final:
            paths.final_started.touch()
    if run_final:
        final_main(sweep_dir)
    return f"ran {len(done)} trial(s)" + (" and the final retraining" if run_final else "")
