"""The scheduler seam: one small interface (:class:`Scheduler`) with a Slurm and a local back end,
and :class:`JobHandle`, what a submission returns.

A handle records which back end queued it (``scheduler``), so any process can follow the job
later without loading the site profile again. Back ends register themselves by ``name``
(:meth:`Scheduler.__init_subclass__`); nothing outside this package compares scheduler names.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from hpcdl.errors import HpcdlError
from hpcdl.scheduler.arrays import ArrayPart
from hpcdl.scheduler.live import LivePartition
from hpcdl.scheduler.live import check_site as compare_with_live
from hpcdl.scheduler.states import FINISHED, summarize
from hpcdl.site import SiteProfile

_BACKENDS: dict[str, type[Scheduler]] = {}


@dataclass(frozen=True)
class TaskStatus:
    """One task's state and, while it is ``PENDING``, the scheduler's reason (``Priority``,
    ``Resources``, ``Dependency``, ...; empty when there is none)."""

    state: str
    reason: str = ""


class Request(Protocol):
    """What a back end reads of a job request (``hpcdl.job.Job`` is one). A request is passive:
    each back end maps these fields to its scheduler itself (``_sbatch``, ``local``)."""

    name: str
    nodes: int  # the largest count of an elastic job (nodes: MIN-MAX)
    min_nodes: int | None  # its smallest (None: exactly ``nodes``)
    partition: str | None
    time: str
    mem: str | None
    cpus_per_task: int
    gpus_per_node: int
    account: str | None
    qos: str | None
    dependencies: list[str]
    array: int | None
    throttle: int | None
    requeue: bool
    launcher: str
    command: list[str] | None
    setup: list[str]

    @property
    def node_range(self) -> str: ...

    @property
    def ntasks_per_node(self) -> int: ...

    @property
    def launched_tasks_per_node(self) -> int: ...

    @property
    def gpus_per_task_count(self) -> int: ...

    def sbatch_options(self) -> dict[str, Any]: ...

    def image(self, site: SiteProfile) -> str | None: ...

    def interpreter(self, site: SiteProfile) -> str: ...

    def task(self, site: SiteProfile, array_task_id: int | None = None) -> Any: ...

    def staged(self, site: SiteProfile, folder: Path, copy: bool = True) -> Request: ...


class JobHandle(BaseModel):
    """What a submission returns at once: enough to follow the job from any process."""

    job_id: str
    name: str
    site: str
    scheduler: str
    folder: str
    script: str | None = None
    array: int | None = None
    tasks: int = 1  # an elastic job's (nodes MIN-MAX): at MAX (hpcdl.scheduler.started)
    # set for an elastic job only: its tasks are NNodes x this, known once Slurm starts it
    tasks_per_node: int | None = None
    submitted_at: float
    local_ids: list[str] = []
    # An array split over several Slurm arrays (site max_array_size): every part, the first
    # (``job_id``) included; empty for a job that is one Slurm job or array.
    parts: list[ArrayPart] = []

    @property
    def backend(self) -> Scheduler:
        """The back end that queued this job (no site profile needed to follow it)."""
        return backend_for(self.scheduler)

    def statuses(self) -> dict[str, TaskStatus]:
        """``{job or array-task id: TaskStatus}`` from one scheduler query."""
        return self.backend.statuses([self])[self.job_id]

    def states(self) -> dict[str, str]:
        """``{job or array-task id: normalised state}``."""
        return {tid: s.state for tid, s in self.statuses().items()}

    def state(self) -> str:
        """One state for the whole job (for arrays: the least finished task's)."""
        return summarize(self.states())

    def wait(self, timeout: float, poll: float = 1.0) -> str:
        """Block until finished (only when asked); on timeout raise with the job's log tail."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state in FINISHED:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {self.job_id} still {state} after {timeout:.0f}s\n{log_tail(self)}"
                )
            time.sleep(poll)

    def cancel(self, array_task: int | None = None) -> None:
        """Cancel the job, or one task of an array."""
        self.backend.cancel([self], array_task)

    def log_paths(self, task: int = 0, array_task: int | None = None) -> tuple[Path, Path]:
        """(stdout, stderr) files of one task."""
        return self.backend.log_paths(self, task, array_task)


class Scheduler(ABC):
    """One batch system. ``site`` is needed to check, render and submit requests; following,
    cancelling or throttling existing jobs works from the handle alone."""

    name: ClassVar[str]
    #: Jobs wait in a queue that supports dependencies, array throttles and requeue (Slurm);
    #: otherwise they start at once as processes here (local).
    queued: ClassVar[bool]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _BACKENDS[cls.name] = cls

    def __init__(self, site: SiteProfile | None = None) -> None:
        self._site = site

    @property
    def site(self) -> SiteProfile:
        if self._site is None:
            raise HpcdlError(f"the {self.name} back end needs a site profile for this")
        return self._site

    # -- requests --------------------------------------------------------------------------------
    @abstractmethod
    def check(self, request: Request, where: str) -> None:
        """Raise ConfigError when this back end cannot run the request on the site."""

    @abstractmethod
    def render(self, request: Request, folder: Path | None = None) -> str:
        """The batch script the request becomes (nothing is queued)."""

    @abstractmethod
    def submit(self, request: Request, test_only: bool = False) -> JobHandle:
        """Queue the (checked) request, record it in the registry, return at once."""

    def test_only(self, request: Request) -> str:
        """Ask the scheduler whether and when it would start the request, queueing nothing;
        its answer (Slurm: ``sbatch --test-only``)."""
        raise HpcdlError("--test-only needs a Slurm site")

    # -- existing jobs ---------------------------------------------------------------------------
    @abstractmethod
    def statuses(self, handles: list[JobHandle]) -> dict[str, dict[str, TaskStatus]]:
        """``{job_id: {task id: TaskStatus}}`` for all ``handles`` in one batched query."""

    def states(self, handles: list[JobHandle]) -> dict[str, dict[str, str]]:
        """``{job_id: {task id: state}}`` (:meth:`statuses` without the reasons)."""
        return {
            jid: {tid: s.state for tid, s in tasks.items()}
            for jid, tasks in self.statuses(handles).items()
        }

    @abstractmethod
    def cancel(self, handles: list[JobHandle], array_task: int | None = None) -> None:
        """Cancel every job in ``handles`` at once (or array task ``array_task`` of each)."""

    @abstractmethod
    def log_paths(
        self, handle: JobHandle, task: int = 0, array_task: int | None = None
    ) -> tuple[Path, Path]:
        """(stdout, stderr) files of one task of a job."""

    def requeue(self, target: str) -> None:
        """Put a running job (``ID`` or ``ARRAYID_TASK``) back in the queue."""
        raise HpcdlError(f"the {self.name} scheduler cannot requeue job {target}")

    def cancel_pending(self, job_id: str) -> None:
        """Cancel the tasks of array ``job_id`` that are waiting in the queue (running ones go
        on); nothing to do where jobs do not wait in a queue."""
        return None

    def release_failed_launches(self, job_ids: list[str]) -> list[str]:
        """Release the tasks of these jobs that the scheduler holds after a failed launch
        (:mod:`hpcdl.scheduler.holds`); returns their ids. None where nothing is held."""
        return []

    def throttle(self, handle: JobHandle, parallelism: int) -> None:
        """Change how many tasks of a live array run at once."""
        raise HpcdlError(f"the {self.name} scheduler cannot throttle job {handle.job_id}")

    # -- the live cluster ------------------------------------------------------------------------
    def live_partitions(self) -> dict[str, LivePartition]:
        """What the running scheduler says about its partitions (none without one)."""
        return {}

    def check_site(self) -> list[str]:
        """Every disagreement between the site profile and the live cluster."""
        return compare_with_live(self.site, self.live_partitions())


def backend_for(name: str, site: SiteProfile | None = None) -> Scheduler:
    """The back end registered as ``name`` (``slurm`` or ``local``)."""
    try:
        return _BACKENDS[name](site)
    except KeyError:
        raise HpcdlError(
            f"unknown scheduler {name!r} (known: {', '.join(sorted(_BACKENDS))})"
        ) from None


def get_scheduler(site: SiteProfile) -> Scheduler:
    """The back end the site profile names, bound to that site."""
    return backend_for(site.scheduler, site)


def _grouped(handles: Iterable[JobHandle]) -> dict[str, list[JobHandle]]:
    groups: dict[str, list[JobHandle]] = {}
    for h in handles:
        groups.setdefault(h.scheduler, []).append(h)
    return groups


def job_statuses(handles: list[JobHandle]) -> dict[str, dict[str, TaskStatus]]:
    """``{job_id: {task id: TaskStatus}}``: one batched query per back end (one sacct for every
    Slurm job, whatever its site)."""
    out: dict[str, dict[str, TaskStatus]] = {}
    for kind, group in _grouped(handles).items():
        out.update(backend_for(kind).statuses(group))
    return out


def job_states(handles: list[JobHandle]) -> dict[str, dict[str, str]]:
    """``{job_id: {task id: state}}`` (:func:`job_statuses` without the reasons)."""
    return {
        jid: {tid: s.state for tid, s in tasks.items()}
        for jid, tasks in job_statuses(handles).items()
    }


def cancel_jobs(handles: list[JobHandle]) -> None:
    """Cancel many jobs with one call per back end (one ``scancel`` for every Slurm job)."""
    for kind, group in _grouped(handles).items():
        backend_for(kind).cancel(group)


def log_tail(handle: JobHandle, lines: int = 30) -> str:
    """The last lines of task 0's stdout and stderr, for error messages."""
    parts = []
    for path in handle.log_paths():
        if path.is_file():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path}\n" + "\n".join(text))
        else:
            parts.append(f"--- {path} (not written)")
    return "\n".join(parts)
