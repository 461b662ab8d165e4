"""A sweep's jobs and the rules that keep them from wedging.

On Slurm a sweep round is three jobs: the array (task i runs slot i), a final job and a small
follow-up job, both ``afterany`` on the array, so whatever happens to the array's tasks
(cancelled, failed, timed out, node failure) both of them start once it ends:

- the **final job** retrains the best parameters only when every slot is finished; otherwise it
  exits cleanly and says why (in the job log and the sweep's ``events.jsonl``);
- the **follow-up job** resubmits the slots still missing (a new round: array, final, follow-up),
  unless tasks were cancelled before they started (``scancel`` of the whole array, ``hpcdl sweep
  cancel``: the user stopped the sweep) or the rounds are used up; with nothing missing it makes
  sure a final job will run, replacing one that can never start.

``hpcdl sweep resume`` does the same on demand, so a sweep either finishes by itself or its
status says what is stuck and one ``resume`` brings it to completion. No job that can never run
is left in the queue.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from hpcdl.errors import HpcdlError
from hpcdl.hpo.spec import SweepSpec
from hpcdl.hpo.study import open_study
from hpcdl.hpo.trial import FINISHED_SLOT, SweepPaths, TrialRequeued, _job_id
from hpcdl.job import Job
from hpcdl.scheduler import (
    FINISHED,
    JobHandle,
    TaskStatus,
    cancel_jobs,
    get_scheduler,
    job_statuses,
    summarize,
)
from hpcdl.site import SiteProfile
from hpcdl.util import atomic_write_json, get_logger

log = get_logger(__name__)
# Pending reasons after which Slurm will never start the job.
NEVER_STARTS = frozenset({"DependencyNeverSatisfied", "InvalidDependency"})
KINDS = ("array", "workers", "final", "follow")


def log_event(paths: SweepPaths, who: str, text: str) -> None:
    """One line of what the sweep's jobs decided (``events.jsonl``; shown by ``sweep status``)."""
    line = {"time": time.time(), "who": who, "job": _job_id(), "text": text}
    with open(paths.events, "a") as f:
        f.write(json.dumps(line) + "\n")
    log.info("%s: %s", who, text)


#: What the follow-up job takes from the sweep's resources.
FOLLOW_UP_FIELDS = {"partition", "account", "qos", "constraint", "reservation", "exclude",
                    "nodelist", "snapshot"}  # fmt: skip


class SweepJob:
    """One submission of the sweep with its tasks' current states."""

    def __init__(
        self, kind: str, slots: list[int], handle: JobHandle, tasks: dict[str, TaskStatus]
    ):
        self.kind, self.slots, self.handle, self.tasks = kind, slots, handle, tasks

    @property
    def state(self) -> str:
        return summarize({t: s.state for t, s in self.tasks.items()})

    @property
    def reasons(self) -> list[str]:
        """Distinct pending reasons of its tasks."""
        return sorted({s.reason for s in self.tasks.values() if s.state == "PENDING" and s.reason})

    @property
    def never_starts(self) -> bool:
        """Pending for a reason Slurm will not get over (e.g. an afterok that failed)."""
        pending = [s for s in self.tasks.values() if s.state == "PENDING"]
        return bool(pending) and all(s.reason in NEVER_STARTS for s in pending)

    @property
    def live(self) -> bool:
        """Running, or queued and able to start."""
        return self.state not in FINISHED and not self.never_starts


class Lifecycle:
    """Submits a sweep's rounds and decides what happens when one ends."""

    def __init__(self, spec: SweepSpec, paths: SweepPaths, site: SiteProfile):
        self.spec, self.paths, self.site = spec, paths, site

    # -- records ----------------------------------------------------------------------------------
    def submissions(self) -> list[dict[str, Any]]:
        if not self.paths.submissions.is_file():
            return []
        lines = self.paths.submissions.read_text().splitlines()
        return [json.loads(line) for line in lines if line]

    def _record(self, kind: str, handle: JobHandle, slots: list[int]) -> None:
        with open(self.paths.submissions, "a") as f:
            f.write(json.dumps({"kind": kind, "slots": slots, **handle.model_dump()}) + "\n")

    def jobs(self, kinds: tuple[str, ...] = KINDS) -> list[SweepJob]:
        """The sweep's jobs of these kinds with their states (one batched scheduler query)."""
        subs = [s for s in self.submissions() if s["kind"] in kinds]
        handles = [
            JobHandle.model_validate({k: v for k, v in s.items() if k not in {"kind", "slots"}})
            for s in subs
        ]
        statuses = job_statuses(handles) if handles else {}
        return [
            SweepJob(s["kind"], s["slots"], h, statuses.get(h.job_id, {}))
            for s, h in zip(subs, handles, strict=True)
        ]

    def missing_slots(self) -> list[int]:
        done = {s.slot for s in self.paths.all_slots() if s.state in FINISHED_SLOT}
        return [i for i in range(self.spec.trials) if i not in done]

    def has_result(self) -> bool:
        return (self.paths.final / "result.json").is_file()

    # -- submission -------------------------------------------------------------------------------
    def _job(self, **fields: Any) -> Job:
        r = self.spec.resources
        base = {k: v for k, v in r.model_dump().items() if v is not None}
        return Job(**{**base, "name": f"sweep-{self.spec.name}", **fields})

    def submit(self, slots: list[int]) -> list[JobHandle]:
        """One round: the array for ``slots``, the final job and the follow-up job."""
        from hpcdl.hpo.trial import array_task_main

        root = str(self.paths.root)
        if not get_scheduler(self.site).queued:  # no queue: worker processes claim the slots
            workers = min(self.spec.parallelism, len(slots))
            handle = self._job(function=local_worker_main, args=(root,), array=workers).submit(
                self.site
            )
            self._record("workers", handle, slots)
            return [handle]
        array = self._job(
            function=array_task_main,
            args=(root, slots),
            array=len(slots),
            throttle=min(self.spec.parallelism, len(slots)),
            requeue=True,
        ).submit(self.site)
        self._record("array", array, slots)
        handles = [array]
        if self.spec.final:  # afterany: it starts whatever happens to the tasks, then checks
            handles.append(self.submit_final(after=array.job_id))
        follow = Job(
            site=self.site.name,
            name=f"sweep-{self.spec.name}-follow",
            function=follow_up_main,
            args=(root,),
            time="00:10:00",
            dependencies=[f"afterany:{array.job_id}"],
            # where the sweep's jobs may run (a partition may require a constraint), and the code
            # later rounds run (the sweep's snapshot)
            **self.spec.resources.model_dump(include=FOLLOW_UP_FIELDS, exclude_none=True),
        ).submit(self.site)
        self._record("follow", follow, [])
        return [*handles, follow]

    def submit_final(self, after: str | None = None) -> JobHandle:
        final = self._job(
            name=f"sweep-{self.spec.name}-final",
            function=final_main,
            args=(str(self.paths.root),),
            dependencies=[f"afterany:{after}"] if after else [],
        ).submit(self.site)
        self._record("final", final, [])
        return final

    # -- decisions --------------------------------------------------------------------------------
    def resume(self) -> tuple[str, list[JobHandle]]:
        """Submit the missing slots (a new round), else a final job if none will run."""
        jobs = self.jobs()
        active = [j.handle.job_id for j in jobs if j.kind in ("array", "workers") and j.live]
        if active:
            raise HpcdlError(
                f"sweep {self.spec.name!r} still has jobs queued or running ({', '.join(active)}); "
                f"wait, or 'hpcdl sweep cancel {self.spec.name}' first"
            )
        self.cancel_wedged(jobs)
        missing = self.missing_slots()
        if not missing:
            handle = self.ensure_final(jobs)
            if handle is None:
                raise HpcdlError(self._nothing_to_resume(jobs))
            return f"submitted the final job {handle.job_id}", [handle]
        with self.paths.lock():
            for slot in self.paths.all_slots():
                if slot.slot in missing and slot.state == "running":
                    self.paths.write_slot(slot.model_copy(update={"state": "retry"}))
        # A final job still queued would start after its (old) array and race the new round.
        _cancel([j.handle for j in jobs if j.kind == "final" and j.state != "RUNNING" and
                 j.state not in FINISHED and not j.never_starts])  # fmt: skip
        handles = self.submit(missing)
        return f"resubmitted {len(missing)} trial(s)", handles

    def _nothing_to_resume(self, jobs: list[SweepJob]) -> str:
        if not self.spec.final or self.has_result():
            return f"sweep {self.spec.name!r} has finished: no missing trials, nothing to resume"
        live = [j.handle.job_id for j in jobs if j.kind in ("final", "workers") and j.live]
        which = live[0] if live else "?"
        return f"sweep {self.spec.name!r} has no missing trials; its final job {which} is queued or running"

    def ensure_final(self, jobs: list[SweepJob]) -> JobHandle | None:
        """With every slot finished: submit a final job unless one is live or the result is
        there. ``None`` when nothing was needed."""
        if not self.spec.final or self.has_result() or self.missing_slots():
            return None
        if any(j.live for j in jobs if j.kind in ("final", "workers")):
            return None
        return self.submit_final()  # the callers have cancelled the wedged ones already

    def cancel_wedged(self, jobs: list[SweepJob]) -> list[str]:
        """Cancel the sweep's jobs that Slurm will never start (e.g. a final job ``afterok`` on
        an array with a failed task, as sweeps made before ``afterany`` have)."""
        wedged = [j.handle for j in jobs if j.never_starts]
        _cancel(wedged)
        return [h.job_id for h in wedged]

    def cancelled_before_start(self, jobs: list[SweepJob]) -> list[int]:
        """Slots of the last round whose task was cancelled before it claimed its slot: someone
        stopped the sweep (``scancel`` of the array, ``hpcdl sweep cancel``); no fault to heal."""
        arrays = [j for j in jobs if j.kind == "array"]
        if not arrays:
            return []
        last, out = arrays[-1], []
        for i, slot_no in enumerate(last.slots):
            task = f"{last.handle.job_id}_{i}"
            status = last.tasks.get(task)
            slot = self.paths.read_slot(slot_no)
            claimed = slot is not None and slot.job == task
            if status is not None and status.state == "CANCELLED" and not claimed:
                out.append(slot_no)
        return out

    def diagnose(self, jobs: list[SweepJob]) -> list[str]:
        """What, if anything, keeps the sweep from finishing, and what to do about it."""
        name, out = self.spec.name, []
        for j in jobs:
            if j.never_starts:
                out.append(f"{j.kind} job {j.handle.job_id} can never start "
                           f"({', '.join(j.reasons)}): 'hpcdl sweep resume {name}' replaces it")  # fmt: skip
        missing = self.missing_slots()
        runners = [j for j in jobs if j.kind in ("array", "workers", "follow") and j.live]
        if missing and not runners:
            shown = ", ".join(map(str, missing[:10])) + (
                f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            )
            out.append(f"{len(missing)} trial(s) not finished (slots {shown}) and no job of the "
                       f"sweep will run them: 'hpcdl sweep resume {name}'")  # fmt: skip
        finals = [j for j in jobs if j.kind in ("final", "workers")]
        stalled = not missing and self.spec.final and not self.has_result()
        if stalled and not any(j.live for j in finals):
            last = finals[-1] if finals else None
            what = f"final job {last.handle.job_id} {last.state}" if last else "no final job"
            out.append(f"every trial finished but there is no final result ({what}): "
                       f"'hpcdl sweep resume {name}' submits a final job")  # fmt: skip
        return out

    def events(self, last: int = 5) -> list[dict[str, Any]]:
        if not self.paths.events.is_file():
            return []
        lines = self.paths.events.read_text().splitlines()[-last:]
        return [json.loads(line) for line in lines if line]


def _cancel(handles: list[JobHandle]) -> None:
    """Cancel, tolerating jobs that ended meanwhile (scancel refuses those)."""
    try:
        cancel_jobs(handles)
    except HpcdlError as exc:
        log.warning("%s", exc)


# -- job entry points ------------------------------------------------------------------------------
def final_main(sweep_dir: str) -> dict[str, Any]:
    """Retrain the best parameters on train+val and evaluate once on the held-out test split;
    exit cleanly, saying why, when a slot is not finished or the result is there already."""
    from hpcdl.hpo.trial import resolve_objective

    paths = SweepPaths(Path(sweep_dir))
    spec = paths.load_spec()
    missing = [i for i in range(spec.trials) if not _finished(paths, i)]
    if missing:
        why = (f"not run: {len(missing)} trial(s) not finished (slots {missing[:10]}); the "
               "follow-up job or 'hpcdl sweep resume' runs them, then a new final job")  # fmt: skip
        log_event(paths, "final", why)
        return {"skipped": why}
    if (paths.final / "result.json").is_file():
        return {"skipped": "the final result is there already"}
    study = open_study(spec, paths.root)
    try:
        best = study.best_trial
    except ValueError:
        log_event(paths, "final", "not run: no trial completed")
        return {"skipped": "no trial completed"}
    paths.final.mkdir(exist_ok=True)
    try:
        scores = resolve_objective(spec).final(dict(best.params), spec, paths.final)
    except TrialRequeued as exc:  # checkpointed on a preemption signal: the requeued job goes on
        return {"requeued": str(exc)}
    result = {"trial": best.number, spec.metric: best.value, "params": best.params, **scores}
    atomic_write_json(paths.final / "result.json", result)
    log_event(paths, "final", f"retrained trial {best.number}: result written")
    return result


def _finished(paths: SweepPaths, slot: int) -> bool:
    s = paths.read_slot(slot)
    return s is not None and s.state in FINISHED_SLOT


def follow_up_main(sweep_dir: str) -> str:
    """After a round's array: resubmit the missing slots (retries permitting), or make sure a
    final job will run; say what it decided in ``events.jsonl``."""
    from hpcdl.site import load_site

    paths = SweepPaths(Path(sweep_dir))
    spec = paths.load_spec()
    life = Lifecycle(spec, paths, load_site(spec.resources.site))
    text = _follow_up(life)
    log_event(paths, "follow-up", text)
    return text


def _follow_up(life: Lifecycle) -> str:
    jobs = life.jobs()
    wedged = life.cancel_wedged(jobs)
    text = _follow_up_decision(life, jobs)
    if wedged:
        text += f" (cancelled {', '.join(wedged)}: it could never start)"
    return text


def _follow_up_decision(life: Lifecycle, jobs: list[SweepJob]) -> str:
    missing = life.missing_slots()
    name = life.spec.name
    if missing:
        stopped = life.cancelled_before_start(jobs)
        if stopped:
            return (f"{len(missing)} trial(s) missing, but {len(stopped)} task(s) were cancelled "
                    f"before they started (the sweep was stopped): 'hpcdl sweep resume {name}' "
                    "continues it")  # fmt: skip
        rounds = sum(1 for j in jobs if j.kind == "array")
        if rounds > life.spec.max_retries:
            return (f"{len(missing)} trial(s) missing after {rounds} rounds; giving up: "
                    f"'hpcdl sweep resume {name}' tries again")  # fmt: skip
        text, handles = life.resume()
        return f"{text}: " + ", ".join(h.job_id for h in handles)
    handle = life.ensure_final(jobs)
    if handle is not None:
        return f"every trial finished and no final job would run: submitted {handle.job_id}"
    return "every trial finished"


def local_worker_main(sweep_dir: str) -> str:
    """One local worker process: claim free slots until none are left; the last worker to
    finish runs the final retraining."""
    from hpcdl.hpo.trial import claim, run_trial

    paths = SweepPaths(Path(sweep_dir))
    spec = paths.load_spec()
    study = open_study(spec, paths.root, worker=int(os.environ.get("HPCDL_ARRAY_TASK_ID", "0")))
    done = 0
    while (slot := claim(paths, spec, study, None)) is not None:
        run_trial(paths, spec, study, slot)
        done += 1
    with paths.lock():
        finished = all(_finished(paths, i) for i in range(spec.trials))
        marker = paths.root / ".final-started"
        run_final = spec.final and finished and not marker.exists()
        if run_final:
            marker.touch()
    if run_final:
        final_main(sweep_dir)
    return f"ran {done} trial(s)" + (" and the final retraining" if run_final else "")
