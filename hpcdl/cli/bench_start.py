"""``hpcdl bench start`` (a sweep worker's start against ``import torch``) and ``hpcdl bench
ckpt`` (training time lost to checkpoints, synchronous and asynchronous); their own module:
bench.py is full."""

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


@click.command("ckpt")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--steps", default=500, show_default=True, help="Optimizer steps per run.")
@click.option("--every", default=100, show_default=True, help="Steps between checkpoints.")
@click.option("--rounds", default=3, show_default=True, help="Rounds of the three runs.")
@click.option("--site", help="Site profile (same as job.site=NAME).")
@click.option("--local", is_flag=True, help="Run here (under mpiexec/srun: on every rank).")
@click.option("--out", help="Folder for the figures and runs [bench/ckpt-STAMP].")
def ckpt_cmd(config: str, overrides: tuple[str, ...], steps: int, every: int, rounds: int,
             site: str | None, local: bool, out: str | None) -> None:  # fmt: skip
    """CONFIG trained STEPS steps without periodic checkpoints, with a synchronous one and with
    an asynchronous one every EVERY steps, ROUNDS times in one allocation: the training time
    each kind of checkpoint costs."""
    import json

    from hpcdl.cli.bench import _allocation_run
    from hpcdl.train.bench_ckpt import bench_ckpt, render
    from hpcdl.train.config import load_train_config, with_absolute_data
    from hpcdl.train.preflight import preflight

    if every < 1 or rounds < 1 or steps < 2 * every or steps % every:
        raise ConfigError("--steps", "steps/every/rounds",
                          "need rounds >= 1 and STEPS a multiple of EVERY, at least twice it")  # fmt: skip
    cfg = load_train_config(config, [*overrides, *([f"job.site={site}"] if site else [])])
    cfg = with_absolute_data(cfg)
    folder = _out_dir(out, "ckpt")
    if not local:
        preflight(cfg, cfg.job.world_size, cfg.job.gpus_per_node > 0, config)
    fields = cfg.job.model_dump(exclude={"max_requeues"})
    args = (cfg.model_dump(mode="json"), steps, every, rounds, str(folder))
    _allocation_run({**fields, "name": "bench-ckpt"}, bench_ckpt, args, local, folder)
    result = json.loads((folder / "bench_ckpt.json").read_text())
    click.echo("\n".join(render(result)))
    click.echo(f"figures: {folder / 'bench_ckpt.json'}")


def register(cli: click.Group) -> None:
    """Add ``bench start`` and ``bench ckpt`` to the ``bench`` group."""
    bench.add_command(start_cmd)
    bench.add_command(ckpt_cmd)
