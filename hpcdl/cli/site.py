"""``hpcdl site list | show | check | import``: site profiles for admins."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from hpcdl.errors import ConfigError


@click.group()
def site() -> None:
    """Site profiles: list where they come from, show them, check them against the live cluster, draft one."""


@site.command("list")
def list_sites() -> None:
    """Profiles on the search path and where each comes from.

    Searched in order, first match wins: $HPCDL_SITE_PATH, the user's folder
    (~/.config/hpcdl/sites), the system's (/etc/hpcdl/sites, /etc/xdg/hpcdl/sites), then the
    package's (the built-in 'local' profile and examples). Never ./site: a profile there is
    used only when named (--site ./site/NAME.yaml, or the folder in $HPCDL_SITE_PATH)."""
    from hpcdl.site import default_site_name, name_mismatch, site_origins, site_search_path

    origins = site_origins()
    width = max((len(name) for name in origins), default=0) + len(" (default)")
    for name, (path, origin) in sorted(origins.items()):
        mark = " (default)" if name == default_site_name() else ""
        click.echo(f"{name + mark:<{width}}  {origin:<15}  {path}")
    click.echo("searched: " + ", ".join(str(d) for d, _ in site_search_path()), err=True)
    for stem, (path, _) in sorted(origins.items()):
        inner = name_mismatch(path)
        if inner is not None:  # --site picks files by name: this one is picked and refused
            other = origins.get(inner)
            then = f"picks {other[0]}" if other else "finds no profile"
            click.echo(f"hpcdl: warning: {path}: name: {inner!r} differs from the file name "
                       f"{stem!r}: '--site {stem}' picks this file and refuses it, "
                       f"'--site {inner}' {then}; rename one", err=True)  # fmt: skip


def _complete_site(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion: the profile names on the search path."""
    from hpcdl.site import available_sites

    return [name for name in available_sites() if name.startswith(incomplete)]


@site.command()
@click.argument("name", shell_complete=_complete_site)
def show(name: str) -> None:
    """Print a profile: partitions and their limits, accounts, modules, environment."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from hpcdl.site import load_site

    profile = load_site(name)
    console = Console()
    # profile values are plain text to rich, never markup ('[/x]' in a description)
    console.print(
        f"[bold]{escape(profile.name)}[/bold] ({profile.scheduler}) {escape(profile.description)}"
    )
    if profile.partitions:
        table = Table(title="partitions (* = default)")
        for col in ("name", "max time", "max nodes", "cpus/node", "mem/node", "gpus/node"):
            table.add_column(col)
        for row in profile.summary_rows():
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
        for line in _partition_rules(profile):
            console.print(f"  {line}", highlight=False, markup=False)
    facts = {
        "accounts": ", ".join(profile.accounts) or "-",
        "qos": ", ".join(profile.qos) or "-",
        "modules": " ".join(profile.modules) or "-",
        "setup": "; ".join(profile.setup) or "-",
        "launchers": "; ".join(_launcher(k, v) for k, v in profile.launchers.items()) or "-",
        "env": " ".join(f"{k}={v}" for k, v in profile.env.items()) or "-",
        "secrets": ", ".join(map(str, profile.secrets)) or "-",
        "container": profile.container.runtime
        + (f" {profile.container.image}" if profile.container.image else ""),
        "job root": str(profile.job_root_path),
        "scratch": profile.scratch or "-",
        "preemption": f"SIG{profile.preemption.signal} {profile.preemption.delay_s}s before the limit",
        "wandb": profile.wandb_mode,
    }
    for key, value in facts.items():
        console.print(f"  {key}: {value}", markup=False)


def _launcher(name: str, preset: Any) -> str:
    """``srun --mpi=pmi2``, ``torchrun LOGLEVEL=WARNING``: what the site adds to a launcher."""
    parts = [f"--mpi={preset.mpi}"] if preset.mpi else []
    return " ".join([name, *parts, *(f"{k}={v}" for k, v in preset.env.items())])


def _partition_rules(profile: Any) -> list[str]:
    """One line per partition with node features or an sbatch policy (defaults, required, denied)."""
    lines = []
    for p in profile.partitions:
        pol = p.policy
        parts = [f"features {','.join(p.features)}"] if p.features is not None else []
        parts += [
            f"default --{k}" + ("" if v is True else f"={v}") for k, v in pol.defaults.items()
        ]
        for verb, keys in (("requires", pol.required), ("denies", pol.denied)):
            parts += [f"{verb} " + ", ".join(f"--{k}" for k in keys)] if keys else []
        if parts:
            lines.append(f"{p.name}: " + "; ".join(parts))
    return lines


@site.command()
@click.argument("name", shell_complete=_complete_site)
def check(name: str) -> None:
    """Compare a profile with the live cluster; exit 1 and list each disagreement."""
    from hpcdl.scheduler import check_site, get_scheduler
    from hpcdl.site import default_fit_problems, load_site, site_origins

    profile = load_site(name)
    path = Path(name)
    if name.endswith((".yaml", ".yml")) and path.stem != profile.name:
        # In a sites folder it would be refused; by path it loads, so say it before it is installed
        click.echo(f"hpcdl: warning: {name}: name: {profile.name!r} differs from the file name "
                   f"{path.stem!r}: rename one (installed on the search path it would be "
                   "refused)", err=True)  # fmt: skip
    file = path if name.endswith((".yaml", ".yml")) or "/" in name else site_origins()[name][0]
    for field, problem in default_fit_problems(profile):  # the profile alone: no cluster needed
        click.echo(f"hpcdl: warning: {file}: {field}: {problem}", err=True)
    if not get_scheduler(profile).queued:  # no batch system behind the profile
        click.echo(f"{profile.name}: local profile, nothing to compare")
        return
    problems = check_site(profile)
    for problem in problems:
        click.echo(f"{profile.name}: {problem}")
    if problems:
        click.echo(f"{len(problems)} disagreement(s) with the live cluster", err=True)
        sys.exit(1)
    click.echo(f"{profile.name}: matches the live cluster ({len(profile.partitions)} partitions)")


@site.command("import")
@click.option("--name", default="imported", show_default=True, help="Profile name.")
@click.option(
    "--output", "-o", type=click.Path(path_type=Path), help="Write here (default: stdout)."
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def import_(name: str, output: Path | None, force: bool) -> None:
    """Draft a profile from the live cluster (scontrol, sinfo)."""
    import yaml

    from hpcdl.scheduler import import_site
    from hpcdl.util import atomic_write_text

    if output is not None and output.exists() and not force:
        raise ConfigError(str(output), "", "exists already (use --force to overwrite)")
    text = yaml.safe_dump(import_site(name), sort_keys=False)
    if output is None:
        click.echo(text, nl=False)
        return

    make_private_dirs(output.parent)  # ~/.config/hpcdl/sites on a new machine
    atomic_write_text(output, text)  # an exclusive temporary: a planted symlink is not followed
    click.echo(f"wrote {output}; review it, then 'hpcdl site check {output}'")


def make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and any missing parent, each readable by its owner only (0700, as
    ~/.config should be); folders that exist keep their mode."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
        path.chmod(0o700)  # mkdir's mode is masked by the umask


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    cli.add_command(site)
