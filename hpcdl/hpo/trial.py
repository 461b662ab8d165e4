"""One trial slot of a sweep: claim or resume a trial, run the objective, tell the study.

A warm worker (:mod:`hpcdl.hpo.worker`) claims slot after slot; with ``trials_per_task: 1``
array task ``i`` claims slot ``i``. The slot file (``slots/i.json``) ties the slot to its Optuna
trial, parameters, W&B run id and attempt count, so a requeued or resubmitted task resumes the
same trial (same parameters, same checkpoint folder, same W&B run) instead of drawing a new one.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import optuna

from hpcdl.hpo import budget, decide
from hpcdl.hpo.folder import ENDED, FINISHED_SLOT, Slot, SweepPaths, abort_file
from hpcdl.hpo.packing import claimant
from hpcdl.hpo.pareto import measured
from hpcdl.hpo.protocol import Objective, TrialContext, TrialRequeued, as_objective
from hpcdl.hpo.spec import SweepSpec
from hpcdl.hpo.study import TrialReporter, storage_of, suggest
from hpcdl.preemption import StopFlag
from hpcdl.train.stop import StopTraining
from hpcdl.util import atomic_write_text


def resolve_objective(spec: SweepSpec) -> Objective:
    """``objective: module:name`` from the spec (an Objective, or a plain function wrapped in
    one), else hpcdl's trainer."""
    ref = spec.objective or f"hpcdl.hpo.{'pbt:pbt' if spec.pbt else 'objective:train'}_objective"
    module, _, name = ref.partition(":")
    return as_objective(getattr(importlib.import_module(module), name), ref)


def claim(
    paths: SweepPaths,
    spec: SweepSpec,
    study: optuna.Study,
    slot_no: int | None,
    among: list[int] | None = None,
) -> Slot | None:
    """Under the sweep lock: resume the slot's trial, or ask the study for a new one.

    ``slot_no=None`` (workers) takes, among the round's slots ``among`` (default: all), first
    the slot this very task was running (a requeued worker resumes its trial before anything
    else), then the first slot that is free or marked for retry. Returns ``None`` when there is
    nothing left to do.
    """
    with paths.lock():
        if slot_no is None:
            slot_no = _next_slot(paths, range(spec.trials) if among is None else among)
            if slot_no is None:
                return None
        slot = paths.read_slot(slot_no)
        if slot is None:
            action = decide.claim(None, 0, None, claimant(), spec.max_retries)
        else:
            action = decide.claim(slot.state, slot.attempts, slot.job, claimant(), spec.max_retries)
        if action == "skip":
            return None
        if action == "new" and budget.refuse_new_trial(paths, spec):  # running trials finish
            return None
        if slot is not None and action in ("retry", "fail") and _adopt_told(paths, study, slot):
            return None
        if action == "fail":
            assert slot is not None
            study.tell(slot.trial, state=optuna.trial.TrialState.FAIL)
            paths.write_slot(
                slot.model_copy(update={"state": "failed", "error": "retries exhausted"})
            )
            return None
        new = slot is None
        if slot is None:  # "new"
            trial = _orphan_of_a_dead_claim(paths, study) or _ask(paths, study, slot_no)
            slot = Slot(
                slot=slot_no,
                trial=trial.number,
                params=suggest(trial, spec),
                run_id=f"{spec.name}-t{trial.number:05d}",
            )
        elif action == "retry":  # a Slurm requeue of the same task ("resume") is no new attempt
            slot = slot.model_copy(update={"attempts": slot.attempts + 1, "state": "running"})
        slot = slot.model_copy(
            update={
                "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
                "job": claimant(),  # a packed lane's TASK+LANE: it resumes its own trial
                "claimed_at": time.time(),
            }
        )
        paths.write_slot(slot)
        if new:  # only a new trial's claim took the note's orphan (or asked): a retry must not
            paths.asking.unlink(missing_ok=True)  # drop it, or the next new claim asks again
        return slot


def _ask(paths: SweepPaths, study: optuna.Study, slot_no: int) -> optuna.trial.Trial:
    """Under the lock: a new trial, with a note first that a claim is between the study's ask
    and its slot write (the parameters are several more writes to the study: on PostgreSQL a
    kill there, by ``sweep cancel`` under load, was seen)."""
    atomic_write_text(paths.asking, json.dumps({"slot": slot_no}))
    return study.ask()


def _orphan_of_a_dead_claim(paths: SweepPaths, study: optuna.Study) -> optuna.trial.Trial | None:
    """Under the lock, when the last claim's note is still there (it died after asking the
    study, before its slot write): the trial it left RUNNING that no slot names, to be claimed
    again instead of asking another. Otherwise the study kept a trial RUNNING for ever, the
    trial numbers had a gap, and ``sweep best``/the report counted one trial too many. Its
    parameters already drawn are kept (Optuna returns a suggested parameter's stored value); the
    rest are drawn now. All asks of a sweep happen under its lock, so a RUNNING trial no slot
    names can only be such an orphan."""
    if not paths.asking.is_file():
        return None
    held = {s.trial for s in paths.all_slots()}
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    orphans = sorted((t for t in running if t.number not in held), key=lambda t: t.number)
    if not orphans:
        return None
    return optuna.trial.Trial(study, orphans[0]._trial_id)  # no public way from a number


def _adopt_told(paths: SweepPaths, study: optuna.Study, slot: Slot) -> bool:
    """Under the lock: when the study already ended the slot's trial (told, then the process
    died before its slot write), record that in the slot instead of another attempt."""
    done = optuna.trial.TrialState
    ended = (done.COMPLETE, done.PRUNED, done.FAIL)
    trial = next((t for t in study.get_trials(deepcopy=False, states=ended)
                  if t.number == slot.trial), None)  # fmt: skip
    state = decide.told(trial.state.name) if trial is not None else None
    if trial is None or state is None:
        return False
    value = trial.values[0] if trial.values else None  # the first objective's, as run_trial
    paths.write_slot(slot.model_copy(update={"state": state, "value": value}))
    return True


def update_slot(paths: SweepPaths, new: Slot) -> bool:
    """Write a running trial's slot under the sweep lock, as every other slot write is (a
    claim, an aborted attempt, ``sweep resume``): a read-modify-write outside it could undo a
    decision taken meanwhile. A progress update of an attempt that another process has already
    ended (an aborting rank marked it for retry or failed, under the lock) is dropped: that
    decision stands. Returns whether the slot was written."""
    with paths.lock():
        now = paths.read_slot(new.slot)
        if now and now.state in ENDED and new.state == "running" and now.attempts == new.attempts:
            return False
        paths.write_slot(new)
        return True


#: Per sweep folder, what this process has read of the slot files: the slots it saw finished
#: (a finished slot is never written back to running or retry: claims, ``resume`` and aborts
#: rewrite running slots only, so it need not be read again), and the others as last read,
#: with the file's identity then (every write replaces the file: a new inode and mtime).
_FINISHED_SEEN: dict[Path, set[int]] = {}
_READ: dict[Path, dict[int, tuple[tuple[int, int, int], Slot]]] = {}


def _next_slot(paths: SweepPaths, slots: Iterable[int]) -> int | None:
    """Under the sweep lock. Reads only what can have changed: one listing of the folder says
    which slots have no file yet (free), slots this process saw finished are skipped, and an
    unfinished slot's file is read again only when it was replaced since (one ``stat``).
    Reading every file, as before, cost a 10,000-trial sweep's claims 0.4 s each under the
    lock, which every other worker waits for; reading the 256 running slots of 256 workers,
    15 ms of a claim's 40."""
    done = _FINISHED_SEEN.setdefault(paths.root, set())
    read = _READ.setdefault(paths.root, {})
    present = {name[:-5] for name in os.listdir(paths.slots) if name.endswith(".json")}
    seen: list[tuple[int, str | None, str | None]] = []
    for i in slots:
        if i in done:
            continue  # finished: never claimed again
        if str(i) not in present:
            seen.append((i, None, None))
            continue
        slot = _read_if_replaced(paths, i, read)
        if slot is not None and slot.state in FINISHED_SLOT:
            done.add(i)
            read.pop(i, None)
            continue
        seen.append((i, slot.state if slot else None, slot.job if slot else None))
    # Only a Slurm job or task id survives a requeue (a local worker's id is not its task's).
    return decide.next_slot(seen, claimant(local=False))


def _read_if_replaced(
    paths: SweepPaths, i: int, read: dict[int, tuple[tuple[int, int, int], Slot]]
) -> Slot | None:
    try:
        st = os.stat(f"{paths.slots}/{i}.json")  # paths.slot_file's, without pathlib's cost
    except FileNotFoundError:
        return None
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    if i in read and read[i][0] == key:
        return read[i][1]
    slot = paths.read_slot(i)
    if slot is not None:
        read[i] = (key, slot)
    return slot


def run_trial(
    paths: SweepPaths,
    spec: SweepSpec,
    study: optuna.Study,
    slot: Slot,
    flag: StopFlag | None = None,
) -> Slot:
    """Run the objective for a claimed slot (retrying exceptions up to ``max_retries``); rank 0
    tells the study. Multi-node trials: every rank runs this with the slot broadcast from rank 0.
    The slot comes back still ``running`` when the trial checkpointed for a requeue."""
    objective = resolve_objective(spec)
    trial_dir = paths.trial_dir(slot)
    trial_dir.mkdir(parents=True, exist_ok=True)
    lead = _rank() == 0
    reporter = (
        TrialReporter(study, storage_of(study, spec, paths.root), slot.trial) if lead else None
    )

    def record(new: Slot, **tell: Any) -> Slot:
        """Rank 0 writes the slot, and tells the study when the trial ends."""
        if lead:
            if tell:
                study.tell(new.trial, **tell)
            update_slot(paths, new)
        return new

    def report(epoch: int, value: float) -> None:
        nonlocal slot
        if reporter is not None and not spec.multi:  # Optuna keeps no curve of several values
            reporter.report(value, epoch)
        slot = record(slot.model_copy(update={"epochs": epoch}))
        if _agree(reporter.should_prune() if reporter is not None else False):
            raise StopTraining(f"pruned at epoch {epoch}", tag="pruned")

    def note(event: dict[str, Any]) -> None:
        nonlocal slot
        slot = record(slot.model_copy(update={"pbt": [*slot.pbt, event]}))

    watchdog = _watch_for_abort(trial_dir, slot.attempts) if _world() > 1 else None
    while True:
        ctx = TrialContext(spec, slot, trial_dir, report, flag, note)
        try:
            values = measured(objective.run(dict(slot.params), ctx), spec.metrics,
                              spec.constraints)  # fmt: skip
        except TrialRequeued:
            _stop(watchdog)
            return slot
        except Exception as exc:
            if _pruned(exc):
                _stop(watchdog)  # a warm worker goes on to its next trial
                pruned = slot.model_copy(update={"state": "pruned"})
                return record(pruned, state=optuna.trial.TrialState.PRUNED)
            if getattr(flag, "requested", False):  # the task is being stopped (scancel, a
                _stop(watchdog)  # requeue that failed): no retry here; the slot stays running
                return slot  # for the requeued task, the follow-up job or 'sweep resume'
            if watchdog is not None:  # the other ranks may be anywhere: one decision, all exit
                abort_attempt(paths, spec, study, slot, exc)
            error = f"{type(exc).__name__}: {exc}"
            (trial_dir / f"error-attempt{slot.attempts}.txt").write_text(traceback.format_exc())
            if slot.attempts <= spec.max_retries:
                slot = record(
                    slot.model_copy(update={"attempts": slot.attempts + 1, "error": error})
                )
                continue
            failed = slot.model_copy(update={"state": "failed", "error": error})
            return record(failed, state=optuna.trial.TrialState.FAIL)
        _stop(watchdog)
        if reporter is not None and spec.constraints:
            reporter.constrain({c: values[c] for c in spec.constraints})
        told = [values[m] for m in spec.metrics]
        done = slot.model_copy(update={"state": "complete", "value": told[0], "values": values})
        return record(done, values=told)


def _stop(watchdog: threading.Event | None) -> None:
    if watchdog is not None:
        watchdog.set()


# -- multi-rank trials: an exception on any rank ends the attempt on every rank ----------------------
def abort_attempt(
    paths: SweepPaths, spec: SweepSpec, study: optuna.Study, slot: Slot, exc: BaseException
) -> NoReturn:
    """A rank of a multi-rank trial raised: its peers may be waiting in a collective that will
    never complete, so the attempt cannot go on in this process group. The first rank to get
    here decides for all (under the sweep lock, through the shared filesystem, not a
    collective): the slot is marked for retry (the follow-up job or ``sweep resume`` runs it
    again, same trial and parameters) or, retries used up, failed. Every rank then exits: the
    others' watchdogs see the decision within a second."""
    rank = _rank()
    trial_dir = paths.trial_dir(slot)
    error = f"rank {rank}: {type(exc).__name__}: {exc}"
    (trial_dir / f"error-attempt{slot.attempts}-rank{rank}.txt").write_text(traceback.format_exc())
    marker = abort_file(trial_dir, slot.attempts)
    with paths.lock():
        first = not marker.exists()
        current = paths.read_slot(slot.slot) or slot
        if first and current.state not in FINISHED_SLOT:
            atomic_write_text(marker, json.dumps({"rank": rank, "error": error}))
            if slot.attempts <= spec.max_retries:
                paths.write_slot(current.model_copy(update={"state": "retry", "error": error}))
            else:
                study.tell(slot.trial, state=optuna.trial.TrialState.FAIL)
                paths.write_slot(current.model_copy(update={"state": "failed", "error": error}))
    decided = "retry" if slot.attempts <= spec.max_retries else "failed"
    print(f"trial {slot.trial} attempt {slot.attempts}: {error}; "
          f"{'every rank ends the attempt (' + decided + ')' if first else 'decided already'}",
          file=sys.stderr, flush=True)  # fmt: skip
    sys.stdout.flush()
    if first:  # the peers' watchdogs end them on the decision, before our exit breaks their
        time.sleep(2.0)  # connections and they raise transport errors of their own
    os._exit(1)  # not sys.exit: atexit and process-group teardown could wait for dead peers


def _watch_for_abort(trial_dir: Path, attempt: int) -> threading.Event:
    """A daemon thread that ends this process when another rank aborted this attempt (it may be
    blocked in a collective the failed rank will never join). Set the event to stop it."""
    stop = threading.Event()
    marker = abort_file(trial_dir, attempt)
    rank = _rank()

    def watch() -> None:
        while not stop.wait(0.5):
            if not marker.is_file():
                continue
            info = json.loads(marker.read_text())
            if info.get("rank") != rank:
                print(f"rank {rank}: attempt {attempt} ended by rank {info.get('rank')} "
                      f"({info.get('error')})", file=sys.stderr, flush=True)  # fmt: skip
                os._exit(1)

    threading.Thread(target=watch, name="hpcdl-trial-watchdog", daemon=True).start()
    return stop


def _pruned(exc: BaseException) -> bool:
    """The pruner's stop (or an objective's own ``optuna.TrialPruned``)."""
    return isinstance(exc, optuna.TrialPruned) or (
        isinstance(exc, StopTraining) and exc.tag == "pruned"
    )


def _group() -> Any:
    """``torch.distributed`` when this process is in a process group, else None. A process
    that never imported torch has no group: asking would import torch for nothing, and a sweep
    worker with a cheap objective would carry 180 MB more and a second of start-up (256 such
    workers did not fit in 24 GiB)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    dist = _group()
    return dist.get_rank() if dist is not None else 0


def _world() -> int:
    dist = _group()
    return dist.get_world_size() if dist is not None else 1


def _agree(flag: bool) -> bool:
    """Rank 0's decision, shared with every rank (no-op without torch.distributed)."""
    dist = _group()
    if dist is None:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _broadcast_slot(slot: Slot | None) -> Slot | None:
    dist = _group()
    if dist is None:
        return slot
    box = [slot.model_dump_json() if slot is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Slot.model_validate_json(box[0]) if box[0] is not None else None


def _maybe_init_distributed(timeout_s: float) -> None:
    """Multi-task trials need the process group before rank 0 can broadcast the slot; a
    collective that waits longer than ``timeout_s`` (a dead peer) raises, failing the attempt."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from hpcdl.launch import init_distributed

        init_distributed(timeout_s=timeout_s)
