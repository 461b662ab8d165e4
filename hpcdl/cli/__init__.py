"""The ``hpcdl`` command line. Each concept has its own module; heavy imports stay inside commands."""

from __future__ import annotations

import logging
import subprocess
import sys

import click

from hpcdl import exit_guard
from hpcdl.errors import HpcdlError
from hpcdl.util import LOGGER_NAME


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpcdl")
@click.option("--remote", metavar="USER@HOST", help="Run the command on this login node over SSH.")
def cli(remote: str | None) -> None:
    """hpcdl: deep learning on Slurm: site-checked jobs, training, HDF5 shards, sweeps."""


def _register() -> None:
    from hpcdl.cli import (
        bench,
        bench_array,
        bench_start,
        bench_storage,
        data,
        export,
        init,
        interactive,
        jobs,
        remote,
        report,
        reproduce,
        site,
        sweep,
        train,
    )

    for module in (init, jobs, site, train, export, reproduce, data, sweep, bench, bench_storage,
                   bench_array, bench_start, interactive, remote):  # fmt: skip
        module.register(cli)
    report.register(cli)


class _EchoHandler(logging.Handler):
    """Library records shown the way the library used to print them: a ``note: ...`` (e.g.
    'note: accounting unavailable ...' above the status table) as a plain line on stdout, beside
    the command's own output; any other warning on stderr as ``hpcdl: warning: ...``. The stream
    is looked up at each record, so a caller that swaps sys.stdout/stderr (tests) still sees them."""

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if record.levelno >= logging.WARNING and not text.startswith("note:"):
            click.echo(f"hpcdl: warning: {text}", err=True)
        else:
            click.echo(text)


def _setup_logging() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and turns every user error into one line on stderr, status 2."""
    _register()
    _setup_logging()
    try:
        from hpcdl.cli.remote import route  # remote mode: the command runs on a login node

        status = route(list(sys.argv[1:] if argv is None else argv))
        if status is not None:
            return status
        cli.main(args=argv, prog_name="hpcdl", standalone_mode=False)
    except HpcdlError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except subprocess.TimeoutExpired as exc:  # a command hpcdl ran (ssh, rsync, sacct) hung
        what = exc.cmd if isinstance(exc.cmd, str) else " ".join(map(str, exc.cmd[:3]))
        click.echo(f"error: '{what}' did not answer within {exc.timeout:g} s; try again, or "
                   "check that host or service", err=True)  # fmt: skip
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        return 2
    return 0


def console_main() -> None:
    """The ``hpcdl`` command: :func:`main`, then exit with its status; past any gloo thread a
    training left running, without Python's finalization (:func:`hpcdl.exit_guard.leave`)."""
    status = main()
    exit_guard.leave(status)
    sys.exit(status)


if __name__ == "__main__":
    console_main()
