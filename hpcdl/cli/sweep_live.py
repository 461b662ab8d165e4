"""``hpcdl sweep watch`` (alerts for a stuck sweep) and ``hpcdl sweep dashboard`` (optuna-dashboard
over the sweep's study): the login node's live views of a running sweep."""

from __future__ import annotations

import time

import click

from hpcdl.errors import HpcdlError


@click.command()
@click.argument("name")
@click.option("--once", is_flag=True, help="Look once and exit (for cron or scrontab).")
@click.option("--interval", default=60.0, show_default=True, help="Seconds between looks.")
@click.option("--stuck-after", help="No progress (a trial claimed or ended, an epoch reported) "
              "for this long (30m, 2h) while the sweep's jobs are queued or running is 'stuck' "
              "(default: notify.stuck_after).")  # fmt: skip
@click.option("--timeout", type=float, help="Stop watching after this many seconds.")
def watch(
    name: str, once: bool, interval: float, stuck_after: str | None, timeout: float | None
) -> None:
    """Send the sweep's alerts that only an outside look can (stuck: a job Slurm will never
    start, trials no job will run, no progress), and 'finished' if its jobs could not; each
    alert once (the sweep folder's alerts/). Ends when the sweep finishes."""
    from hpcdl.config import parse_time
    from hpcdl.hpo import Sweep
    from hpcdl.hpo.alerts import check, effective_notify, has_destination, user_config

    if stuck_after is not None:
        try:
            parse_time(stuck_after)
        except ValueError as exc:
            raise HpcdlError(f"--stuck-after: {exc}") from None
    sweep = Sweep.load(name)
    if not has_destination(effective_notify(sweep.site)):
        raise HpcdlError(
            f"no alert destination for sweep {name}: set notify.webhook or notify.command in "
            f"{user_config()} (or the site profile {sweep.site.name!r})"
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        event, sent, text = check(sweep, stuck_after)
        if event is not None:
            click.echo(f"{name}: {event}{' (sent)' if sent else ' (sent before)'}: {text}")
        if once or event == "finished":
            return
        if deadline is not None and time.monotonic() > deadline:
            raise HpcdlError(f"sweep {name} not finished after {timeout:.0f}s (it goes on)")
        time.sleep(interval)


@click.command()
@click.argument("name")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=0, help="Loopback port (default: a free one)."
)
def dashboard(name: str, port: int) -> None:
    """Serve optuna-dashboard over the sweep's study on this (login) node, on loopback only and
    behind a token; prints the URL (with the token) and the ssh -L line to reach it from your
    machine. Ctrl-C ends it."""
    from hpcdl.hpo import Sweep
    from hpcdl.hpo.dashboard import serve, tunnel_line

    sweep = Sweep.load(name)
    with serve(sweep, port) as served:
        bound = served.port
        click.echo(f"dashboard of sweep {name}: http://127.0.0.1:{bound}{served.path}")
        click.echo(f"from your machine: {tunnel_line(bound)}")
        click.echo(f"  then open http://localhost:{bound}{served.path}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            click.echo("dashboard stopped")


def register(sweep: click.Group) -> None:
    """Add this module's commands to ``hpcdl sweep``."""
    sweep.add_command(watch)
    sweep.add_command(dashboard)
