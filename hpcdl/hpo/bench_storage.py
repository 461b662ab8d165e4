"""``hpcdl bench storage``: the study storages side by side, in one run.

- **writers**: N concurrent processes (1, 8, 32 by default) each record cheap trials (ask, one
  parameter, tell: what a worker does per trial) into one study: the latency of recording a
  trial (p50, p99) and the trials recorded per second, for the journal file and for
  PostgreSQL, each as hpcdl opens them (one storage per process) and as Optuna's naive path (a
  fresh ``optuna.load_study`` per trial: the journal replayed, a new connection every time);
- **inspection**: ``hpcdl sweep status`` and ``hpcdl sweep best`` (fresh processes, as a user
  runs them) on a sweep of N finished trials on each storage (trials added cheaply with
  ``study.add_trials``, one slot file each).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna

from hpcdl.database import StudyDatabase
from hpcdl.errors import HpcdlError
from hpcdl.hpo.folder import Slot, SweepPaths
from hpcdl.hpo.spec import SweepSpec
from hpcdl.hpo.storage import (
    _DATABASES,
    check,
    journal_storage,
    open_storage,
    password,
    study_name,
)

PATHS = ("hpcdl", "naive")  # one storage per process; a fresh load_study per trial


def _rdb_url(db: StudyDatabase, where: str) -> tuple[str, dict[str, Any]]:
    """SQLAlchemy URL and engine arguments (the password as a connect argument, not in the URL)."""
    pw = password(db, where)
    args: dict[str, Any] = {"connect_args": {"connect_timeout": 10}}
    if pw is not None:
        args["connect_args"]["password"] = pw
    return db.sqlalchemy_url, args


def _open(kind: str, target: str, db: StudyDatabase | None) -> optuna.storages.BaseStorage:
    if kind == "journal":
        return journal_storage(Path(target))
    assert db is not None
    url, args = _rdb_url(db, "bench storage")
    return optuna.storages.RDBStorage(url, engine_kwargs=args)


def _writer(
    kind: str, path: str, target: str, db: StudyDatabase | None, name: str, trials: int,
    seed: int, start_at: float, out: Any,
) -> None:  # fmt: skip
    """One writer process: record ``trials`` trials, put ``(latencies, first start, last end)``
    (or the error's text: a writer that fails must not leave the bench waiting)."""
    try:
        out.put(_record(kind, path, target, db, name, trials, seed, start_at))
    except Exception as exc:
        out.put(f"{kind} {path} writer {seed}: {type(exc).__name__}: {exc}".splitlines()[0])


def _record(
    kind: str, path: str, target: str, db: StudyDatabase | None, name: str, trials: int,
    seed: int, start_at: float,
) -> tuple[list[float], float, float]:  # fmt: skip
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.RandomSampler(seed=seed)
    study = None if path == "naive" else optuna.load_study(study_name=name, storage=_open(kind, target, db), sampler=sampler)  # fmt: skip
    time.sleep(max(0.0, start_at - time.time()))  # every writer starts together
    lat, begin = [], time.time()
    for _ in range(trials):
        t0 = time.perf_counter()
        if path == "naive":  # what a script without hpcdl does: load the study for each trial
            store = _open(kind, target, db)
            study = optuna.load_study(study_name=name, storage=store, sampler=sampler)
        assert study is not None
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0.0, 1.0))
        lat.append(time.perf_counter() - t0)
        if path == "naive" and isinstance(store, optuna.storages.RDBStorage):
            # Closed at once: left to the garbage collector, 32 writers' abandoned pools
            # exceeded the server's 200 connections ("too many clients").
            store.engine.dispose()
    return lat, begin, time.time()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def writers_row(
    kind: str, path: str, n: int, trials: int, target: str, db: StudyDatabase | None,
    name: str,
) -> dict[str, Any]:  # fmt: skip
    """``n`` writer processes on a new study: latency p50/p99 (ms) and trials per second."""
    store = _open(kind, target, db)
    optuna.create_study(study_name=name, storage=store)
    if isinstance(store, optuna.storages.RDBStorage):
        store.engine.dispose()  # no pooled connection may cross the fork below
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 1.0 + 0.05 * n  # after every writer has opened its storage
    procs = [ctx.Process(target=_writer, args=(kind, path, target, db, name, trials, i,
                                               start_at, out)) for i in range(n)]  # fmt: skip
    for p in procs:
        p.start()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        raise HpcdlError(f"bench storage: {len(errors)} writer(s) failed, first: {errors[0]}")
    lat = [x for r in results for x in r[0]]
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    return {"storage": kind, "path": path, "writers": n, "trials": len(lat),
            "p50_ms": _pct(lat, 0.5) * 1e3, "p99_ms": _pct(lat, 0.99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3, "trials_per_s": len(lat) / wall}  # fmt: skip


def run_writers(
    writers: list[int], trials: int, naive_trials: int, folder: Path, db: StudyDatabase | None,
    stamp: str, on_progress: Any = None,
) -> list[dict[str, Any]]:  # fmt: skip
    kinds = ["journal", *(["postgresql"] if db is not None else [])]
    plan = [(k, p, n) for n in writers for k in kinds for p in PATHS]
    rows = []
    for i, (kind, path, n) in enumerate(plan):
        target = str(folder / f"{kind}-{path}-{n}")
        Path(target).mkdir(parents=True, exist_ok=True)
        count = trials if path == "hpcdl" else naive_trials
        rows.append(writers_row(kind, path, n, count, target, db, f"bench-{stamp}-{path}-{n}"))
        (folder / "writers.partial.json").write_text(json.dumps(rows, indent=1))
        if on_progress is not None:
            on_progress(i + 1, len(plan))
    return rows


# -- sweep status / best on a large finished sweep ---------------------------------------------------
def fake_sweep(spec: SweepSpec, paths: SweepPaths) -> None:
    """A finished sweep of ``spec.trials`` trials, made without running one: the study's trials
    by ``add_trials``, a slot file each, the spec written as ``sweep run`` writes it."""
    check(spec, "bench storage")  # as `sweep run`: a database gets Optuna's tables
    paths.slots.mkdir(parents=True, exist_ok=True)
    paths.spec.write_text(spec.model_dump_json(indent=1))
    store = open_storage(spec, paths.root)
    study = optuna.create_study(study_name=study_name(spec), storage=store, direction="maximize")
    dist: dict[str, optuna.distributions.BaseDistribution] = {
        "x": optuna.distributions.FloatDistribution(0.0, 1.0)
    }
    xs = [(i * 0.618034) % 1.0 for i in range(spec.trials)]
    study.add_trials([optuna.trial.create_trial(params={"x": x}, distributions=dist,
                                                value=1 - (x - 0.3) ** 2) for x in xs])  # fmt: skip
    for i, x in enumerate(xs):
        paths.write_slot(Slot(slot=i, trial=i, params={"x": x}, run_id=f"{spec.name}-t{i:05d}",
                              state="complete", value=1 - (x - 0.3) ** 2, epochs=1))  # fmt: skip


def time_inspection(
    trials: int, job_root: Path, db: StudyDatabase | None, stamp: str
) -> list[dict[str, Any]]:
    """Wall time of ``hpcdl sweep status`` and ``sweep best`` (new processes) per storage."""
    from hpcdl.hpo.storage import resolve
    from hpcdl.site import load_site

    os.environ["HPCDL_JOB_ROOT"] = str(job_root)  # the bench's sweeps stay in its folder
    rows = []
    for kind, storage in (("journal", "journal"), ("postgresql", db)):
        if storage is None:
            continue
        name = f"bench-inspect-{kind}-{stamp}"
        spec = SweepSpec.model_validate({
            "name": name, "objective": "hpcdl.hpo.bench:idle", "trials": trials, "final": False,
            "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
            "storage": storage, "resources": {"site": "local"}})  # fmt: skip
        spec = resolve(spec, load_site("local"))
        t0 = time.monotonic()
        fake_sweep(spec, SweepPaths(job_root / "sweeps" / name))
        made = time.monotonic() - t0
        row: dict[str, Any] = {"storage": kind, "trials": trials, "made_s": made}
        for cmd in ("status", "best"):
            t0 = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "hpcdl", "sweep", cmd, name],
                                  capture_output=True, text=True, timeout=600)  # fmt: skip
            row[f"{cmd}_s"] = time.monotonic() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"sweep {cmd} {name} failed: {proc.stderr.strip()}")
        rows.append(row)
    _DATABASES.clear()
    return rows


def render(rows: list[dict[str, Any]], inspect: list[dict[str, Any]]) -> list[str]:
    """The table (80 columns)."""
    out = ["storage     path    writers  trials   p50 ms    p99 ms   trials/s",
           "----------  ------  -------  ------  --------  --------  ---------"]  # fmt: skip
    for r in rows:
        out.append(f"{r['storage']:<10}  {r['path']:<6}  {r['writers']:>7}  {r['trials']:>6}  "
                   f"{r['p50_ms']:>8.1f}  {r['p99_ms']:>8.1f}  {r['trials_per_s']:>9.1f}")  # fmt: skip
    if inspect:
        out += ["", "storage     trials   made s  sweep status s  sweep best s",
                "----------  ------  -------  --------------  ------------"]  # fmt: skip
        for r in inspect:
            out.append(f"{r['storage']:<10}  {r['trials']:>6}  {r['made_s']:>7.1f}  "
                       f"{r['status_s']:>14.2f}  {r['best_s']:>12.2f}")  # fmt: skip
    return out
