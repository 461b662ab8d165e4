"""`hpcdl train CONFIG [key=value ...]`: check everything, then queue a DeepSpeed job (or run here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hpcdl.errors import HpcdlError

if TYPE_CHECKING:
    from hpcdl.job import Job
    from hpcdl.train.config import TrainConfig


def make_job(cfg: TrainConfig, run_dir: str, where: str) -> Job:
    """The Slurm (or local) job that runs the training of ``run_dir`` on every task."""
    from hpcdl.job import Job
    from hpcdl.train import run_job

    j = cfg.job
    fields = j.model_dump(exclude={"max_requeues"})
    return Job.from_dict(
        {**fields, "name": cfg.name, "function": run_job, "args": (run_dir,), "requeue": True},
        f"{where}: job",
    )


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
    limits) runs before anything is queued. Each run gets a folder (config.yaml, metrics.jsonl,
    checkpoints/, model.pt, result.json); pass run_dir=FOLDER to resume one.
    """
    from hpcdl.train.config import load_train_config

    cfg = load_train_config(config, [*overrides, *([f"job.site={site}"] if site else [])])
    if local:
        _run_here(cfg, config)
    else:
        _submit(cfg, config, wait)


def _submit(cfg: TrainConfig, where: str, wait: bool) -> None:
    import shutil

    from hpcdl.site import load_site
    from hpcdl.train.config import prepare_run_dir
    from hpcdl.train.preflight import preflight

    site = load_site(cfg.job.site)
    make_job(cfg, "", where).check(site, f"{where}: job")
    preflight(cfg, cfg.job.world_size, cfg.job.gpus_per_node > 0, where)
    run_dir, new = prepare_run_dir(cfg, where)
    try:
        handle = make_job(cfg, str(run_dir), where).submit(site)
    except HpcdlError:
        if new:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    j = cfg.job
    tasks = j.tasks_per_node or j.gpus_per_node or 1
    click.echo(f"run folder: {run_dir}")
    click.echo(
        f"submitted job {handle.job_id} on {site.name} ({j.nodes} node(s) x {tasks} task(s), "
        f"ZeRO-{cfg.zero_stage}, {cfg.precision})"
    )
    click.echo(f"log (rank 0): {handle.log_paths()[0]}")
    if not wait:
        return
    state = handle.wait(timeout=7 * 86400, poll=5)
    _report(run_dir, state)


def _run_here(cfg: TrainConfig, where: str) -> None:
    import torch
    import torch.distributed as dist

    from hpcdl.launch import init_distributed
    from hpcdl.train import finish_distributed
    from hpcdl.train.config import prepare_run_dir
    from hpcdl.train.preempt import PreemptionFlag
    from hpcdl.train.preflight import preflight
    from hpcdl.train.trainer import train as run_training

    flag = PreemptionFlag()
    info = init_distributed()
    preflight(cfg, info.world_size, torch.cuda.is_available(), where)
    box: list[Any] = [None]
    if info.rank == 0:
        try:
            box[0] = prepare_run_dir(cfg, where)[0]
        except HpcdlError as exc:
            box[0] = HpcdlError(str(exc))  # a plain one pickles (ConfigError takes 3 args)
    dist.broadcast_object_list(box, src=0)  # every rank learns the folder, or rank 0's error
    if isinstance(box[0], HpcdlError):
        raise box[0]
    result = run_training(box[0], flag)
    finish_distributed()
    if info.rank == 0:
        _report(box[0], result["status"].upper())


def _report(run_dir: Path, state: str) -> None:
    result_file = run_dir / "result.json"
    if state != "COMPLETED" or not result_file.is_file():
        click.echo(f"training ended {state}; run folder {run_dir}", err=True)
        raise click.exceptions.Exit(1)
    r = json.loads(result_file.read_text())
    click.echo(
        f"completed: {r['step']} steps, {r['epochs']} epochs, val_acc {r['val_acc']:.4f}, "
        f"val_loss {r['val_loss']:.4f} ({run_dir})"
    )


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    cli.add_command(train)
