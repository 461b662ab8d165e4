"""The ``hpcdl`` command line. Each concept has its own module; heavy imports stay inside commands."""

from __future__ import annotations

import sys

import click

from hpcdl.errors import HpcdlError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpcdl")
def cli() -> None:
    """hpcdl: deep learning on Slurm: site-checked jobs, training, HDF5 shards, sweeps."""


def _register() -> None:
    from hpcdl.cli import bench, data, jobs, site, sweep, train

    for module in (jobs, site, train, data, sweep, bench):
        module.register(cli)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and turns every user error into one line on stderr, status 2."""
    _register()
    try:
        cli.main(args=argv, prog_name="hpcdl", standalone_mode=False)
    except HpcdlError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
