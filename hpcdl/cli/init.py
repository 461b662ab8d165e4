"""``hpcdl init DIR``: the example configs and the digits data, for a pip-installed hpcdl."""

from __future__ import annotations

from pathlib import Path

import click

from hpcdl.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # package data (the repo's configs/)


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--no-data", is_flag=True, help="Write only the configs, not data/digits.")
@click.option("--force", is_flag=True, help="Overwrite configs that exist already.")
@click.pass_context
def init(ctx: click.Context, directory: Path, no_data: bool, force: bool) -> None:
    """Write the example configs (DIRECTORY/configs/*.yaml) and the digits shards
    (DIRECTORY/data/digits) so the README's main job runs from an installed package:

    \b
      hpcdl init work && cd work
      hpcdl sweep run configs/sweep_digits.yaml --wait
    """
    from hpcdl.util import atomic_write_text

    sources = sorted(CONFIGS.glob("*.yaml"))
    if not sources:
        raise ConfigError(str(CONFIGS), "", "no example configs in this installation")
    out = directory / "configs"
    existing = [p.name for p in sources if (out / p.name).exists()]
    if existing and not force:
        raise ConfigError(str(out), "", f"{', '.join(existing)} exist(s) already (use --force)")
    out.mkdir(parents=True, exist_ok=True)
    for src in sources:
        atomic_write_text(out / src.name, src.read_text())
    click.echo(f"wrote {len(sources)} configs to {out}: " + " ".join(p.name for p in sources))
    digits = directory / "data" / "digits"
    if no_data or (digits / "test" / "manifest.json").is_file():
        click.echo(f"data: {'skipped' if no_data else f'{digits} exists already'}")
    else:
        from hpcdl.cli.data import shard

        ctx.invoke(shard, source="digits", out=str(digits), chunk_size="4KiB")
    click.echo(f"next: cd {directory} && hpcdl sweep run configs/sweep_digits.yaml --wait")


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    cli.add_command(init)
