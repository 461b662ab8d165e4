"""``hpcdl bench hpo --storage journal|postgres --workers 64,256``: sweeps of a cheap objective
on a Slurm site, one per storage and worker count (logic in hpcdl.hpo.bench_scale)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from hpcdl.cli.progress import bar
from hpcdl.errors import ConfigError, HpcdlError

STORAGES = {"journal": "journal", "postgres": "postgresql", "postgresql": "postgresql"}


def _counts(text: str) -> list[int]:
    try:
        counts = [int(w) for w in text.split(",")]
    except ValueError:
        counts = [0]
    if not counts or min(counts) < 1:
        raise ConfigError("--workers", "workers", f"{text!r}: use counts >= 1 like 64,256")
    return counts


def _database(site: str, url: str | None, password_file: str | None) -> Any:
    """The database the postgres runs use: --postgres, else the site's study_storage."""
    from pydantic import ValidationError

    from hpcdl.database import StudyDatabase
    from hpcdl.site import load_site

    if url:
        try:
            return StudyDatabase(url=url, password_file=password_file)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError("--postgres", "url", problem) from None
    db = load_site(site).study_storage
    if db is None or db.journal:
        raise ConfigError("--storage", "postgres", f"site {site!r} has no study_storage "
                          "database: give --postgres URL (and --password-file)")  # fmt: skip
    return db


def scale_runs(
    site: str | None, storage: str, workers: str, trials: int, url: str | None,
    password_file: str | None,
) -> None:  # fmt: skip
    """One sweep per storage and worker count, measured; the table, and the figures in
    bench/hpo-scale-STAMP/bench_scale.json."""
    from hpcdl.hpo import bench_scale as b

    kinds = [k.strip() for k in storage.split(",") if k.strip()]
    if not kinds or any(k not in STORAGES for k in kinds):
        raise ConfigError("--storage", "storage", f"{storage!r}: use journal, postgres or both")
    if site is None:
        raise ConfigError("--storage", "site", "the scale runs need --site (a Slurm site)")
    if trials < 1:
        raise ConfigError("--sweep-trials", "sweep-trials", f"{trials} must be >= 1")
    counts = _counts(workers)
    db = _database(site, url, password_file) if "postgres" in {k[:8] for k in kinds} else None
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    folder = Path(f"bench/hpo-scale-{stamp}").resolve()  # as the other benches' folders
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        for n in counts:
            name = f"bench-scale-{STORAGES[kind][:4]}-{n}-{stamp}"
            spec = b.scale_spec(name, site, trials, n, db if kind != "journal" else None)
            with bar(
                f"{STORAGES[kind]}, {n} workers: {trials} trials", lines_every_s=30
            ) as on_progress:
                row = b.run_one(spec, timeout=3600, on_progress=on_progress)
            rows.append(row)
            (folder / "bench_scale.json").write_text(json.dumps(rows, indent=1))
            if row["problems"]:
                raise HpcdlError(f"sweep {name}: " + "; ".join(row["problems"]))
    click.echo("\n".join(b.render(rows)))
    click.echo(f"figures: {folder / 'bench_scale.json'}")
