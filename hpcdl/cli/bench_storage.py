"""`hpcdl bench storage`: the study storages side by side (logic in hpcdl.hpo.bench_storage)."""

from __future__ import annotations

import json

import click

from hpcdl.cli.bench import _out_dir, bench
from hpcdl.cli.progress import bar, spinner
from hpcdl.errors import ConfigError


@click.command("storage")
@click.option("--writers", default="1,8,32", show_default=True, help="Concurrent writer counts.")
@click.option("--trials", default=40, show_default=True, help="Trials per writer (hpcdl's path).")
@click.option("--naive-trials", default=10, show_default=True, help="Trials per writer, naive.")
@click.option("--postgres", "url", help="postgresql://USER@HOST:PORT/DB [the site's study_storage]")
@click.option("--password-file", help="The database password's file (0600) [~/.pgpass].")
@click.option("--site", help="Site profile whose study_storage is the database.")
@click.option("--inspect", default=10_000, show_default=True,
              help="Trials of the sweep timed by 'sweep status/best' (0: skip).")  # fmt: skip
@click.option("--out", help="Folder for the figures and studies [bench/storage-STAMP].")
def storage_cmd(
    writers: str, trials: int, naive_trials: int, url: str | None, password_file: str | None,
    site: str | None, inspect: int, out: str | None,
) -> None:  # fmt: skip
    """Study storages side by side: N writer processes recording trials (latency p50/p99,
    trials/s) on the journal file and PostgreSQL, hpcdl's way and Optuna's naive way; then
    'sweep status' and 'sweep best' on a sweep of --inspect finished trials."""
    from datetime import datetime

    from pydantic import ValidationError

    from hpcdl.database import StudyDatabase
    from hpcdl.hpo import bench_storage as b
    from hpcdl.site import load_site

    try:
        counts = [int(w) for w in writers.split(",")]
    except ValueError:
        counts = [0]
    if not counts or min(counts) < 1:
        raise ConfigError("--writers", "writers", f"{writers!r}: use counts >= 1 like 1,8,32")
    if min(trials, naive_trials) < 1 or inspect < 0:
        raise ConfigError("", "--trials/--naive-trials/--inspect", "need >= 1 (--inspect >= 0)")
    db = None if url else load_site(site).study_storage if site else None
    if url:
        try:
            db = StudyDatabase(url=url, password_file=password_file)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError("--postgres", "url", problem) from None
    db = None if db is None or db.journal else db
    folder = _out_dir(out, "storage")
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    with bar("bench storage: writers") as on_progress:
        rows = b.run_writers(counts, trials, naive_trials, folder, db, stamp, on_progress)
    inspect_rows = []
    if inspect:
        with spinner(f"sweep status/best on {inspect} finished trials"):
            inspect_rows = b.time_inspection(inspect, folder / "jobs", db, stamp)
    (folder / "bench_storage.json").write_text(
        json.dumps({"writers": rows, "inspect": inspect_rows}, indent=1)
    )
    click.echo("\n".join(b.render(rows, inspect_rows)))
    if db is None:
        click.echo("PostgreSQL not measured: give --postgres URL (or a --site with study_storage)")
    click.echo(f"figures: {folder / 'bench_storage.json'}")


def register(cli: click.Group) -> None:
    """Add ``bench storage`` to the ``bench`` group (its own module: bench.py is full)."""
    bench.add_command(storage_cmd)
