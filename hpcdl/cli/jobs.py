"""``hpcdl submit | render | status | logs | cancel | clean``: jobs from the login node."""

from __future__ import annotations

import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from hpcdl.cli.flags import NOT_HPCDL, NodesValue, per_node, policy_added, when_where
from hpcdl.errors import ConfigError, HpcdlError

# Extra sbatch options (hpcdl.slurm_options): checked against the partition's site policy.
SBATCH_OPTIONS = [
    click.option("--constraint", "-C", help="Node features, e.g. a100 or 'intel&ib'."),
    click.option(
        "--exclusive", is_flag=True, default=None, help="Whole nodes (exclusive=user: job file)."
    ),
    click.option("--reservation", help="Run in this reservation."),
    click.option("--gpus-per-task", "gpus_per_task", help="GPUs per task: COUNT or TYPE:COUNT."),
    click.option("--gpu-bind", "gpu_bind", help="e.g. closest, single:1, map_gpu:0,1."),
    click.option("--mem-per-gpu", "mem_per_gpu", help="Memory per GPU, e.g. 32G (not with --mem)."),
    click.option("--exclude", "-x", help="Nodes to avoid, e.g. node[1-2]."),
    click.option("--nodelist", "-w", help="Nodes to run on, e.g. node[3-4]."),
    click.option("--mail-type", "mail_type", help="e.g. END,FAIL."),
    click.option("--mail-user", "mail_user", help="Who gets the mail (default: you)."),
    click.option("--begin", help="Start no earlier than, e.g. now+1hour, 2026-12-24T08:00."),
    click.option("--time-min", "time_min", help="The least time the job may get, e.g. 30m."),
    click.option("--comment", help="The job's comment in squeue/sacct."),
    click.option(
        "--sbatch",
        "sbatch",
        multiple=True,
        help="Any other sbatch option: KEY=VALUE, or KEY for a flag (repeatable).",
    ),
]


_RESOURCE_OPTIONS = [
    # Short flags mean what they mean to sbatch (-n total tasks, -G total GPUs); sbatch's -s
    # (--oversubscribe) and -e (--error) are not hpcdl's --site and --env (tests/cluster/test_first_hour.py)
    click.option("--site", help="Site profile name or YAML path (default: $HPCDL_SITE or local)."),
    click.option("--name", "--job-name", "-J", "name", help="Job name."),
    click.option("--partition", "-p"),
    click.option(
        "--nodes", "-N", type=NodesValue(), help="Nodes: N, or MIN-MAX to start on what is free."
    ),
    click.option(
        "--ntasks",
        "-n",
        type=int,
        help="Tasks (ranks) in all, as sbatch -n; a multiple of --nodes, spread evenly.",
    ),
    click.option("--ntasks-per-node", "--tasks-per-node", "tasks_per_node", type=int),
    click.option(
        "--gpus",
        "-G",
        type=int,
        help="GPUs in all, as sbatch -G; a multiple of --nodes, spread evenly.",
    ),
    click.option("--gpus-per-node", "gpus_per_node", type=int),
    click.option("--cpus-per-task", "-c", "cpus_per_task", type=int),
    click.option("--mem", help="Memory per node, e.g. 16G."),
    click.option("--time", "-t", help="Time limit, e.g. 30m, 02:00:00, 1-00:00:00."),
    click.option("--account", "-A"),
    click.option("--qos", "-q"),
    click.option("--array", type=int, help="Array size: tasks 0..N-1."),
    click.option("--throttle", type=int, help="At most this many array tasks at once."),
    click.option("--env", "env", multiple=True, help="KEY=VALUE (repeatable)."),
    click.option("--setup", multiple=True, help="Shell line run before the tasks (repeatable)."),
    click.option("--after", "dependencies", multiple=True, help="Start after this job succeeds."),
    click.option("--container", help="Container image (site's runtime)."),
    click.option("--requeue/--no-requeue", default=None, help="Let Slurm requeue the job."),
    click.option(
        "--snapshot",
        metavar="git|rsync|none",
        help="Run a copy of the code taken at submission (default: the site's, else none).",
    ),
    click.option(
        "--launcher",
        help="How a command's ranks start: srun (default; one task per rank, torch.distributed "
        "variables set) or torchrun (one torchrun per node).",
    ),
    *SBATCH_OPTIONS,
    click.argument("args", nargs=-1, type=click.UNPROCESSED),
]


def _resource_options(fn: Any) -> Any:
    for option in reversed(_RESOURCE_OPTIONS):
        fn = option(fn)
    return fn


def build_job(args: tuple[str, ...], options: dict[str, Any]) -> Any:
    """A Job from ``JOBFILE.yaml [key=value ...]`` or ``-- CMD ARGS``, then CLI options on top."""
    from hpcdl.config import apply_overrides, read_yaml
    from hpcdl.job import Job

    if not args:
        raise ConfigError("", "", "nothing to run: give a job file (configs/*.yaml) or -- CMD ARGS")
    data: dict[str, Any]
    if args[0].endswith((".yaml", ".yml")):
        where = args[0]
        data = read_yaml(Path(args[0]))
        bad = [a for a in args[1:] if "=" not in a]
        if bad:
            raise ConfigError("", bad[0], "after a job file only key=value overrides are allowed")
        data = apply_overrides(data, list(args[1:]), where)
    else:
        where, data = "command line", {"command": list(args)}
    totals = {key: options.pop(key, None) for key in ("ntasks", "gpus")}
    for key, value in options.items():
        if value in (None, ()):
            continue
        if key == "env":
            pairs = dict(_split_pair(v, "--env") for v in value)
            data["env"] = {**(data.get("env") or {}), **pairs}
        elif key == "sbatch":
            flags: dict[str, str | bool] = dict(_sbatch_pair(v) for v in value)
            data["sbatch"] = {**(data.get("sbatch") or {}), **flags}
        elif key in {"setup", "dependencies"}:
            data[key] = [*(data.get(key) or []), *value]
        else:
            data[key] = value
    for key, total in totals.items():
        if total is not None:
            per_node(data, key, total, where)
    return Job.from_dict(data, where), where


def _sbatch_pair(text: str) -> tuple[str, str | bool]:
    """``--sbatch KEY=VALUE`` (a valued option) or ``--sbatch KEY`` (a flag)."""
    if "=" not in text:
        return text, True
    return _split_pair(text, "--sbatch")


class JobCommand(click.Command):
    """A command taking ``[OPTIONS] -- CMD ARGS``: an unknown option is click's error with a
    hint, never the program (``--constraint`` is not on PATH)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            hint = NOT_HPCDL.get(exc.option_name) or (
                "hpcdl's options go before '--', the command and its own options after it"
            )
            raise click.UsageError(f"{exc.format_message()} ({hint})", ctx) from None


def _split_pair(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError("", flag, f"expected KEY=VALUE, got {text!r}")
    return key, value


@click.command(cls=JobCommand)
@_resource_options
@click.option("--test-only", is_flag=True, help="Also ask 'sbatch --test-only' before queueing.")
@click.option("--parsable", is_flag=True, help="Print only the job id.")
def submit(args: tuple[str, ...], test_only: bool, parsable: bool, **options: Any) -> None:
    """Queue a job and return at once.

    \b
    hpcdl submit configs/hello.yaml nodes=2 env.MSG=hi
    hpcdl submit --site devcluster -N 2 -n 4 -- python train.py --lr 0.1
    hpcdl submit --site devcluster -N 2 --ntasks-per-node 2 --launcher torchrun -- python ddp.py
    """
    from hpcdl.scheduler import get_scheduler

    job, where = build_job(args, options)
    site = job.resolve_site()
    job.check(site, where)
    added = policy_added(job, site)
    try:
        answer = get_scheduler(site).test_only(job) if test_only else None
        handle = job.submit(site)
    except HpcdlError as exc:
        if added is None or isinstance(exc, ConfigError):  # hpcdl's own checks name the field
            raise
        raise HpcdlError(f"{exc} ({added})") from None
    if parsable:
        click.echo(handle.job_id)
        if answer:
            click.echo(when_where(answer), err=True)
        return
    kind = f"array of {handle.array}" if handle.array else "job"
    click.echo(f"Submitted {kind} {handle.job_id} ({handle.name}) on {handle.site}")
    if answer:
        click.echo(f"  {when_where(answer)}" + (f" ({added})" if added else ""))
    if handle.parts:  # over the site's max_array_size: one job, several Slurm arrays
        ids = ", ".join(p.job_id for p in handle.parts)
        click.echo(f"  as {len(handle.parts)} Slurm arrays (one job for hpcdl): {ids}")
    click.echo(f"  folder: {handle.folder}")
    click.echo(f"  follow: hpcdl status {handle.job_id}   logs: hpcdl logs {handle.job_id}")


@click.command(cls=JobCommand)
@_resource_options
def render(args: tuple[str, ...], **options: Any) -> None:
    """Print the exact sbatch script submitit would submit (nothing is queued)."""
    job, where = build_job(args, options)
    site = job.resolve_site()
    job.check(site, where)
    click.echo(job.render(site), nl=False)
    added = policy_added(job, site)
    if added:
        click.echo(f"note: {added}", err=True)


@click.command()
@click.argument("job_id", required=False)
@click.option("--last", default=20, show_default=True, help="How many recent jobs to list.")
@click.option("--efficiency", is_flag=True, help="What each held and used (hpcdl report).")
def status(job_id: str | None, last: int, efficiency: bool) -> None:
    """States of recent jobs (one batched sacct call), or of every task of JOB_ID; a pending
    job's reason (Priority, Resources, Dependency, ...) in its own column. --efficiency: CPU,
    memory, GPU use, queue wait and node-hours from sacct instead."""
    from rich.console import Console

    from hpcdl.scheduler import find_handle, job_statuses, recent_handles

    # Piped (a file, grep, a pager): rows stay whole lines whatever $COLUMNS says, never a
    # cell wrapped over two lines; a terminal gets rich's fitting.
    console = Console() if sys.stdout.isatty() else Console(width=10_000)
    if efficiency:
        from hpcdl.cli.report import efficiency_status

        efficiency_status(console, job_id, last)
        return
    if job_id:
        handle = find_handle(job_id)
        console.print(_task_table(handle, job_statuses([handle])[handle.job_id]))
        console.print(f"folder: {handle.folder}", markup=False)
        return
    handles = recent_handles(last)
    if not handles:
        console.print("no jobs yet (submit one with 'hpcdl submit')")
        return
    console.print(_job_table(handles, job_statuses(handles)))


def _task_table(handle: Any, statuses: dict[str, Any]) -> Any:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    # names, sites and Slurm's reasons are plain text to rich, never markup ('[/x]' in a name)
    table = Table(title=escape(f"{handle.job_id} {handle.name} ({handle.site})"))
    reasons = any(s.reason for s in statuses.values())
    for col in ("task", "state", *(["reason"] if reasons else [])):
        table.add_column(col)
    for tid, s in statuses.items():
        table.add_row(Text(tid), _styled(s.state), *([Text(s.reason)] if reasons else []))
    return table


def _job_table(handles: list[Any], all_statuses: dict[str, dict[str, Any]]) -> Any:
    """One row per job; the reason column appears only when a listed job is pending."""
    from rich.table import Table
    from rich.text import Text

    from hpcdl.scheduler import summarize

    rows, reasons = [], False
    for h in handles:
        statuses = all_statuses[h.job_id]
        states = {tid: s.state for tid, s in statuses.items()}
        state = summarize(states)
        reason = next((s.reason for s in statuses.values() if s.reason), "")
        reason = reason if state == "PENDING" else ""
        reasons = reasons or bool(reason)
        counts = _counts(states) if h.array else str(h.tasks)
        stamp = datetime.fromtimestamp(h.submitted_at).strftime("%Y-%m-%d %H:%M:%S")
        rows.append((Text(h.job_id), Text(h.name), Text(h.site), _styled(state), counts, stamp,
                     Text(reason)))  # fmt: skip
    table = Table()
    for col in (
        "job",
        "name",
        "site",
        "state",
        "tasks",
        "submitted",
        *(["reason"] if reasons else []),
    ):
        table.add_column(col)
    for row in rows:
        table.add_row(*(row if reasons else row[:-1]))
    return table


def _counts(states: dict[str, str]) -> str:
    tally: dict[str, int] = {}
    for s in states.values():
        tally[s] = tally.get(s, 0) + 1
    return " ".join(f"{n} {s.lower()}" for s, n in sorted(tally.items()))


def _styled(state: str) -> str:
    color = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow"}.get(state, "red")
    from rich.markup import escape

    return f"[{color}]{escape(state)}[/{color}]"


@click.command()
@click.argument("job_id")
@click.option("--task", default=0, show_default=True, help="Task (rank) within the job.")
@click.option("--err", "stderr", is_flag=True, help="Show stderr instead of stdout.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@click.option("--all", "show_all", is_flag=True, help="Also submitit's own INFO lines.")
def logs(job_id: str, task: int, stderr: bool, follow: bool, show_all: bool) -> None:
    """Print a job's log (JOB_ID or ARRAYID_TASK for one array task).

    The program's output, without submitit's own INFO lines (--all shows them; its warnings and
    errors always show)."""
    from hpcdl.scheduler import FINISHED, find_task
    from hpcdl.scheduler.started import started_tasks

    handle, array_task = find_task(job_id)  # a split array's task: its global index
    if handle.array is not None and array_task is not None and array_task >= handle.array:
        raise ConfigError("", "JOB_ID", f"array {handle.job_id} has tasks 0..{handle.array - 1}")
    tasks = started_tasks(handle, array_task) if task else handle.tasks  # task 0 always exists
    if task >= tasks:
        raise ConfigError("", "--task", f"job {handle.job_id} has tasks 0..{tasks - 1}")
    path = handle.log_paths(task, array_task)[1 if stderr else 0]
    pos, held = 0, ""  # held: a last line still being written (filtered once it is whole)

    def show(chunk: str, last: bool) -> None:
        nonlocal held
        if show_all:
            click.echo(chunk, nl=False)
            return
        lines = (held + chunk).split("\n")
        held = "" if last else lines.pop()
        kept = [line for line in lines if not _SUBMITIT_INFO.match(line)]
        click.echo("\n".join(kept) + ("" if last or not kept else "\n"), nl=False)

    while True:
        if path.is_file():
            with open(path, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            show(chunk, last=not follow)
        elif not follow:
            raise HpcdlError(f"no log yet at {path} (job {handle.job_id}: {handle.state()})")
        if not follow or handle.state() in FINISHED:
            if follow and path.is_file():  # print what arrived between the last read and the end
                with open(path, errors="replace") as f:
                    f.seek(pos)
                    show(f.read(), last=True)
            return
        time.sleep(1.0)


#: submitit's own progress lines in a task's log ("submitit INFO (2026-...) - Loading pickle").
_SUBMITIT_INFO = re.compile(r"submitit (INFO|DEBUG) \(\d{4}-\d\d-\d\d [\d:,.]+\) - ")


@click.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job (or ARRAYID_TASK for one array task)."""
    from hpcdl.scheduler import find_task

    handle, array_task = find_task(job_id)  # a split array: every part, or the task's part
    handle.cancel(array_task)
    click.echo(f"cancelled {job_id}")


@click.command()
@click.option("--older-than", "days", default=7.0, show_default=True, help="Age in days.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
def clean(days: float, dry_run: bool) -> None:
    """Remove folders and records of finished jobs older than --older-than days."""
    from hpcdl.scheduler import clean as clean_jobs

    if days < 0:
        raise ConfigError("", "--older-than", f"must be >= 0, got {days}")
    removed = clean_jobs(days, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for h in removed:
        click.echo(f"{verb} {h.job_id} {h.folder}")
    click.echo(f"{verb} {len(removed)} finished job(s) older than {days:g} day(s)")


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    for command in (submit, render, status, logs, cancel, clean):
        cli.add_command(command)
