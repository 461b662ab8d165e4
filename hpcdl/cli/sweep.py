"""``hpcdl sweep …`` and ``hpcdl sync``: sweeps as Slurm job arrays, from the login node."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import click

from hpcdl.errors import HpcdlError


@click.group()
def sweep() -> None:
    """Hyper-parameter sweeps: one sbatch --array, each task a trial (Optuna + W&B)."""


@sweep.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option(
    "--wait", is_flag=True, help="Stay until the sweep (and final job) finish, then report."
)
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to --wait at most.")
def run(spec: Path, overrides: tuple[str, ...], wait: bool, timeout: float) -> None:
    """Validate SPEC (configs/*.yaml), submit the array and return at once."""
    from hpcdl.hpo import Sweep

    _check_overrides(overrides)
    s = Sweep(spec, list(overrides))
    handles = s.run()
    click.echo(
        f"sweep {s.spec.name}: {s.spec.trials} trials, {s.spec.parallelism} at a time, on {s.site.name}"
    )
    for h in handles:
        what = f"array of {h.array}" if h.array else "job"
        click.echo(f"  {h.name}: {what} {h.job_id}")
    click.echo(f"  folder: {s.paths.root}")
    if not wait:
        click.echo(f"  follow: hpcdl sweep status {s.spec.name}")
        return
    _wait_with_progress(s, timeout)
    _print_best(s)
    from hpcdl.hpo.report import write_report

    png, page = write_report(s)
    click.echo(f"report: {png} and {page}")


def _check_overrides(overrides: tuple[str, ...]) -> None:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise HpcdlError(f"override {bad[0]!r} must look like key=value")


def _wait_with_progress(s: Any, timeout: float) -> None:
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hpcdl.hpo.folder import FINISHED_SLOT

    deadline = time.monotonic() + timeout
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as progress:  # fmt: skip
        task = progress.add_task("trials", total=s.spec.trials)
        while True:
            slots = s.slots()
            finished = sum(x.state in FINISHED_SLOT for x in slots)
            pruned = sum(x.state == "pruned" for x in slots)
            progress.update(task, completed=finished, description=f"trials ({pruned} pruned)")
            if s.finished():
                return
            if time.monotonic() > deadline:
                raise HpcdlError(
                    f"sweep {s.spec.name} not finished after {timeout:.0f}s (it goes on)"
                )
            time.sleep(1.0)


def _print_best(s: Any) -> None:
    best = s.best()
    if "pareto" in best:
        _print_front(best)
        return
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
    click.echo(
        f"best trial {best['trial']}: {s.spec.metric}={_fmt(best[s.spec.metric])}  ({params})"
    )
    final = best.get("final")
    if final:
        scores = "  ".join(
            f"{k}={_fmt(v)}" for k, v in final.items() if k in {"test_acc", "test_loss"}
        )
        click.echo(f"final model (retrained on train+val), held-out test split: {scores}"
                   f"  ({final.get('test_samples', '?')} samples)")  # fmt: skip


def _print_front(best: dict[str, Any]) -> None:
    """The Pareto front as a table: trial, each objective, the parameters."""
    from hpcdl.hpo.table import grid

    names = [o["name"] for o in best["objectives"]]
    keys = sorted({k for t in best["pareto"] for k in t["params"]})
    heads = ["trial", *(f"{o['name']} ({o['direction'][:3]})" for o in best["objectives"]), *keys]
    rows = [[str(t["trial"]), *(_fmt(t[n]) for n in names),
             *(_fmt(t["params"][k]) if k in t["params"] else "-" for k in keys)]
            for t in best["pareto"]]  # fmt: skip
    click.echo(f"Pareto front: {len(rows)} trial(s) no other trial beats in every objective")
    for line in grid(heads, rows, 10**6):
        click.echo(line)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@sweep.command()
@click.argument("name")
@click.option("--wide", is_flag=True, help="Full parameter names, node, W&B run, last error.")
def status(name: str, wide: bool) -> None:
    """Every trial (state, metric, epochs, tries, parameters), the sweep's jobs with their
    states and pending reasons, and what is stuck, if anything."""
    import shutil

    from hpcdl.hpo import Sweep
    from hpcdl.hpo.table import status_text

    colors = {"complete": "green", "running": "cyan", "pruned": "yellow", "pending": "white"}
    width = shutil.get_terminal_size((100, 24)).columns
    for line in status_text(Sweep.load(name), width, wide,
                            lambda st: click.style(st, fg=colors.get(st, "red"))):  # fmt: skip
        click.echo(line)


@sweep.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def best(name: str, as_json: bool) -> None:
    """The best trial's parameters and metric (and the final test result, when there)."""
    from hpcdl.hpo import Sweep

    s = Sweep.load(name)
    if as_json:
        click.echo(json.dumps(s.best(), indent=1, default=str))
    else:
        _print_best(s)


@sweep.command()
@click.argument("name")
@click.option(
    "--output", "-o", type=click.Path(path_type=Path), help="Folder (default: the sweep's)."
)
def report(name: str, output: Path | None) -> None:
    """Write report.png and report.html: Optuna's optimization history, reported values per
    epoch, parallel coordinates and parameter importances, and the trial table."""
    from hpcdl.hpo import Sweep
    from hpcdl.hpo.report import write_report

    png, page = write_report(Sweep.load(name), output)
    click.echo(f"wrote {png} and {page}")


@sweep.command()
@click.argument("name")
@click.argument("overrides", nargs=-1)
def resume(name: str, overrides: tuple[str, ...]) -> None:
    """Submit the trials still missing (never started, killed, cancelled) with a new final
    job; with none missing, a final job if none will run (replacing one that never can).

    OVERRIDES (KEY=VALUE, as for 'sweep run') fix how the rest runs, e.g.
    resources.partition=cpu or resources.time=30m; what the sweep studies (space, metric,
    direction, sampler, trials) stays."""
    from hpcdl.hpo import Sweep

    _check_overrides(overrides)
    text, handles = Sweep.load(name).resume_why(list(overrides))
    click.echo(f"{name}: {text}: " + ", ".join(f"{h.name} {h.job_id}" for h in handles))


@sweep.command()
@click.argument("name")
@click.argument("more", metavar="N", type=int)
def extend(name: str, more: int) -> None:
    """Run N more trials on the sweep's study (a finished sweep, or one whose jobs ended): the
    sampler goes on from every trial so far; the final job retrains the best of all."""
    from hpcdl.hpo import Sweep

    text, handles = Sweep.load(name).extend(more)
    click.echo(f"{name}: {text}: " + ", ".join(f"{h.name} {h.job_id}" for h in handles))


@sweep.command()
@click.argument("name")
@click.argument("parallelism", type=int)
def throttle(name: str, parallelism: int) -> None:
    """Change how many trials run at once on the live array."""
    from hpcdl.hpo import Sweep

    job_id = Sweep.load(name).throttle(parallelism)
    click.echo(f"array {job_id}: at most {parallelism} task(s) at once")


@sweep.command()
@click.argument("name")
def cancel(name: str) -> None:
    """Cancel every queued or running job of the sweep (resume later with 'sweep resume')."""
    from hpcdl.hpo import Sweep

    ids = Sweep.load(name).cancel()
    click.echo(f"cancelled {', '.join(ids) if ids else 'nothing (no active jobs)'}")


@sweep.command("move-storage")
@click.argument("name")
@click.argument("url")
@click.option("--password-file", help="The database password's file (yours, chmod 600); "
              "else libpq's ~/.pgpass.")  # fmt: skip
def move_storage(name: str, url: str, password_file: str | None) -> None:
    """Move a sweep's study from its journal file to a PostgreSQL database (URL:
    postgresql://USER@HOST:PORT/DB, no password in it). Refused while a job of the sweep is
    queued or running: 'sweep cancel', move, then 'sweep resume'."""
    from hpcdl.hpo import Sweep
    from hpcdl.hpo.move import move

    s = Sweep.load(name)
    moved = move(s.spec, s.paths, s.site, url, password_file)
    db = moved.storage
    click.echo(f"sweep {name}: study moved to {db} as {db.study if db else '?'}; "
               f"the journal stays at {s.paths.study} (no longer read)")  # fmt: skip


@sweep.command("list")
def list_sweeps() -> None:
    """Sweeps under every site's job root."""
    from hpcdl.scheduler import registry_roots

    for root in registry_roots():
        for spec in sorted((root / "sweeps").glob("*/spec.json")):
            click.echo(f"{spec.parent.name}  {spec.parent}")


@click.command()
@click.argument("name")
@click.option("--dry-run", is_flag=True, help="List the offline runs without syncing.")
@click.option("--follow", is_flag=True, help="Upload new and updated runs while the sweep runs; "
              "end when its jobs have ended (or Ctrl-C). An unchanged run is never uploaded again.")  # fmt: skip
@click.option(
    "--interval", default=30.0, show_default=True, help="Seconds between looks (--follow)."
)
def sync(name: str, dry_run: bool, follow: bool, interval: float) -> None:
    """Upload a sweep's offline W&B runs (run this on the login node, which has network)."""
    from hpcdl.hpo import Sweep

    s = Sweep.load(name)
    if follow:
        if dry_run:
            raise HpcdlError("--follow uploads; --dry-run only lists: give one of them")
        _follow(s, interval)
        return
    runs = sorted(p for p in s.paths.root.rglob("offline-run-*") if p.is_dir())
    if not runs:
        raise HpcdlError(f"sweep {name!r} has no offline W&B runs under {s.paths.root}")
    if dry_run:
        for run_dir in runs:
            click.echo(str(run_dir))
        return
    from hpcdl.cli.progress import bar

    failed = 0
    with bar("syncing W&B runs") as on_progress:
        for i, run_dir in enumerate(runs):
            if on_progress is not None:
                on_progress(i, len(runs))
            failed += not _sync_one(run_dir)
            if on_progress is not None:
                on_progress(i + 1, len(runs))
    if failed:
        raise HpcdlError(f"{failed} of {len(runs)} run(s) did not sync (network or WANDB_API_KEY?)")


def _sync_one(run_dir: Path) -> bool:
    """``wandb sync`` of one run folder; prints one line; whether it worked."""
    proc = subprocess.run(
        [_wandb(), "sync", str(run_dir)], capture_output=True, text=True, timeout=600
    )
    ok = proc.returncode == 0
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] if not ok else []
    click.echo(f"{'synced' if ok else 'FAILED'} {run_dir}" + (f": {tail[0]}" if tail else ""))
    return ok


def _follow(s: Any, interval: float) -> None:
    """Look every ``interval`` seconds; upload the runs that are new or changed since their last
    upload (:mod:`hpcdl.hpo.wandb_sync`); after the look that finds every job of the sweep
    ended, one last pass, then stop."""
    import time

    from hpcdl.hpo.wandb_sync import offline_runs, read_synced, signature, to_upload, write_synced

    synced = read_synced(s.paths)
    click.echo(f"following sweep {s.spec.name}: new and updated W&B runs every {interval:g}s "
               "until its jobs end (Ctrl-C stops)")  # fmt: skip
    while True:
        ended = not any(j.live for j in s.jobs())  # before the scan: the last pass sees all
        runs = {str(p): signature(p) for p in offline_runs(s.paths)}
        failed = []
        for run in to_upload(runs, synced):
            if _sync_one(Path(run)):
                synced[run] = runs[run]
                write_synced(s.paths, synced)  # an interrupted follow does not upload it again
            else:
                failed.append(run)
        if ended:
            break
        time.sleep(interval)
    if failed:
        raise HpcdlError(f"{len(failed)} run(s) did not sync (network or WANDB_API_KEY?)")
    click.echo(f"sweep {s.spec.name}: its jobs have ended; {len(synced)} run(s) uploaded")


def _wandb() -> str:
    import shutil
    import sys

    return shutil.which("wandb") or str(Path(sys.executable).parent / "wandb")


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    from hpcdl.cli import sweep_live

    sweep_live.register(sweep)
    cli.add_command(sweep)
    cli.add_command(sync)
