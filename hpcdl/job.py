"""The job abstraction: a request, checked against a site profile, rendered and submitted by submitit."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from hpcdl import containers
from hpcdl.config import (
    NODE_RANGE_HELP,
    JobTime,
    Memory,
    parse_node_range,
    parse_time,
    validation_error,
)
from hpcdl.errors import ConfigError
from hpcdl.scheduler import JobHandle, get_scheduler, setup_lines
from hpcdl.scheduler.checkpointable import preempt_checkpoint
from hpcdl.script_values import OneLine, SetupLine, SlurmName
from hpcdl.site import SiteProfile, load_site
from hpcdl.slurm_options import SbatchOptions
from hpcdl.snapshot import Snapshot, stage
from hpcdl.snapshot import check as check_snapshot
from hpcdl.task_runner import LAUNCHERS, Task, torchrun_argv

__all__ = ["Job", "JobHandle", "Resources"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_DEPENDENCY = re.compile(
    r"^(?:(?P<kind>after|afterok|afterany|afternotok|aftercorr):)?(?P<id>\d+(?:_\d+)?)\Z"
)
SUBMIT_PYTHON = sys.executable  # the interpreter that unpickles tasks (outside containers)


class Resources(SbatchOptions):
    """What a job asks of the scheduler; shared by ``Job``, training configs and sweep specs
    (the extra sbatch options, ``constraint`` ... ``sbatch``, come from ``SbatchOptions``)."""

    model_config = ConfigDict(extra="forbid")

    site: str | None = None
    partition: SlurmName | None = None
    # ``nodes: MIN-MAX`` (elastic start) is read into nodes (MAX) and min_nodes (MIN): every
    # reader of ``nodes`` (limits, budgets, tasks) keeps seeing an int, the largest request.
    nodes: int = Field(default=1, ge=1)
    min_nodes: int | None = Field(default=None, ge=1, exclude=True)
    tasks_per_node: int | None = Field(default=None, ge=1)
    gpus_per_node: int = Field(default=0, ge=0)
    cpus_per_task: int = Field(default=1, ge=1)
    mem: Memory | None = None
    time: JobTime = "01:00:00"
    account: SlurmName | None = None
    qos: SlurmName | None = None
    snapshot: Snapshot | None = None  # the code tasks run (git, rsync, none); None: the site's

    @model_validator(mode="before")
    @classmethod
    def _node_range(cls, data: Any) -> Any:
        if isinstance(data, dict) and (span := parse_node_range(data.get("nodes"))):
            low, high = span  # a malformed range is left to the nodes field's error
            data = {**data, "nodes": high, "min_nodes": None if low == high else low}
        return data

    @field_validator("nodes", mode="before")
    @classmethod
    def _nodes(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip().isdigit():
            raise ValueError(f"must be {NODE_RANGE_HELP}")
        return v

    @model_validator(mode="after")
    def _elastic(self) -> Resources:
        if self.min_nodes is not None and self.min_nodes > self.nodes:
            raise ValueError(f"nodes: MIN {self.min_nodes} exceeds MAX {self.nodes}")
        # both finite (JobTime): parse_time gives minutes
        if self.time_min is not None and (parse_time(self.time_min) or 0) > (
            parse_time(self.time) or 0
        ):
            raise ValueError(f"time_min {self.time_min} exceeds the job's time {self.time}")
        return self

    @field_serializer("nodes")
    def _dump_nodes(self, nodes: int) -> int | str:
        """``MIN-MAX`` again for an elastic job, so a dumped config reads back the same."""
        return nodes if self.min_nodes is None else f"{self.min_nodes}-{nodes}"

    @property
    def node_range(self) -> str:
        """The ``--nodes`` value: ``N``, or ``MIN-MAX`` for an elastic job."""
        return str(self._dump_nodes(self.nodes))

    @property
    def node_counts(self) -> range:
        """Every node count Slurm may start the job on."""
        return range(self.min_nodes or self.nodes, self.nodes + 1)

    @property
    def ntasks_per_node(self) -> int:
        """Tasks per node: as given, else one per GPU (one task on CPU-only requests)."""
        return self.tasks_per_node or self.gpus_per_node or 1


class Job(Resources):
    """A batch job: a command or a Python callable, its resources and its environment.

    >>> Job(command=["python", "train.py", "--lr", "0.1"], nodes=2, tasks_per_node=4).submit()
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: OneLine = "hpcdl-job"
    launcher: str = "srun"  # before command: command's validator reads it
    command: list[str] | None = None
    function: Callable[..., Any] | None = Field(default=None, exclude=True)
    args: tuple[Any, ...] = Field(default=(), exclude=True)
    kwargs: dict[str, Any] = Field(default_factory=dict, exclude=True)
    env: dict[str, str] = Field(default_factory=dict)
    setup: list[SetupLine] = Field(default_factory=list)
    container: OneLine | None = None
    dependencies: list[str] = Field(default_factory=list)
    array: int | None = Field(default=None, ge=1, le=1_000_000)
    throttle: int | None = Field(default=None, ge=1)
    requeue: bool = False
    cwd: OneLine | None = None

    @field_validator("launcher")
    @classmethod
    def _launcher(cls, v: str) -> str:
        if v not in LAUNCHERS:
            raise ValueError(f"unknown launcher (choose {' or '.join(LAUNCHERS)})")
        return v

    @field_validator("command", mode="before")
    @classmethod
    def _split_command(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return shlex.split(v)
            except ValueError as exc:
                raise ValueError(f"cannot split command: {exc}") from None
        return v

    @field_validator("command")
    @classmethod
    def _nonempty(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is not None and (not v or not v[0]):
            raise ValueError("command must not be empty")
        if v is not None and info.data.get("launcher") == "torchrun" and not torchrun_argv(v, 1, 1):
            raise ValueError(
                f"launcher torchrun runs 'python SCRIPT ...' or 'python -m MODULE ...', "
                f"got: {shlex.join(v)}"
            )
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for key in v:
                if not isinstance(key, str) or not _ENV_NAME.match(key):
                    raise ValueError(f"invalid environment variable name {key!r}")
            return {k: str(val) if not isinstance(val, str) else val for k, val in v.items()}
        return v

    @field_validator("dependencies")
    @classmethod
    def _deps(cls, v: list[str]) -> list[str]:
        for dep in v:
            if not _DEPENDENCY.match(dep):
                raise ValueError(
                    f"invalid dependency {dep!r} (use a job id, or afterok:ID, afterany:ID)"
                )
        return v

    @model_validator(mode="after")
    def _what_to_run(self) -> Job:
        if (self.command is None) == (self.function is None):
            raise ValueError("give exactly one of command or function")
        if self.throttle is not None and self.array is None:
            raise ValueError("throttle needs array")
        if self.launcher == "torchrun" and self.command is None:
            raise ValueError(
                "launcher torchrun runs a command ('python SCRIPT ...'), not a function"
            )
        if self.launcher == "torchrun" and self.min_nodes is not None:
            # torchrun is given --nnodes when the script is rendered, before Slurm picks a count
            raise ValueError("launcher torchrun needs a fixed node count, not nodes: MIN-MAX")
        return self

    @property
    def launched_tasks_per_node(self) -> int:
        """Tasks the scheduler starts per node: one torchrun per node, else one per rank."""
        return 1 if self.launcher == "torchrun" else self.ntasks_per_node

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Job:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc, where) from None

    # -- checks against the site ---------------------------------------------------------------
    def resolve_site(self) -> SiteProfile:
        return load_site(self.site)

    def check(self, site: SiteProfile, where: str = "job") -> None:
        """Raise ConfigError if the site cannot run this request; nothing is queued before this."""
        # no secret named in env, no secret's value in env, setup, command or name
        site.check_secrets(self.env, self.setup, self.command or [], self.name, where)
        get_scheduler(site).check(self, where)  # the back end's own limits (partitions, local)
        if site.accounts and self.account and self.account not in site.accounts:
            raise ConfigError(
                where, "account", f"{self.account!r} is not one of {', '.join(site.accounts)}"
            )
        if site.qos and self.qos and self.qos not in site.qos:
            raise ConfigError(where, "qos", f"{self.qos!r} is not one of {', '.join(site.qos)}")
        containers.check_job_image(site.container.runtime, self.container, where)
        check_snapshot(self.snapshot or site.snapshot, self.cwd, where)
        if self.command is not None and site.container.runtime == "none" and not self.container:
            _check_program(self.command, self.cwd, where)

    def setup_lines(self, site: SiteProfile) -> list[str]:
        """Shell lines run before the tasks start: modules, site setup and env presets, job setup."""
        return setup_lines(self, site)

    def task(self, site: SiteProfile, array_task_id: int | None = None) -> Task:
        """The pickled payload each task runs."""
        preset = site.launcher(self.launcher).env if self.command is not None else {}
        env = {**preset, **self.env, "HPCDL_JOB_NAME": self.name, "HPCDL_SITE": site.name}
        argv = self.command
        if argv is not None and self.launcher == "torchrun":
            argv = torchrun_argv(argv, self.nodes, self.ntasks_per_node)
        cwd = self.cwd or str(Path.cwd())
        if argv is not None:  # apptainer, charliecloud: the command runs inside the image
            argv = containers.wrap_command(site.container, self.image(site), argv, cwd)
        return Task(
            argv=argv,
            function=self.function,
            args=self.args,
            kwargs=self.kwargs,
            env=env,
            cwd=cwd,
            array_task_id=array_task_id,
            launcher=self.launcher if self.command is not None else None,
            preempt=preempt_checkpoint(site, self.partition, self.function),  # Checkpointable
        )

    def interpreter(self, site: SiteProfile) -> str:
        """The interpreter line that unpickles and runs the task on the node."""
        inside = self.function is not None or site.container.runtime == "pyxis"
        cwd = self.cwd or str(Path.cwd())
        line = containers.interpreter(site.container, self.image(site), cwd) if inside else None
        return line or shlex.quote(SUBMIT_PYTHON)

    def image(self, site: SiteProfile) -> str | None:
        """The container image the tasks run in: the job's own, else the site's."""
        return self.container or site.container.image

    def render(self, site: SiteProfile | None = None, folder: Path | None = None) -> str:
        """The exact sbatch script submitit writes for this job (Slurm sites only)."""
        site = site or self.resolve_site()
        self.check(site)
        job = self.staged(site, folder or site.job_root_path / "<job-folder>", copy=False)
        script = get_scheduler(site).render(job, folder)
        line = shlex.join(job.task(site).argv or []) if job.command else job.interpreter(site)
        return containers.annotate(script, site.container, job.image(site), line)

    def staged(self, site: SiteProfile, folder: Path, copy: bool = True) -> Job:
        """This job run from its code snapshot in ``folder`` (taken now unless ``copy`` is false,
        as for ``render``); the job itself when its snapshot is ``none`` (``hpcdl.snapshot``)."""
        spec = self.snapshot or site.snapshot
        if spec.mode == "none":
            return self
        cwd, lines = stage(spec, self.cwd, folder, self.command, copy)
        return self.model_copy(update={"cwd": str(cwd), "setup": [*self.setup, *lines]})

    # -- submission ----------------------------------------------------------------------------
    def submit(self, site: SiteProfile | None = None, test_only: bool = False) -> JobHandle:
        """Check, then queue; returns at once with a handle (never waits for the job)."""
        site = site or self.resolve_site()
        self.check(site)
        return get_scheduler(site).submit(self, test_only=test_only)


def _check_program(argv: list[str], cwd: str | None, where: str) -> None:
    """Fail before queueing when the program or the script it runs does not exist."""
    prog = argv[0]
    base = Path(cwd) if cwd else Path.cwd()
    if os.sep in prog:
        if not (base / prog).exists():
            raise ConfigError(where, "command", f"program {prog!r} does not exist")
    elif shutil.which(prog) is None:
        raise ConfigError(where, "command", f"program {prog!r} is not on PATH")
    is_script = Path(prog).name.startswith("python") and len(argv) > 1 and argv[1].endswith(".py")
    if is_script and not (base / argv[1]).is_file():
        raise ConfigError(where, "command", f"script {argv[1]!r} does not exist")
