"""`hpcdl train CONFIG [key=value ...]`: check everything, then queue a DeepSpeed job (or run here).

The work is :class:`hpcdl.train.run.Run`'s; this module only decides what the user sees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from hpcdl.train.run import Run


@click.command("train")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--site", help="Site profile (same as job.site=NAME).")
@click.option(
    "--local",
    is_flag=True,
    help="Run in this process instead of queueing: one rank, or every rank when started by "
    "mpiexec, srun or torchrun.",
)
@click.option("--wait", is_flag=True, help="Block until the job ends; exit 1 unless it completed.")
def train(
    config: str, overrides: tuple[str, ...], site: str | None, local: bool, wait: bool
) -> None:
    """Train from CONFIG (YAML), with KEY=VALUE overrides such as epochs=5 job.nodes=2.

    Every check (config, datasets, model against the data, batch against the ranks, site
    limits) runs before anything is queued. Each run gets a folder (config.yaml, site.json,
    provenance.json, metrics.jsonl, checkpoints/, model.pt, result.json); pass run_dir=FOLDER to
    resume one, `hpcdl reproduce FOLDER` to train it again and compare. job.nodes=MIN-MAX
    starts on what Slurm has free.
    """
    from hpcdl.train.run import Run

    run = Run.from_config(config, overrides, site=site)
    if local:
        result = run.execute()
        if run.rank == 0:
            _report(run, result["status"].upper())
    else:
        _submit(run, wait)


def _submit(run: Run, wait: bool) -> None:
    handle = run.submit()
    cfg, job = run.config, run.config.job
    click.echo(f"run folder: {run.folder}")
    click.echo(
        f"submitted job {handle.job_id} on {run.site.name} ({job.node_range} node(s) x "
        f"{job.ntasks_per_node} task(s), ZeRO-{cfg.zero_stage}, {cfg.precision})"
    )
    click.echo(f"log (rank 0): {handle.log_paths()[0]}")
    if wait:
        _report(run, run.wait(timeout=7 * 86400, poll=5))


def _report(run: Run, state: str) -> None:
    if state != "COMPLETED" or not (run.folder / "result.json").is_file():
        click.echo(f"training ended {state}; run folder {run.folder}", err=True)
        raise click.exceptions.Exit(1)
    r = run.result()
    click.echo(
        f"completed: {r['step']} steps, {r['epochs']} epochs, val_acc {r['val_acc']:.4f}, "
        f"val_loss {r['val_loss']:.4f} ({run.folder})"
    )


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    cli.add_command(train)
