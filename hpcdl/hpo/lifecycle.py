"""A sweep's jobs and the rules that keep them from wedging.

On Slurm a sweep round is three jobs: the array (by default ``parallelism`` warm workers that
claim the round's slots until none is left, :mod:`hpcdl.hpo.worker`; with ``trials_per_task: 1``
task i runs slot i), a final job and a small follow-up job, both ``afterany`` on the array, so
whatever happens to the array's tasks (cancelled, failed, timed out, node failure) both of them
start once it ends:

- the **final job** retrains the best parameters only when every slot is finished; otherwise it
  exits cleanly and says why (in the job log and the sweep's ``events.jsonl``);
- the **follow-up job** resubmits the slots still missing (a new round: array, final, follow-up),
  unless the user stopped the sweep (``scancel`` of the whole array, tasks cancelled before they
  started, ``hpcdl sweep cancel``) or the rounds are used up; with nothing missing it makes
  sure a final job will run, replacing one that can never start.

``hpcdl sweep resume`` does the same on demand, so a sweep either finishes by itself or its
status says what is stuck and one ``resume`` brings it to completion. No job that can never run
is left in the queue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcdl.errors import HpcdlError
from hpcdl.hpo.decide import Round, RoundKind, follow_up, needs_final, stopped_slots
from hpcdl.hpo.final import final_main, log_event
from hpcdl.hpo.folder import SweepPaths, read_round
from hpcdl.hpo.spec import SweepSpec
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
from hpcdl.scheduler.accounting import tasks_that_ran
from hpcdl.scheduler.holds import held_after_failed_launch
from hpcdl.site import SiteProfile
from hpcdl.util import append_jsonl, atomic_write_text, get_logger, read_jsonl

log = get_logger(__name__)
# Pending reasons after which Slurm will never start the job.
NEVER_STARTS = frozenset({"DependencyNeverSatisfied", "InvalidDependency"})
KINDS = ("array", "workers", "final", "follow")
GAVE_UP = "giving up"  # how the follow-up job's decision to stop retrying starts


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
    def held(self) -> list[str]:
        """Its tasks that Slurm holds after a failed launch (released by ``sweep resume``)."""
        return [t for t, s in self.tasks.items()
                if s.state == "PENDING" and held_after_failed_launch(s.reason)]  # fmt: skip

    @property
    def live(self) -> bool:
        """Running, or queued and able to start (a task held after a failed launch is not)."""
        rest = [t for t, s in self.tasks.items() if s.state not in FINISHED]
        only_held = bool(rest) and set(rest) <= set(self.held)
        return self.state not in FINISHED and not self.never_starts and not only_held


class Lifecycle:
    """Submits a sweep's rounds and decides what happens when one ends."""

    def __init__(self, spec: SweepSpec, paths: SweepPaths, site: SiteProfile):
        self.spec, self.paths, self.site = spec, paths, site
        self.queued = get_scheduler(site).queued
        # Jobs that run the final retraining: local workers do it themselves when they finish.
        self.final_kinds = ("final",) if self.queued else ("final", "workers")

    # -- records ----------------------------------------------------------------------------------
    def submissions(self) -> list[dict[str, Any]]:
        return read_jsonl(self.paths.submissions)

    def _record(self, kind: str, handle: JobHandle, slots: list[int]) -> None:
        append_jsonl(self.paths.submissions, {"kind": kind, "slots": slots, **handle.model_dump()})

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
        return self.paths.missing_slots(range(self.spec.trials))

    def has_result(self) -> bool:
        return self.paths.has_final_result()

    # -- submission -------------------------------------------------------------------------------
    def _job(self, **fields: Any) -> Job:
        r = self.spec.resources
        base = {k: v for k, v in r.model_dump().items() if v is not None}
        return Job(**{**base, "name": f"sweep-{self.spec.name}", **fields})

    def round_jobs(self, slots: list[int], after: str = "1") -> dict[str, Job]:
        """The jobs of one round for ``slots`` by kind (array or workers, final, follow), the
        final and follow-up jobs ``afterany`` on job ``after``."""
        from hpcdl.hpo.worker import array_task_main, local_worker_main, worker_task_main

        root, workers = str(self.paths.root), min(self.spec.parallelism, len(slots))
        if not self.queued:  # no queue: worker processes claim the slots, the last runs the final
            return {"workers": self._job(function=local_worker_main, args=(root,), array=workers)}
        jobs: dict[str, Job] = {}
        if self.spec.trials_per_task == 1:
            jobs["array"] = self._job(function=array_task_main, args=(root, slots),
                                      array=len(slots), throttle=workers, requeue=True)  # fmt: skip
        else:  # warm workers: each claims the round's slots until none is left
            # the round's packing goes with it: a task requeued after a later 'sweep resume'
            # changed the spec still runs the lanes its claims (TASK+LANE) name
            pack = (self.spec.lanes, self.spec.resources.gpus_per_node)
            jobs["workers"] = self._job(function=worker_task_main, args=(root, slots, pack),
                                        array=workers, requeue=True)  # fmt: skip
        if self.spec.final:  # afterany: it starts whatever happens to the tasks, then checks
            jobs["final"] = self._final_job(after)
        jobs["follow"] = Job(
            site=self.site.name,
            name=f"sweep-{self.spec.name}-follow",
            function=follow_up_main,
            args=(root,),
            time="00:10:00",
            dependencies=[f"afterany:{after}"],
            # where the sweep's jobs may run (a partition may require a constraint), and the code
            # later rounds run (the sweep's snapshot)
            **self.spec.resources.model_dump(include=FOLLOW_UP_FIELDS, exclude_none=True),
        )
        return jobs

    def check_round(self, slots: list[int], where: str) -> None:
        """Raise ``ConfigError`` if the site would refuse any job of a round (partition, its
        policy, time limit ...): callers check before they write or queue anything."""
        for job in self.round_jobs(slots).values():
            job.check(self.site, where)

    def submit(self, slots: list[int], where: str = "sweep") -> list[JobHandle]:
        """One round: the array for ``slots`` (warm workers, or one task per slot), the final job
        and the follow-up job; every one checked against the site before the first is queued."""
        self.check_round(slots, where)
        # A new round draws with new sampler seeds (hpcdl.hpo.study.open_study).
        atomic_write_text(self.paths.round, f"{read_round(self.paths.root) + 1}\n")
        jobs = self.round_jobs(slots)
        kind = next(iter(jobs))  # array or workers
        array = jobs[kind].submit(self.site)
        self._record(kind, array, slots)
        if not self.queued:
            return [array]
        handles = [array]
        if self.spec.final:
            handles.append(self.submit_final(after=array.job_id))
        follow = self.round_jobs(slots, after=array.job_id)["follow"].submit(self.site)
        self._record("follow", follow, [])
        return [*handles, follow]

    def _final_job(self, after: str | None) -> Job:
        from hpcdl.hpo.alerts import mail_fields

        return self._job(
            **mail_fields(self.site),  # Slurm's END/FAIL mail where the site sends mail
            name=f"sweep-{self.spec.name}-final",
            function=final_main,
            args=(str(self.paths.root),),
            dependencies=[f"afterany:{after}"] if after else [],
        )

    def submit_final(self, after: str | None = None) -> JobHandle:
        final = self._final_job(after).submit(self.site)
        self._record("final", final, [])
        return final

    # -- decisions --------------------------------------------------------------------------------
    def refuse_active(self, jobs: list[SweepJob]) -> None:
        active = [j.handle.job_id for j in jobs if j.kind in ("array", "workers") and j.live]
        if active:
            raise HpcdlError(
                f"sweep {self.spec.name!r} still has jobs queued or running ({', '.join(active)}); "
                f"wait, or 'hpcdl sweep cancel {self.spec.name}' first"
            )

    def resume(self, where: str = "sweep") -> tuple[str, list[JobHandle]]:
        """Submit the missing slots (a new round), else a final job if none will run."""
        jobs = self.jobs()
        held = self.release_held(jobs)
        if held:  # the round goes on with them: nothing else to submit
            return (
                f"released {len(held)} task(s) Slurm held after a failed launch: {', '.join(held)}",
                [],
            )
        self.refuse_active(jobs)
        self.cancel_wedged(jobs)
        missing = self.missing_slots()
        if not missing:
            handle = self.ensure_final(jobs)
            if handle is None:
                raise HpcdlError(self.nothing_to_resume(jobs))
            return f"submitted the final job {handle.job_id}", [handle]
        self.check_round(missing, where)  # before any slot or job changes
        with self.paths.lock():
            for slot in self.paths.all_slots():
                if slot.slot in missing and slot.state == "running":
                    self.paths.write_slot(slot.model_copy(update={"state": "retry"}))
        # A final job still queued would start after its (old) array and race the new round.
        _cancel([j.handle for j in jobs if j.kind == "final" and j.state != "RUNNING" and
                 j.state not in FINISHED and not j.never_starts])  # fmt: skip
        handles = self.submit(missing, where)
        return f"resubmitted {len(missing)} trial(s)", handles

    def release_held(self, jobs: list[SweepJob]) -> list[str]:
        """Release the round's tasks that Slurm holds after a failed launch (their hold never
        ends by itself, and the follow-up job waits for them)."""
        ids = [j.handle.job_id for j in jobs if j.kind in ("array", "workers") and j.held]
        return get_scheduler(self.site).release_failed_launches(ids) if ids else []

    def nothing_to_resume(self, jobs: list[SweepJob]) -> str:
        if not self.spec.final or self.has_result():
            return f"sweep {self.spec.name!r} has finished: no missing trials, nothing to resume"
        live = [j.handle.job_id for j in jobs if j.kind in self.final_kinds and j.live]
        which = live[0] if live else "?"
        return f"sweep {self.spec.name!r} has no missing trials; its final job {which} is queued or running"

    def ensure_final(self, jobs: list[SweepJob]) -> JobHandle | None:
        """With every slot finished: submit a final job unless one is live or the result is
        there. ``None`` when nothing was needed."""
        live = any(j.live for j in jobs if j.kind in self.final_kinds)
        if not needs_final(self.spec.final, self.has_result(), bool(self.missing_slots()), live):
            return None
        return self.submit_final()  # the callers have cancelled the wedged ones already

    def cancel_wedged(self, jobs: list[SweepJob]) -> list[str]:
        """Cancel the sweep's jobs that Slurm will never start (e.g. a final job ``afterok`` on
        an array with a failed task, as sweeps made before ``afterany`` have)."""
        wedged = [j.handle for j in jobs if j.never_starts]
        _cancel(wedged)
        return [h.job_id for h in wedged]

    def cancelled_before_start(self, jobs: list[SweepJob]) -> list[int]:
        """Slots of the last round that someone stopped (``scancel`` of the array, ``hpcdl sweep
        cancel``): no fault to heal (the rule: :func:`hpcdl.hpo.decide.stopped_slots`)."""
        from hpcdl.hpo.worker import started

        rounds = [j for j in jobs if j.kind in ("array", "workers")]
        if not rounds:
            return []
        last = rounds[-1]
        tasks = {t: s.state for t, s in last.tasks.items()}
        if "CANCELLED" not in tasks.values():
            return []
        # A task cancelled while it was starting (imports, process group) ran: a fault to heal.
        # Asked of sacct only when a task was cancelled: nothing else here needs it.
        ran = tasks_that_ran([last.handle.job_id])
        claims = {s.slot: s.job for s in self.paths.all_slots() if s.slot in last.slots}
        kind: RoundKind = "workers" if last.kind == "workers" else "array"
        began = {t for t, s in tasks.items()
                 if s == "CANCELLED" and kind == "workers" and started(self.paths, t)}  # fmt: skip
        view = Round(kind, last.handle.job_id, tuple(last.slots), tasks)
        return stopped_slots(view, self.missing_slots(), claims, ran, began)

    def diagnose(self, jobs: list[SweepJob]) -> list[str]:
        """What, if anything, keeps the sweep from finishing, and what to do about it."""
        name, out = self.spec.name, []
        for j in jobs:
            if j.never_starts:
                out.append(f"{j.kind} job {j.handle.job_id} can never start "
                           f"({', '.join(j.reasons)}): 'hpcdl sweep resume {name}' replaces it")  # fmt: skip
        for j in jobs:
            if j.held:
                out.append(f"{j.kind} task(s) {', '.join(j.held)} held by Slurm after a failed "
                           f"launch (a node fault): 'hpcdl sweep resume {name}' releases them")  # fmt: skip
        missing = self.missing_slots()
        runners = [j for j in jobs if j.kind in ("array", "workers", "follow") and j.live]
        if missing and not runners:
            shown = ", ".join(map(str, missing[:10])) + (
                f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            )
            out.append(f"{len(missing)} trial(s) not finished (slots {shown}) and no job of the "
                       f"sweep will run them: 'hpcdl sweep resume {name}'")  # fmt: skip
        finals = [j for j in jobs if j.kind in self.final_kinds]
        stalled = not missing and self.spec.final and not self.has_result()
        if stalled and not any(j.live for j in finals):
            last = finals[-1] if finals else None
            what = f"final job {last.handle.job_id} {last.state}" if last else "no final job"
            out.append(f"every trial finished but there is no final result ({what}): "
                       f"'hpcdl sweep resume {name}' submits a final job")  # fmt: skip
        return out

    def events(self, last: int = 5) -> list[dict[str, Any]]:
        return read_jsonl(self.paths.events)[-last:]


def _cancel(handles: list[JobHandle]) -> None:
    """Cancel, tolerating jobs that ended meanwhile (scancel refuses those)."""
    try:
        cancel_jobs(handles)
    except HpcdlError as exc:
        log.warning("%s", exc)


# -- job entry points ------------------------------------------------------------------------------
def follow_up_main(sweep_dir: str) -> str:
    """After a round's array: resubmit the missing slots (retries permitting), or make sure a
    final job will run; say what it decided in ``events.jsonl``."""
    from hpcdl.site import load_site

    paths = SweepPaths(Path(sweep_dir))
    spec = paths.load_spec()
    life = Lifecycle(spec, paths, load_site(spec.resources.site))
    text = _follow_up(life)
    log_event(paths, "follow-up", text)
    from hpcdl.hpo.alerts import send_from_job

    if text.startswith(GAVE_UP):  # the sweep's own end: the watcher would only see it stuck
        send_from_job("failed", paths, text)
    elif paths.finished(spec):  # no final model asked for: this job is the sweep's last
        send_from_job("finished", paths, f"sweep {spec.name} finished: {text}")
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
    stopped = life.cancelled_before_start(jobs) if missing else []
    rounds = sum(1 for j in jobs if j.kind in ("array", "workers"))
    action = follow_up(missing, stopped, rounds, life.spec.max_retries)
    if action == "stopped":
        return (f"{len(missing)} trial(s) missing, but the sweep was stopped (tasks cancelled "
                f"before they ran {len(stopped)} of them): 'hpcdl sweep resume {name}' "
                "continues it")  # fmt: skip
    if action == "give_up":
        return (f"{GAVE_UP}: {len(missing)} trial(s) missing after {rounds} rounds: "
                f"'hpcdl sweep resume {name}' tries again")  # fmt: skip
    if action == "resume":
        text, handles = life.resume()
        return f"{text}: " + ", ".join(h.job_id for h in handles)
    handle = life.ensure_final(jobs)
    if handle is not None:
        return f"every trial finished and no final job would run: submitted {handle.job_id}"
    return "every trial finished"
