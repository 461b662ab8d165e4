"""`hpcdl bench` commands: side-by-side measurements printed as ratios."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import click

from hpcdl.cli.progress import bar, spinner
from hpcdl.config import parse_time
from hpcdl.errors import ConfigError, HpcdlError


@click.group()
def bench() -> None:
    """Benchmarks: our path vs. the naive path vs. the raw ceiling, in one run."""


# --- hpcdl bench io (logic in hpcdl.data.bench) ----------------------------------------------
@bench.command("io")
@click.argument("directory")
@click.option("--batch-size", default=1024, show_default=True)
@click.option("--workers", default="0,2", show_default=True, help="DataLoader workers to try.")
@click.option("--threads", default=2, show_default=True, help="Read threads per reader process.")
@click.option("--block-units", default=16, show_default=True, help="Chunks per shuffle block.")
@click.option("--naive-seconds", default=10.0, show_default=True, help="Time bound, naive path.")
@click.option("--repeat", default=3, show_default=True, help="Runs per path (median).")
@click.option("--cold/--no-cold", default=True, show_default=True, help="Drop the page cache.")
def io_cmd(
    directory: str,
    batch_size: int,
    workers: str,
    threads: int,
    block_units: int,
    naive_seconds: float,
    repeat: int,
    cold: bool,
) -> None:
    """Read dataset DIRECTORY: raw read vs. naive per-sample Dataset vs. hpcdl's reader."""
    from rich.console import Console

    from hpcdl.data.bench import render, render_stages, run_io_bench

    try:
        counts = tuple(int(w) for w in workers.split(","))
    except ValueError:
        counts = (-1,)
    if any(w < 0 for w in counts):
        raise ConfigError("--workers", "workers", f"{workers!r}: use counts >= 0 like 0,2")
    for name, value in (("--batch-size", batch_size), ("--repeat", repeat)):
        if value < 1:
            raise ConfigError(name, name.strip("-"), f"{value} must be >= 1")
    if naive_seconds <= 0:
        raise ConfigError("--naive-seconds", "naive_seconds", f"{naive_seconds} must be > 0")
    with bar("bench io: timed runs") as on_progress:
        res = run_io_bench(
            directory,
            batch_size=batch_size,
            workers=counts,
            threads=threads,
            block_units=block_units,
            naive_seconds=naive_seconds,
            repeat=repeat,
            cold=cold,
            on_progress=on_progress,
        )
    console = Console()
    console.print(render(res))
    stages = render_stages(res)
    if stages is not None:
        console.print(stages)
    for note in res.notes:
        console.print(f"note: {note}", markup=False, highlight=False)


# --- hpcdl bench train / comm (logic in hpcdl.train.bench) --------------------------------------
def _allocation_run(
    job_fields: dict[str, Any], function: Any, args: tuple[Any, ...], local: bool, out: Path
) -> None:
    """Run ``function(*args)`` on every rank: here (``--local``: one rank, or every rank under
    mpiexec/srun) or as a job, waiting for it; rank 0 leaves its figures in ``out``."""
    from hpcdl.job import Job
    from hpcdl.scheduler import log_tail

    if local:
        from hpcdl.launch import init_distributed

        if init_distributed().rank != 0:
            function(*args)
            raise click.exceptions.Exit(0)
        with bar(job_fields["name"]) as on_progress:  # loops (train) or message sizes (comm)
            function(*args, on_progress=on_progress)
        return
    job = Job.from_dict({**job_fields, "function": function, "args": args}, "bench job")
    handle = job.submit()
    click.echo(f"job {handle.job_id} on {handle.site} ({handle.tasks} ranks); waiting", err=True)
    minutes = parse_time(job.time) or 60
    with spinner(f"job {handle.job_id}: waiting for it to end"):
        state = handle.wait(timeout=minutes * 60 + 120, poll=2)
    if state != "COMPLETED":
        raise HpcdlError(f"benchmark job {handle.job_id} ended {state}\n{log_tail(handle)}")


def _out_dir(out: str | None, kind: str) -> Path:
    from datetime import datetime

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(out or f"bench/{kind}-{stamp}").expanduser().resolve()


@bench.command("train")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--steps", default=100, show_default=True, help="Optimizer steps per loop and round.")
@click.option("--rounds", default=2, show_default=True, help="Alternations of the two loops.")
@click.option("--site", help="Site profile (same as job.site=NAME).")
@click.option("--local", is_flag=True, help="Run here (under mpiexec/srun: on every rank).")
@click.option("--out", help="Folder for the figures and runs [bench/train-STAMP].")
def train_cmd(
    config: str,
    overrides: tuple[str, ...],
    steps: int,
    rounds: int,
    site: str | None,
    local: bool,
    out: str | None,
) -> None:
    """hpcdl's trainer vs. a minimal hand-written DeepSpeed loop: same model, data, ZeRO stage,
    ranks (CONFIG's job section), alternated in one run; prints the step-time ratio."""
    from rich.console import Console
    from rich.table import Table

    from hpcdl.train.bench import bench_train
    from hpcdl.train.config import load_train_config, with_absolute_data
    from hpcdl.train.preflight import preflight

    for name, value in (("--steps", steps), ("--rounds", rounds)):
        if value < 1:
            raise ConfigError(name, name.strip("-"), f"{value} must be >= 1")
    cfg = load_train_config(config, [*overrides, *([f"job.site={site}"] if site else [])])
    cfg = with_absolute_data(cfg)
    folder = _out_dir(out, "train")
    fields = cfg.job.model_dump(exclude={"max_requeues"})
    if not local:
        preflight(cfg, cfg.job.world_size, cfg.job.gpus_per_node > 0, config)
    args = (cfg.model_dump(mode="json"), steps, rounds, str(folder))
    _allocation_run({**fields, "name": "bench-train"}, bench_train, args, local, folder)
    r = json.loads((folder / "bench_train.json").read_text())
    table = Table(title=f"bench train: {r['model']}, ZeRO-{r['zero_stage']}, {r['precision']}, "
                  f"{r['world_size']} ranks, global batch {r['batch']}")  # fmt: skip
    for col in ("loop", "mean step (ms), per round", "samples/s"):
        table.add_column(col, justify="right" if col != "loop" else "left")
    for name, key in (
        ("hand-written DeepSpeed", "plain_step_s"),
        ("hpcdl trainer", "hpcdl_step_s"),
    ):
        times = r[key]
        table.add_row(
            name,
            ", ".join(f"{t * 1e3:.2f}" for t in times),
            f"{r['batch'] / statistics.median(times):,.0f}",
        )
    console = Console()
    console.print(table)
    console.print(f"throughput ratio hpcdl / hand-written: {r['ratio']:.3f} (goal >= 0.97)")
    console.print(f"figures: {folder / 'bench_train.json'}")


@bench.command("comm")
@click.option("--site", help="Site profile [$HPCDL_SITE or local].")
@click.option("--partition")
@click.option("--nodes", default=2, show_default=True)
@click.option("--tasks-per-node", type=int, help="[one per GPU, else 1]")
@click.option("--gpus-per-node", default=0, show_default=True)
@click.option("--time", "time_", default="00:15:00", show_default=True)
@click.option("--min-size", default="1KiB", show_default=True)
@click.option("--max-size", default="256MiB", show_default=True)
@click.option("--factor", default=4, show_default=True, help="Size ratio between rows.")
@click.option("--budget", default=0.5, show_default=True, help="Seconds timed per size and path.")
@click.option("--local", is_flag=True, help="Run here (under mpiexec/srun: on every rank).")
@click.option("--out", help="Folder for the figures [bench/comm-STAMP].")
def comm_cmd(
    site: str | None,
    partition: str | None,
    nodes: int,
    tasks_per_node: int | None,
    gpus_per_node: int,
    time_: str,
    min_size: str,
    max_size: str,
    factor: int,
    budget: float,
    local: bool,
    out: str | None,
) -> None:
    """All-reduce bus bandwidth by message size over an allocation: DeepSpeed's comm layer (as
    the trainer uses it) vs. raw torch.distributed, to validate a partition's network."""
    from rich.console import Console
    from rich.table import Table

    from hpcdl.data.parse import parse_size
    from hpcdl.train.bench import bench_comm

    lo, hi = (
        parse_size(min_size, "--min-size", "min_size"),
        parse_size(max_size, "--max-size", "max_size"),
    )
    if lo < 4 or hi < lo:
        raise ConfigError(
            "--max-size",
            "max_size",
            f"need 4 B <= --min-size <= --max-size, got {min_size}..{max_size}",
        )
    if factor < 2:
        raise ConfigError("--factor", "factor", f"{factor} must be >= 2")
    if budget <= 0:
        raise ConfigError("--budget", "budget", f"{budget} must be > 0")
    sizes = []
    while lo <= hi:
        sizes.append(lo)
        lo *= factor
    folder = _out_dir(out, "comm")
    fields = {
        "name": "bench-comm", "site": site, "partition": partition, "nodes": nodes,
        "tasks_per_node": tasks_per_node, "gpus_per_node": gpus_per_node, "time": time_,
    }  # fmt: skip
    _allocation_run(fields, bench_comm, (sizes, budget, str(folder)), local, folder)
    r = json.loads((folder / "bench_comm.json").read_text())
    table = Table(
        title=f"bench comm: all-reduce, {r['world_size']} ranks on {r['nodes']} node(s), "
        f"{r['backend']}; hpcdl = DeepSpeed's comm layer, raw = torch.distributed",
        caption="busbw = bytes / time x 2(n-1)/n; hpcdl/raw = speed of hpcdl's path vs. raw",
    )
    for col in ("size", "hpcdl µs", "hpcdl busbw GB/s", "raw µs", "raw busbw GB/s", "hpcdl/raw"):
        table.add_column(col, justify="right")
    for row in r["rows"]:
        table.add_row(
            _human(row["bytes"]),
            f"{row['hpcdl_us']:,.1f}",
            f"{row['hpcdl_busbw_gbs']:.3f}",
            f"{row['torch_us']:,.1f}",
            f"{row['torch_busbw_gbs']:.3f}",
            f"{row['torch_us'] / row['hpcdl_us']:.2f}",
        )
    console = Console()
    console.print(table)
    console.print(f"figures: {folder / 'bench_comm.json'}")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}"
        n //= 1024
    return str(n)


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    cli.add_command(bench)


# --- hpcdl bench hpo (logic in hpcdl.hpo.bench) --------------------------------------------------
@bench.command("hpo")
@click.argument(
    "spec", type=click.Path(dir_okay=False, path_type=Path), default="configs/sweep_digits.yaml"
)
@click.option("--trials", default=32, show_default=True, help="Trial budget of each search.")
@click.option("--seeds", default="5", show_default=True,
              help="Sampler seeds compared: N (0..N-1), A-B or a,b,c (one seed S: S-S).")  # fmt: skip
@click.option("--epochs", default=12, show_default=True, help="Epochs of an unpruned trial.")
@click.option("--site", help="Slurm site for the submission timing (skipped without one).")
@click.option("--array-size", default=1000, show_default=True, help="Trials of the timed array.")
@click.option("--slots", default=0, show_default=True,
              help="Only compare slot efficiency, warm workers vs trials_per_task 1, on --site "
                   "with this many parallel slots (SPEC's sweep, --trials trials).")  # fmt: skip
@click.option("--storage", help="Only the scale runs: 'journal', 'postgres' or both "
              "(journal,postgres): a sweep of --sweep-trials cheap trials per --workers count "
              "on --site, each storage's trials/s and write latency p50/p99.")  # fmt: skip
@click.option("--workers", default="64,256", show_default=True, help="Scale runs' worker counts.")
@click.option("--sweep-trials", default=2000, show_default=True, help="Trials of each scale run.")
@click.option("--postgres", "url", help="Scale runs: postgresql://USER@HOST:PORT/DB [the site's "
              "study_storage].")  # fmt: skip
@click.option("--password-file", help="Scale runs: the database password's file (0600).")
@click.option("--pbt", default=0, show_default=True, help="Only PBT (this interval in epochs) "
              "vs random search, --seeds seeds (hpcdl.hpo.bench_pbt).")  # fmt: skip
@click.option("--pbt-quantile", default=0.25, show_default=True,
              help="With --pbt: the bottom quantile that exploits the top one (at most 0.5).")  # fmt: skip
@click.option("--reuse", "reuse_stamp", metavar="STAMP", help="Read back the searches an earlier "
              "run finished under this stamp (bench-LABEL-sSEED-STAMP), run the rest under it.")  # fmt: skip
def hpo_cmd(
    spec: Path, trials: int, seeds: str, epochs: int, site: str | None, array_size: int,
    slots: int, storage: str | None, workers: str, sweep_trials: int, url: str | None,
    password_file: str | None, pbt: int, pbt_quantile: float, reuse_stamp: str | None,
) -> None:  # fmt: skip
    """ASHA and Hyperband vs. random search (same sampler and budget, --seeds seeds) on SPEC's
    data, in trial-epochs; then the submission and status time of a large sweep array on
    --site. With --storage, only the scale runs (hpcdl.cli.bench_scale)."""
    from datetime import datetime

    if storage is not None:
        from hpcdl.cli.bench_scale import scale_runs

        scale_runs(site, storage, workers, sweep_trials, url, password_file)
        return

    if pbt:  # logic in hpcdl.hpo.bench_pbt
        from hpcdl.hpo.bench import parse_seeds

        seed_list = parse_seeds(seeds)
        if not 0 < pbt_quantile <= 0.5:  # as the spec's pbt.quantile
            raise ConfigError("", "--pbt-quantile", f"{pbt_quantile}: give a number in (0, 0.5]")
        from hpcdl.hpo.bench_pbt import pbt_comparison
        from hpcdl.hpo.bench_pbt import render as render_pbt

        with bar(f"random search and PBT, {len(seed_list)} seed(s)", lines_every_s=60) as progress:
            r = pbt_comparison(spec, trials, epochs,
                               reuse_stamp or datetime.now().strftime("%Y%m%d-%H%M%S"),
                               seed_list, pbt, pbt_quantile, on_progress=progress,
                               reuse=reuse_stamp is not None)  # fmt: skip
        click.echo("\n".join(render_pbt(r)))
        return

    if slots:  # logic in hpcdl.hpo.bench_slots
        from hpcdl.hpo.bench_slots import render, slot_efficiency

        if slots < 1 or site is None or trials < 1:
            raise ConfigError("", "--slots", "give a count >= 1, --site and --trials >= 1")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        with spinner(f"{trials} trials, warm workers then one per task, on {site}"):
            result = slot_efficiency(spec, site, trials, slots, stamp)
        click.echo("\n".join(render(result, site, slots)))
        return

    from hpcdl.hpo.bench import parse_seeds, submission

    if trials < 2 or epochs < 2:
        raise ConfigError("", "--trials/--epochs", "need at least 2 trials and 2 epochs")
    seed_list = parse_seeds(seeds)
    stamp = reuse_stamp or datetime.now().strftime("%Y%m%d-%H%M%S")
    _pruning(spec, trials, epochs, seed_list, stamp, reuse_stamp is not None)
    if site is None:
        click.echo("submission timing skipped (give --site for a Slurm site)")
        return
    with spinner(f"timing a {array_size}-trial sweep on {site}"):
        t = submission(site, array_size, stamp)
    click.echo(f"{array_size}-trial sweep on {site}: submit {t['submit_s']:.2f} s, sweep status "
               f"{t['sweep_status_s']:.2f} s, job states of {t['tasks']} tasks {t['job_states_s']:.2f} s "
               "(goal < 2 s each)")  # fmt: skip


def _pruning(
    spec: Path, trials: int, epochs: int, seeds: list[int], stamp: str, reuse: bool
) -> None:
    """Print the pruning comparison: one table row per seed, then each pruner's ratios to random
    search (median and spread over the seeds)."""
    from rich.console import Console
    from rich.table import Table

    from hpcdl.hpo.bench import SEARCHES, pruning

    label = f"random, ASHA, Hyperband: {trials} trials each, {len(seeds)} seed(s)"
    with bar(label, lines_every_s=60) as on_progress:  # ~20 min for the defaults
        r = pruning(spec, trials, epochs, stamp, seeds, on_progress, reuse)
    table = Table(title=f"trial-epochs to reach random search's best (per seed), and in all "
                        f"({trials} trials, up to {epochs} epochs)")  # fmt: skip
    for col in ("seed", "target", *[f"{x} to target" for x in SEARCHES],
                *[f"{x} in all" for x in SEARCHES], "pruned asha/hb"):  # fmt: skip
        table.add_column(col, justify="right")
    for row in r["seeds"]:
        reach = [row[x]["epochs_to_target"] for x in SEARCHES]
        table.add_row(str(row["seed"]), f"{row['target']:.4f}",
                      *["not reached" if v is None else str(v) for v in reach],
                      *[str(row[x]["epochs_total"]) for x in SEARCHES],
                      f"{row['asha']['pruned']}/{row['hyperband']['pruned']}")  # fmt: skip
    Console().print(table)
    for key, what in (("ratio_to_target", "epochs to target"), ("ratio_total", "epochs in all")):
        for label, name in (("asha", "ASHA"), ("hyperband", "Hyperband")):
            x = r["summary"][label][key]
            tail = (f"; random's best not reached in {x['not_reached']}/{x['seeds']} (goal <= 0.33)"
                    if key == "ratio_to_target" else "")  # fmt: skip
            click.echo(f"{name} / random, {what}: median {x['median']:.2f}, quartiles "
                       f"{x['q1']:.2f}-{x['q3']:.2f}, range {x['min']:.2f}-{x['max']:.2f} over "
                       f"{x['seeds']} seed(s){tail}")  # fmt: skip
    # Optuna's ASHA (no max_rungs) on the same curves, without training again (hpcdl.hpo.replay)
    x = r["summary"]["asha_uncapped"]["ratio_to_target"]
    click.echo(f"ASHA without max_rungs (replayed on random's curves) / random, epochs to target: "
               f"median {x['median']:.2f}, quartiles {x['q1']:.2f}-{x['q3']:.2f}, range "
               f"{x['min']:.2f}-{x['max']:.2f}; random's best not reached in "
               f"{x['not_reached']}/{x['seeds']}")  # fmt: skip
    agree = sum(row["replayed"]["agrees"] for row in r["seeds"])
    click.echo(f"replaying the live ASHA and Hyperband runs on random's curves gave the epochs "
               f"each trial ran in {agree}/{len(r['seeds'])} seed(s)")  # fmt: skip
