"""``hpcdl reproduce RUN``: train a run again from what its folder recorded and compare. The
work is :mod:`hpcdl.train.reproduce`'s; this module only decides what the user sees."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("reproduce")
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Folder of the re-run (new); default: RUN/reproduced/STAMP.",
)
@click.option(
    "--site",
    help="Where a run of several ranks is re-run (default: the recorded site); one rank runs "
    "here, in a new process.",
)
@click.option(
    "--any-code",
    is_flag=True,
    help="Re-run even though this checkout is not at the recorded commit and diff.",
)
def reproduce(run_dir: str, out: str | None, site: str | None, any_code: bool) -> None:
    """Re-run the completed run RUN (a final model, a sweep trial) from its recorded config,
    seeds, data manifests and code, then compare metrics, result and weights. Exit 0 when the
    re-run is bit-identical, 1 when it differs (each difference printed), 2 when RUN lacks what
    a re-run needs or its data or code changed."""
    from hpcdl.train.reproduce import check, compare, default_out, rerun

    folder = Path(run_dir).expanduser().resolve()
    plan = check(folder, any_code=any_code)
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)
    target = Path(out).expanduser().resolve() if out else default_out(folder)
    click.echo(f"re-running {folder} on {plan.world} rank(s) into {target}")
    rerun(plan, target, site=site)
    diffs, counted = compare(folder, target)
    if diffs:
        click.echo(f"the re-run differs from the recorded run ({len(diffs)} difference(s)):")
        for line in diffs:
            click.echo(f"  {line}")
        raise click.exceptions.Exit(1)
    r = plan.result
    click.echo(
        f"bit-identical: {counted['rows']} metric rows, {r['step']} steps, {r['epochs']} epochs, "
        f"val_acc {r['val_acc']:.4f}, {counted['tensors']} weight tensors equal"
    )


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    cli.add_command(reproduce)
