"""``hpcdl bench start``: a sweep worker's start against ``import torch`` (its own module:
bench.py is full)."""

from __future__ import annotations

from pathlib import Path

import click

from hpcdl.cli.bench import _out_dir, bench
from hpcdl.cli.progress import spinner
from hpcdl.errors import ConfigError


@click.command("start")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--site", default="local", show_default=True, help="Site profile the jobs run on.")
@click.option("--rounds", default=3, show_default=True, help="Rounds of both (medians).")
@click.option("--timeout", default=600, show_default=True, help="Seconds per job at most.")
@click.option("--out", help="Folder for the figures [bench/start-STAMP].")
def start_cmd(spec: str, site: str, rounds: int, timeout: int, out: str | None) -> None:
    """A one-trial sweep of SPEC (2 training steps): its worker's process start -> first
    training step, against a fresh process's 'import torch' on the same site, ROUNDS times."""
    from hpcdl.hpo import bench_start as b

    if rounds < 1 or timeout < 1:
        raise ConfigError("--rounds", "rounds/timeout", "must be >= 1")
    if not Path(spec).is_file():
        raise ConfigError(spec, "spec", "no such sweep spec")
    folder = _out_dir(out, "start")
    with spinner(f"bench start: {rounds} round(s) on {site}"):
        result = b.run_start_bench(Path(spec), site, rounds, folder.name, float(timeout))
    b.dump(result, folder / "bench_start.json")
    click.echo("\n".join(b.render(result)))
    click.echo(f"figures: {folder / 'bench_start.json'}")


def register(cli: click.Group) -> None:
    """Add ``bench start`` to the ``bench`` group."""
    bench.add_command(start_cmd)
