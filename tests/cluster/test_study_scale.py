"""Studies at scale (issue 21), on this file's own PostgreSQL server (test_sweep_postgres's
fixture, local profile, no Slurm):

- ``sweep best`` reads the best trial with one query, and it is Optuna's best trial (a table of
  studies: both directions, infinities, failed, pruned and running trials, every distribution);
- ``sweep best`` < 1 s and ``sweep status`` < 2 s on a 10,000-trial sweep on PostgreSQL
  (status also on the journal), as fresh ``hpcdl`` processes;
- ``sweep move-storage`` moves a sweep's study from its journal to the database: refused while
  the sweep runs, then cancel → move → resume finishes it in the database with every trial
  once; bad input is one line, exit 2, the sweep left on its journal.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psycopg
import pytest
import test_sweep_postgres as pgtest
from test_registry_scale import run_measured

from hpcdl.cli import main
from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.bench_storage import fake_sweep
from hpcdl.hpo.folder import SweepPaths
from hpcdl.hpo.storage import best_in_database, resolve
from hpcdl.site import load_site

# test_sweep_postgres's server and password file (a session's server per file that uses them)
PG_USER, Postgres, spec = pgtest.PG_USER, pgtest.Postgres, pgtest.spec
postgres, password_file = pgtest.postgres, pgtest.password_file

D = optuna.distributions
TS = optuna.trial.TrialState
DISTS: dict[str, D.BaseDistribution] = {
    "lr": D.FloatDistribution(1e-5, 1e-1, log=True),
    "layers": D.IntDistribution(1, 8),
    "act": D.CategoricalDistribution(["relu", "tanh", None, 3]),
    "drop": D.FloatDistribution(0.0, 0.5, step=0.1),
}


def _trial(i: int, value: float | None, state: TS = TS.COMPLETE) -> optuna.trial.FrozenTrial:
    params = {"lr": 10 ** -(1 + i % 4), "layers": 1 + i % 8, "act": ["relu", "tanh", None, 3][i % 4],
              "drop": round(0.1 * (i % 6), 1)}  # fmt: skip
    return optuna.trial.create_trial(state=state, value=value, params=params, distributions=DISTS,
                                     intermediate_values={0: 0.5} if state == TS.PRUNED else None)  # fmt: skip


# (values of the complete trials in order; the extra trials every study also has)
STUDIES = {
    "finite": [0.3, 0.9, -2.0, 0.5],
    "infinities": [0.3, math.inf, -math.inf, 0.5],
    "only-minus-inf": [-math.inf, 0.1],
    "one": [7.0],
}


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize("kind", list(STUDIES))
def test_best_in_one_query_is_optunas_best_trial(postgres, password_file, kind, direction):
    url = f"postgresql+psycopg://{PG_USER}:{postgres.password}@127.0.0.1:{postgres.port}/hpo"
    name = f"best-{kind}-{direction}-{os.getpid()}"
    study = optuna.create_study(study_name=name, storage=url, direction=direction)
    study.add_trial(_trial(0, None, TS.FAIL))
    for i, v in enumerate(STUDIES[kind], start=1):
        study.add_trial(_trial(i, v))
        study.add_trial(_trial(100 + i, None, TS.PRUNED))  # pruned: no value of its own
    study.add_trial(_trial(99, None, TS.RUNNING))
    db = optuna.load_study(study_name=name, storage=url).best_trial
    got = best_in_database(_db(postgres, password_file), name, "test")
    assert got == (db.number, db.value, db.params), (got, db)


def test_best_of_a_study_without_complete_trials_or_without_study_is_none(postgres, password_file):
    url = f"postgresql+psycopg://{PG_USER}:{postgres.password}@127.0.0.1:{postgres.port}/hpo"
    name = f"best-none-{os.getpid()}"
    optuna.create_study(study_name=name, storage=url).add_trial(_trial(0, None, TS.FAIL))
    db = _db(postgres, password_file)
    assert best_in_database(db, name, "test") is None
    assert best_in_database(db, f"no-such-{os.getpid()}", "test") is None


def _db(postgres: Postgres, password_file: Path):
    from hpcdl.database import StudyDatabase

    return StudyDatabase(url=postgres.url(), password_file=str(password_file))


# -- sweep best / status on 10,000 trials ---------------------------------------------------------
TRIALS = 10_000


def _sql(postgres: Postgres) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=postgres.port, user=PG_USER, dbname="hpo",
                           password=postgres.password, autocommit=True)  # fmt: skip


def _big_postgres_sweep(spec_: SweepSpec, paths: SweepPaths, postgres: Postgres) -> None:
    """``fake_sweep``'s sweep with ``TRIALS`` trials in PostgreSQL in seconds, not the 80 s of
    Optuna's add_trials: fake_sweep writes the first trial (Optuna's own rows), then SQL copies
    its rows under the other numbers, values and parameters fake_sweep would have given them."""
    one = spec_.model_copy(update={"trials": 1})
    fake_sweep(one, paths)
    paths.spec.write_text(spec_.model_dump_json(indent=1))
    with _sql(postgres) as conn:
        (study_id,) = conn.execute("SELECT study_id FROM studies WHERE study_name = %s",
                                   (spec_.storage.study,)).fetchone()  # fmt: skip
        conn.execute(
            """
            WITH new AS (
                INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete)
                SELECT n, t.study_id, t.state, t.datetime_start, t.datetime_complete
                FROM trials t, generate_series(1, %(last)s) n WHERE t.study_id = %(study)s
                RETURNING trial_id, number
            ), x AS (SELECT trial_id, number * 0.618034::float8 - floor(number * 0.618034::float8) AS x
                  FROM new),
            v AS (INSERT INTO trial_values (trial_id, objective, value, value_type)
                  SELECT trial_id, 0, 1 - (x - 0.3::float8) ^ 2, 'FINITE' FROM x)
            INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json)
            SELECT x.trial_id, p.param_name, x.x, p.distribution_json FROM x, trial_params p
            JOIN trials t ON t.trial_id = p.trial_id WHERE t.study_id = %(study)s
            AND t.number = 0
            """,
            {"last": TRIALS - 1, "study": study_id},
        )
    from hpcdl.hpo.folder import Slot

    for i in range(1, TRIALS):
        x = (i * 0.618034) % 1.0
        paths.write_slot(Slot(slot=i, trial=i, params={"x": x}, run_id=f"{spec_.name}-t{i:05d}",
                              state="complete", value=1 - (x - 0.3) ** 2, epochs=1))  # fmt: skip


@pytest.fixture(scope="module")
def big_sweeps(postgres, tmp_path_factory) -> Iterator[tuple[Path, dict[str, str]]]:
    """The two 10,000-trial sweeps, built once: ``{storage: sweep name}`` under one job root."""
    root = tmp_path_factory.mktemp("big") / "jobs"
    pw = root.parent / "pgpassword"
    pw.write_text(postgres.password + "\n")
    pw.chmod(0o600)
    old = os.environ.get("HPCDL_JOB_ROOT")
    os.environ["HPCDL_JOB_ROOT"] = str(root)
    names = {}
    try:
        for kind, storage in (("journal", "journal"),
                              ("postgresql", {"url": postgres.url(), "password_file": str(pw)})):  # fmt: skip
            name = names[kind] = f"big-{kind}"
            s = SweepSpec.model_validate({
                "name": name, "objective": "hpcdl.hpo.bench:idle", "trials": TRIALS,
                "final": False, "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
                "storage": storage, "resources": {"site": "local"}})  # fmt: skip
            s = resolve(s, load_site("local"))
            paths = SweepPaths(root / "sweeps" / name)
            if kind == "journal":
                fake_sweep(s, paths)
            else:
                _big_postgres_sweep(s, paths, postgres)
        yield root, names
    finally:
        if old is None:
            os.environ.pop("HPCDL_JOB_ROOT", None)
        else:
            os.environ["HPCDL_JOB_ROOT"] = old


def _timed(root: Path, *args: str) -> tuple[float, float, str]:
    """Wall and CPU seconds (user + system of the process) of ``hpcdl ARGS`` and its output."""
    env = {**os.environ, "HPCDL_JOB_ROOT": str(root)}
    wall, cpu, proc = run_measured([sys.executable, "-m", "hpcdl", *args], env)
    assert proc.returncode == 0, proc.stderr
    return wall, cpu, proc.stdout


# The limits are the issue's, on wall time, and what the command costs (its CPU time, user +
# system) must be within them on every run. On this 2-core machine shared with other test runs
# a process also waits for a core: a run over the limit is measured again (best of three), and
# while the machine is overloaded (load average above its cores) the wall-time limit grows with
# the load, since it then measures the neighbours; the figures are printed either way.
@pytest.mark.parametrize(("kind", "command", "limit"), [
    ("postgresql", "best", 1.0), ("postgresql", "status", 2.0),
    ("journal", "best", 1.0), ("journal", "status", 2.0),
])  # fmt: skip
def test_best_and_status_on_10000_trials(big_sweeps, kind, command, limit):
    root, names = big_sweeps
    runs: list[tuple[float, float]] = []
    for _ in range(3):
        wall, cpu, out = _timed(root, "sweep", command, names[kind])
        runs.append((round(wall, 2), round(cpu, 2)))
        assert cpu < limit, f"sweep {command} on {kind}: {cpu:.2f} s of CPU (runs {runs})"
        if command == "best":
            assert "best trial" in out
        else:
            assert f"{TRIALS} complete" in out
        if wall < limit:
            break
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    print(
        f"sweep {command} on {kind}, {TRIALS} trials: (wall s, cpu s) {runs}, load/core {load:.1f}"
    )
    allowed = limit * max(1.0, load)
    assert min(w for w, _ in runs) < allowed, (
        f"sweep {command} on {kind}: {runs}, load/core {load:.1f}"
    )


def test_best_on_10000_trials_is_the_journals_answer(big_sweeps):
    """The one query and Optuna's journal agree on the big sweeps (same values, both storages)."""
    root, names = big_sweeps
    answers = [json.loads(_timed(root, "sweep", "best", names[k], "--json")[2]) for k in names]
    assert answers[0] == answers[1]


# -- sweep move-storage ---------------------------------------------------------------------------
def _pg_studies(postgres: Postgres, like: str) -> list[str]:
    with _sql(postgres) as conn:
        if conn.execute("SELECT to_regclass('studies')").fetchone()[0] is None:
            return []  # Optuna has made no table in this database yet: no study in it
        rows = conn.execute("SELECT study_name FROM studies WHERE study_name LIKE %s", (like,))
        return [r[0] for r in rows.fetchall()]


def _move(name: str, url: str, *extra: str, capsys) -> tuple[int, str, str]:
    rc = main(["sweep", "move-storage", name, url, *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_move_a_running_sweep_cancel_move_resume(job_root, postgres, password_file, monkeypatch,
                                                 capsys):  # fmt: skip
    """The documented way: refused while the workers run (nothing copied, spec unchanged);
    after `sweep cancel` the study moves with every trial under its number; `sweep resume`
    finishes the sweep in the database, each trial recorded once, the cancelled ones retried
    under their own numbers; `sweep best` reads the database."""
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "0.5")  # 2 s a trial: the cancel falls mid-sweep
    sweep = Sweep(spec("journal", name="mover", trials=10, parallelism=2, final=False))
    sweep.run()
    deadline = time.monotonic() + 90
    while sweep.paths.finished_count() < 2:
        assert time.monotonic() < deadline, sweep.status()
        time.sleep(0.2)
    spec_before = sweep.paths.spec.read_text()
    rc, _, err = _move(
        "mover", postgres.url(), "--password-file", str(password_file), capsys=capsys
    )
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "jobs queued or running" in err and "sweep cancel mover" in err
    assert sweep.paths.spec.read_text() == spec_before
    assert _pg_studies(postgres, "%/mover/%") == []
    sweep.cancel()
    deadline = time.monotonic() + 60
    while any(j.live for j in sweep.lifecycle.jobs()):
        assert time.monotonic() < deadline, "the cancelled workers did not end"
        time.sleep(0.2)
    journal = optuna.load_study(study_name="mover", storage=_journal(sweep))
    before = [(t.number, t.state, t.values) for t in journal.get_trials()]
    # cancelled mid-sweep (trials in flight may end as their workers stop, or stay RUNNING)
    assert sum(s == TS.COMPLETE for _, s, _ in before) < 10, before
    rc, out, err = _move(
        "mover", postgres.url(), "--password-file", str(password_file), capsys=capsys
    )
    assert rc == 0, err
    assert "study moved to" in out and postgres.password not in out + err
    moved = Sweep.load("mover")
    assert moved.spec.storage is not None and not moved.spec.storage.journal
    study = moved.spec.storage.study
    assert _pg_studies(postgres, "%/mover/%") == [study]
    copied = moved.study().get_trials()
    assert [(t.number, t.state, t.values) for t in copied] == before
    moved.resume()
    moved.wait(timeout=180)
    trials = moved.study().get_trials()
    assert sorted(t.number for t in trials) == sorted({t.number for t in trials})  # once each
    assert {t.state for t in trials} <= {TS.COMPLETE}, [(t.number, t.state) for t in trials]
    assert sorted(s.trial for s in moved.slots()) == sorted({s.trial for s in moved.slots()})
    assert [s.state for s in moved.slots()] == ["complete"] * 10
    assert len(journal.get_trials()) == len(before)  # the journal got nothing after the move
    best = moved.best()
    assert best["val_acc"] == max(s.value for s in moved.slots())


def _journal_sweep(name: str, trials: list[optuna.trial.FrozenTrial]) -> Sweep:
    s = Sweep(spec("journal", name=name, trials=len(trials), final=False))
    s.paths.slots.mkdir(parents=True)
    s.paths.spec.write_text(s.spec.model_dump_json(indent=1))
    study = optuna.create_study(study_name=name, storage=_journal(s))
    study.add_trials(trials)
    return s


def _journal(s: Sweep):
    from hpcdl.hpo.storage import journal_storage

    return journal_storage(s.paths.root)


def test_a_failed_copy_leaves_the_sweep_on_its_journal(job_root, postgres, password_file, capsys):
    """A trial the database cannot hold (a parameter name over Optuna's 512 characters, which
    the journal takes): the copy fails after some trials went in; the partial study is deleted,
    the spec is unchanged, one line, exit 2."""
    long = "p" * 600
    good = [_trial(i, float(i)) for i in range(3)]
    bad = optuna.trial.create_trial(value=1.0, params={long: 0.5},
                                    distributions={long: D.FloatDistribution(0, 1)})  # fmt: skip
    s = _journal_sweep("badcopy", [*good, bad])
    spec_before = s.paths.spec.read_text()
    rc, _, err = _move(
        "badcopy", postgres.url(), "--password-file", str(password_file), capsys=capsys
    )
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "copy to" in lines[0] and "stays on its journal" in lines[0], lines
    assert s.paths.spec.read_text() == spec_before
    assert _pg_studies(postgres, "%/badcopy/%") == []
    assert len(optuna.load_study(study_name="badcopy", storage=_journal(s)).trials) == 4


@pytest.mark.parametrize(("url", "extra", "expect"), [
    ("postgresql://bob:s3cretpw@127.0.0.1:1/hpo", (), "holds a password (not shown)"),
    ("journal", (), "give a postgresql:// URL"),
    ("mysql://bob@127.0.0.1/hpo", (), "must be 'journal' or a PostgreSQL URL"),
    ("PORT", (), "cannot use"),
    ("URL", ("--password-file", "/nonexistent/pw"), "storage.password_file"),
])  # fmt: skip
def test_bad_move_input_is_one_line_and_changes_nothing(job_root, postgres, capsys, url, extra,
                                                         expect):  # fmt: skip
    s = _journal_sweep("stay", [_trial(i, float(i)) for i in range(2)])
    spec_before = s.paths.spec.read_text()
    if url == "PORT":
        url = f"postgresql://bob@127.0.0.1:{pgtest._free_port()}/hpo"
    elif url == "URL":
        url = postgres.url()
    rc, out, err = _move("stay", url, *extra, capsys=capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: sweep move-storage: "), err
    assert expect in lines[0] and "s3cretpw" not in err and "Traceback" not in err + out
    assert s.paths.spec.read_text() == spec_before
    assert _pg_studies(postgres, "%/stay/%") == []


def test_a_sweep_in_a_database_already_is_refused(job_root, postgres, password_file, capsys):
    s = _journal_sweep("twice", [_trial(0, 1.0)])
    assert (
        _move("twice", postgres.url(), "--password-file", str(password_file), capsys=capsys)[0] == 0
    )
    rc, _, err = _move(
        "twice", postgres.url(), "--password-file", str(password_file), capsys=capsys
    )
    assert rc == 2 and "in a database already" in err and "only a journal moves" in err
    assert len(_pg_studies(postgres, "%/twice/%")) == 1
    assert Sweep.load("twice").best()["trial"] == 0 and s.paths.study.is_file()
