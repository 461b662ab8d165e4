"""``hpcdl alloc | serve | attach``: interactive work on compute nodes."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import stat
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import click

from hpcdl.cli.jobs import _RESOURCE_OPTIONS, _SUBMITIT_INFO, JobCommand, build_job
from hpcdl.cli.serve_task import KINDS
from hpcdl.errors import ConfigError, HpcdlError

# The job options that make sense for an allocation or a server (no arrays, setup, containers).
_KEEP = {"site", "name", "partition", "nodes", "ntasks", "tasks_per_node", "gpus",
         "gpus_per_node", "cpus_per_task", "mem", "time", "account", "qos", "constraint",
         "exclusive", "reservation", "gpus_per_task", "mem_per_gpu", "exclude", "nodelist",
         "comment", "sbatch"}  # fmt: skip


def _options(names: set[str]) -> Any:
    """The options of ``submit`` named in ``names``, with their help (one list to keep)."""

    def wrap(fn: Any) -> Any:
        for option in reversed(_RESOURCE_OPTIONS):
            params = getattr(option(lambda: None), "__click_params__", [])
            if params and params[-1].name in names:
                fn = option(fn)
        return fn

    return wrap


def _slurm_job(
    args: tuple[str, ...], options: dict[str, Any], what: str, name: str
) -> tuple[Any, Any]:
    """The Job for an allocation or a server, checked against the site like ``submit``."""
    options = {k: v for k, v in options.items() if k in _KEEP}
    options["name"] = options.get("name") or name
    job, where = build_job(args, options)
    site = job.resolve_site()
    job.check(site, where)
    from hpcdl.scheduler import get_scheduler

    if not get_scheduler(site).queued:
        raise ConfigError("", "--site", f"'hpcdl {what}' needs a Slurm site; {site.name!r} "
                          "runs jobs on this machine")  # fmt: skip
    return job, site


@click.command(cls=JobCommand)
@_options(_KEEP)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def alloc(command: tuple[str, ...], **options: Any) -> None:
    """An interactive allocation (salloc) with a shell on its first node (srun --pty).

    \b
    hpcdl alloc --site devcluster -t 1h            # a shell on the first node
    hpcdl alloc --site devcluster -p gpu -G 1 -t 30m
    hpcdl alloc --site devcluster -N 2 -t 10m -- hostname   # a command instead of a shell
    The limits and policy of the site apply as for 'hpcdl submit'; the allocation ends with
    the shell (or the command), or at its time limit."""
    from hpcdl.scheduler.interactive import allocate

    job, site = _slurm_job(tuple(command) or ("bash",), options, "alloc", "alloc")
    status = allocate(job, site, list(command))
    if status:
        raise click.exceptions.Exit(status)


_NEEDS = {"jupyter": ("jupyter", "jupyterlab"), "tensorboard": ("tensorboard", "tensorboard")}


@click.command()
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("target", required=False)
@_options(_KEEP - {"ntasks", "tasks_per_node", "nodes"})
@click.option("--port", type=click.IntRange(0, 65535), default=0,
              help="Port on the node (default: a free one).")  # fmt: skip
@click.option("--wait", "wait_s", type=float, default=300.0, show_default=True,
              help="Seconds to wait for the server to start and answer.")  # fmt: skip
def serve(kind: str, target: str | None, port: int, wait_s: float, **options: Any) -> None:
    """Start a server on a compute node and print how to reach it from a laptop.

    \b
    hpcdl serve jupyter [NOTEBOOK_DIR] --site devcluster -t 2h
    hpcdl serve tensorboard LOGDIR --site devcluster
    hpcdl serve dashboard SWEEP --site devcluster     # optuna-dashboard of a sweep
    hpcdl serve files [DIR] --site devcluster         # a folder (e.g. reports), token-protected
    The job ends at its time limit or with 'hpcdl cancel JOB'."""
    target = _target(kind, target)
    info = Path(f"serve-{uuid.uuid4().hex}.json")  # under the job root, once the job is checked
    command = [sys.executable, "-m", "hpcdl.cli.serve_task", kind, "INFO", target, str(port)]
    job, site = _slurm_job(tuple(command), options, "serve", f"serve-{kind}")
    info = _serve_folder(site) / info
    job = job.model_copy(update={"command": [*command[:4], str(info), *command[5:]]})
    handle = job.submit(site)
    try:
        where = _wait_served(handle, info, wait_s, port)
    except BaseException:  # a server that never answered is not left running
        handle.cancel()
        raise
    _announce(kind, handle, where, job.time)


def _target(kind: str, target: str | None) -> str:
    if kind in _NEEDS and shutil.which(_NEEDS[kind][0]) is None:
        raise ConfigError("", kind, f"'{_NEEDS[kind][0]}' is not installed here: "
                          f"pip install {_NEEDS[kind][1]} (in the environment jobs run in)")  # fmt: skip
    if kind == "dashboard":
        if not target:
            raise ConfigError("", "SWEEP", "give the sweep's name: hpcdl serve dashboard NAME")
        from hpcdl.hpo import Sweep

        Sweep.load(target)  # its one-line error here, not in the job's log
        return target
    if kind == "tensorboard" and not target:
        raise ConfigError("", "LOGDIR", "give the folder TensorBoard reads")
    folder = Path(target or ".").expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError("", "TARGET", f"{folder} is not a folder")
    return str(folder)


def _serve_folder(site: Any) -> Path:
    """A folder only this user can enter, under the job root, for the files the servers' tasks
    write their port and token to (never a command line: ``ps`` shows those to everyone)."""
    from hpcdl.scheduler.registry import ensure_job_root
    from hpcdl.util import share_umask

    folder = ensure_job_root(site) / "serve"
    with share_umask():
        folder.mkdir(exist_ok=True, mode=0o700)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise HpcdlError(f"{folder}: not a private folder of yours (mode 0700); remove it")
    return folder


def _wait_served(handle: Any, info: Path, wait_s: float, port: int) -> dict[str, Any]:
    """Until the task has written INFO and the server answers an HTTP GET; an error with the
    job's log when the job ends first or ``wait_s`` passes."""
    from hpcdl.scheduler import FINISHED, log_tail

    deadline = time.monotonic() + wait_s
    where: dict[str, Any] | None = None
    while True:
        if where is None and info.is_file():
            where = json.loads(info.read_text())
            if "error" in where:
                raise ConfigError("", "--port", f"{where['error']}: choose another, or leave "
                                  "--port out for a free one")  # fmt: skip
        if where is not None and _answers(where):
            return where
        state = handle.state()
        if state in FINISHED:
            raise HpcdlError(f"job {handle.job_id} ended ({state}) before its server answered; "
                             f"its log: {_one_line(log_tail(handle, 5))}")  # fmt: skip
        if time.monotonic() > deadline:
            raise HpcdlError(f"job {handle.job_id} ({state}) did not serve within {wait_s:.0f}s "
                             f"(--wait), cancelled; its log: {_one_line(log_tail(handle, 5))}")  # fmt: skip
        time.sleep(0.5)


def _one_line(text: str) -> str:
    return " | ".join(ln.strip() for ln in text.strip().splitlines() if ln.strip()) or "(empty)"


def _url(where: dict[str, Any], host: str) -> str:
    token = where.get("token") or ""
    if where.get("kind") == "files":
        return f"http://{host}:{where['port']}/{token}/"
    return f"http://{host}:{where['port']}/" + (f"?token={token}" if token else "")


def _answers(where: dict[str, Any]) -> bool:
    try:
        with urllib.request.urlopen(_url(where, where["node"]), timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # an HTTP answer (a login page, 403): the server is up
    except (OSError, ValueError):
        return False


def login_ssh() -> str:
    """How a laptop reaches this login node: remote mode says (``-p PORT user@host``), else this
    user at this host's name."""
    return os.environ.get("HPCDL_LOGIN_SSH") or f"{getpass.getuser()}@{socket.getfqdn()}"


def _announce(kind: str, handle: Any, where: dict[str, Any], limit: str | None) -> None:
    node, port = where["node"], where["port"]
    from hpcdl.config import format_minutes, parse_time

    ends = (
        f"at its time limit ({format_minutes(parse_time(limit))})" if limit else "at its time limit"
    )
    click.echo(f"serving {kind} on {node}:{port} (job {handle.job_id}; it ends {ends} or with "
               f"'hpcdl cancel {handle.job_id}')")  # fmt: skip
    if where.get("token"):
        click.echo(f"  token:  {where['token']}")
    click.echo(f"  tunnel: ssh -N -L {port}:{node}:{port} {login_ssh()}   (on your laptop)")
    click.echo(f"  open:   {_url(where, 'localhost')}")


@click.command()
@click.argument("job_id")
@click.option("--task", type=int, help="Only this task (rank); default: every task.")
def attach(job_id: str, task: int | None) -> None:
    """Follow a job's output as it is written (stdout and stderr of every task, or --task N),
    like tail -f; ends when the job ends. JOB_ID, or ARRAYID_TASK for one array task."""
    from hpcdl.scheduler import FINISHED, find_task
    from hpcdl.scheduler.started import started_tasks

    handle, array_task = find_task(job_id)
    if handle.array is not None and array_task is None:
        raise ConfigError("", "JOB_ID", f"{handle.job_id} is an array: give one task, e.g. "
                          f"{handle.job_id}_0")  # fmt: skip
    count = started_tasks(handle, array_task)  # an elastic job's: the nodes it got
    if task is not None and not 0 <= task < count:
        raise ConfigError("", "--task", f"job {handle.job_id} has tasks 0..{count - 1}")
    tasks = [task] if task is not None else list(range(count))
    tails = [_Tail(path, t if len(tasks) > 1 else None, err)
             for t in tasks for err, path in enumerate(handle.log_paths(t, array_task))]  # fmt: skip
    while True:
        done = handle.state() in FINISHED  # read before the files: nothing written after is lost
        for tail in tails:
            tail.show(last=done)
        if done:
            return
        time.sleep(0.5)


class _Tail:
    """One log file followed from where it was last read; whole lines only until the end."""

    def __init__(self, path: Path, task: int | None, err: int) -> None:
        self.path, self.err, self.pos, self.held = path, bool(err), 0, ""
        self.prefix = f"[{task}] " if task is not None else ""

    def show(self, last: bool) -> None:
        if not self.path.is_file():
            return
        with open(self.path, errors="replace") as f:
            f.seek(self.pos)
            chunk = f.read()
            self.pos = f.tell()
        lines = (self.held + chunk).split("\n")
        self.held = "" if last else lines.pop()
        for line in lines if lines[-1:] != [""] else lines[:-1]:
            if not _SUBMITIT_INFO.match(line):  # submitit's own progress, as 'hpcdl logs'
                click.echo(self.prefix + line, err=self.err)


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    for command in (alloc, serve, attach):
        cli.add_command(command)
