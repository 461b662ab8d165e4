"""`hpcdl bench` commands: side-by-side measurements printed as ratios."""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Benchmarks: our path vs. the naive path vs. the raw ceiling, in one run."""


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    cli.add_command(bench)
