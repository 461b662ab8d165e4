"""Sweeps whose study lives in a real PostgreSQL server (local profile, no Slurm): every trial
recorded once, status/best/resume on it, a worker killed with SIGKILL mid-trial, and the
one-line refusals of a bad storage (nothing written).

The server is this machine's PostgreSQL (the ``postgresql`` apt package: initdb, pg_ctl),
started once per session in a temporary folder, on loopback, on a free port, with password
authentication (the sweeps read the password from a 0600 file, as users would).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from hpcdl.cli import main
from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.folder import FINISHED_SLOT

REPO = Path(__file__).resolve().parents[2]


def _pg_bin() -> Path:
    """The newest server of Debian's ``postgresql`` package (15 on bookworm), or $HPCDL_PG_BIN."""
    if os.environ.get("HPCDL_PG_BIN"):
        return Path(os.environ["HPCDL_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)  # fmt: skip
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
PG_USER = "hpcdl"  # the server's superuser in the test cluster (password authentication)


@dataclass
class Postgres:
    port: int
    password: str
    data: Path

    def url(self, db: str = "hpo") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{db}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, the server runs as ``postgres`` (the
    package's system user) or the dev cluster's ``hpcdl-alice``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "hpcdl-alice"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.fail("running as root and neither 'postgres' nor 'hpcdl-alice' exists", pytrace=False)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server for the session: initdb in a temp folder, loopback only, a free
    port, password (scram) authentication for TCP, database ``hpo``; stopped at the end."""
    if not (PG_BIN / "initdb").is_file():
        pytest.fail(f"no PostgreSQL server binaries in {PG_BIN}: apt-get install postgresql "
                    "(the dev cluster script installs it)", pytrace=False)  # fmt: skip
    user = _server_user()
    top = Path(tempfile.mkdtemp(prefix="hpcdl-pg-"))
    password = os.urandom(12).hex()
    (top / "pw").write_text(password + "\n")
    if user is not None:
        shutil.chown(top, user)
        shutil.chown(top / "pw", user)
    as_user = ["runuser", "-u", user, "--"] if user else []

    def pg(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=timeout)

    port, data, log = _free_port(), top / "data", top / "server.log"
    init = pg(str(PG_BIN / "initdb"), "-D", str(data), "-U", PG_USER, "--pwfile", str(top / "pw"),
              "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8")  # fmt: skip
    assert init.returncode == 0, init.stdout + init.stderr
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {top} -c max_connections=200"
    start = pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
               "-w", "-t", "60", "start")  # fmt: skip
    if start.returncode != 0:
        pytest.fail(f"postgres did not start:\n{start.stderr}\n{log.read_text()}", pytrace=False)
    try:
        made = pg(str(PG_BIN / "createdb"), "-h", str(top), "-p", str(port), "-U", PG_USER, "hpo")
        assert made.returncode == 0, made.stderr
        yield Postgres(port, password, data)
    finally:
        pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "60", "stop")
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def password_file(postgres: Postgres, tmp_path: Path) -> Path:
    path = tmp_path / "pgpassword"
    path.write_text(postgres.password + "\n")
    path.chmod(0o600)
    return path


def spec(storage: object, **changes: object) -> SweepSpec:
    base = {
        "name": "pg",
        "objective": "tests.helpers.objectives:curve",
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random", "seed": 0},
        "trials": 24,
        "parallelism": 4,
        "storage": storage,
        "resources": {"site": "local", "time": "10m"},
    }
    return SweepSpec.model_validate({**base, **changes})


def db_trials(postgres: Postgres, study: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials as a fresh RDBStorage (another connection than the sweep's) sees them."""
    url = f"postgresql+psycopg://{PG_USER}:{postgres.password}@127.0.0.1:{postgres.port}/hpo"
    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


def wait_for(check, timeout: float, what: str, sweep: Sweep) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not after {timeout}s: {sweep.status()}")
        time.sleep(0.2)


def test_postgres_sweep_records_every_trial_once(job_root, postgres, password_file, capsys):
    storage = {"url": postgres.url(), "password_file": str(password_file)}
    sweep = Sweep(spec(storage))
    (workers,) = sweep.run()
    assert workers.array == 4
    sweep.wait(timeout=180)
    rows = sweep.status()
    assert [r["state"] for r in rows] == ["complete"] * 24
    assert len({r["trial"] for r in rows}) == 24
    study = sweep.spec.storage.study
    assert study.startswith(f"{pwd.getpwuid(os.getuid()).pw_name}/pg/")
    trials = db_trials(postgres, study)
    assert sorted(t.number for t in trials) == list(range(24))  # each recorded once
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert not sweep.paths.study.exists()  # no journal file beside the database
    saved = sweep.paths.spec.read_text()
    assert postgres.password not in saved and study in saved
    best = sweep.best()
    assert best["val_acc"] == max(r["val_acc"] for r in rows)
    assert "final" in best
    assert main(["sweep", "status", "pg"]) == 0
    assert main(["sweep", "best", "pg"]) == 0
    out = capsys.readouterr().out
    assert f"trial {best['trial']}" in out and "complete" in out
    _dashboard_counts(sweep, study, 24)


def _dashboard_counts(sweep: Sweep, study: str, trials: int) -> None:
    """``sweep dashboard``'s server over the database study: its JSON API lists every trial."""
    import urllib.request

    from hpcdl.hpo.dashboard import serve

    with serve(sweep) as served:
        base, browser = f"http://127.0.0.1:{served.port}", urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor())  # fmt: skip
        browser.open(base + served.path, timeout=30).close()  # the token, as a cookie
        with browser.open(f"{base}/api/studies", timeout=30) as r:
            ids = {s["study_name"]: s["study_id"] for s in json.load(r)["study_summaries"]}
        with browser.open(f"{base}/api/studies/{ids[study]}", timeout=30) as r:
            assert len(json.load(r)["trials"]) == trials


def test_resume_after_cancel_continues_in_the_same_study(
    job_root, postgres, password_file, monkeypatch
):
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "0.5")  # 2 s a trial: the cancel falls mid-sweep
    storage = {"url": postgres.url(), "password_file": str(password_file)}
    sweep = Sweep(spec(storage, name="pgresume", trials=12, parallelism=2, final=False))
    sweep.run()
    wait_for(lambda: sweep.paths.finished_count() >= 2, 180, "2 trials finished", sweep)
    assert sweep.cancel()
    done = sweep.paths.finished_count()
    assert done < 12, "the sweep finished before the cancel: make the trials slower"
    study = sweep.spec.storage.study
    loaded = Sweep.load("pgresume")
    assert loaded.spec.storage.study == study
    loaded.resume()
    loaded.wait(timeout=180)
    trials = db_trials(postgres, study)
    assert sorted(t.number for t in trials) == list(range(12))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert [s.state for s in loaded.slots()] == ["complete"] * 12


@pytest.mark.parametrize("kind", ["journal", "postgres"])
def test_worker_killed_mid_trial_leaves_the_study_consistent(
    kind, job_root, postgres, password_file, monkeypatch
):
    """SIGKILL (no handler, no tell) of a worker while its trial runs: the other workers go on,
    the slot stays ``running`` as on the journal, ``sweep resume`` retries the same trial, and
    no trial is left RUNNING in the study."""
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "0.5")
    storage = "journal" if kind == "journal" else {"url": postgres.url(), "password_file": str(password_file)}  # fmt: skip
    sweep = Sweep(spec(storage, name=f"kill-{kind}", trials=8, parallelism=4, final=False))
    sweep.run()

    def running_victim():
        return next((s for s in sweep.slots() if s.state == "running" and s.epochs >= 1), None)

    wait_for(lambda: running_victim() is not None, 60, "a trial past its first epoch", sweep)
    victim = running_victim()
    lines = (sweep.paths.workers / f"{victim.job}.jsonl").read_text().splitlines()
    pid = int(json.loads(lines[0])["pid"])
    os.kill(pid, signal.SIGKILL)
    # The others finish every other slot; the victim's stays running (nobody told the study).
    wait_for(lambda: sweep.paths.finished_count() == 7 and not sweep.lifecycle.jobs()[0].live,
             120, "7 slots finished and the workers gone", sweep)  # fmt: skip
    assert sweep.paths.read_slot(victim.slot).state == "running"
    assert sweep.diagnose()  # status says what is stuck and that resume runs it
    sweep.resume()
    sweep.wait(timeout=120)
    slot = sweep.paths.read_slot(victim.slot)
    assert (slot.state, slot.trial, slot.attempts) == ("complete", victim.trial, 2)
    trials = sweep.study().get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(8))
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    assert all(s.state in FINISHED_SLOT for s in sweep.slots())


def test_workers_wait_out_a_server_that_does_not_answer(job_root, postgres, password_file):
    """The server's postmaster stopped (SIGSTOP) as the workers start: their connections hang
    until libpq's 10 s timeout, as 77 of 256 workers' did in the bench's connection storm, and
    died then with a traceback. Now they retry with jittered back-off, connect once it answers
    again, and the sweep records every trial once."""
    storage = {"url": postgres.url(), "password_file": str(password_file)}
    sweep = Sweep(spec(storage, name="pgwait", trials=6, parallelism=2, final=False))
    postmaster = int((postgres.data / "postmaster.pid").read_text().split()[0])
    (workers,) = sweep.run()  # its check connects while the server answers

    def logs() -> str:
        return "".join(
            p.read_text(errors="replace") for p in Path(workers.folder).glob("*_log.err")
        )

    os.kill(postmaster, signal.SIGSTOP)
    try:  # until a worker's connect timed out and it said it retries (however late it started)
        deadline = time.monotonic() + 90
        while "cannot connect to" not in logs() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        os.kill(postmaster, signal.SIGCONT)
    assert "again in" in logs() and "connection timeout expired" in logs(), logs()[-3000:]
    wait_for(lambda: sweep.paths.finished_count() == 6, 120, "6 trials finished", sweep)
    trials = db_trials(postgres, sweep.spec.storage.study)
    assert sorted(t.number for t in trials) == list(range(6))


# -- refusals: one line, exit 2, nothing written ------------------------------------------------
def _refused(tmp_path: Path, job_root: Path, capsys, storage: str, *extra: str) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "name: refused\nobjective: tests.helpers.objectives:curve\ntrials: 2\n"
        "space: {x: {type: uniform, low: 0, high: 1}}\nresources: {site: local}\n"
        f"storage: {storage}\n" + "".join(extra)
    )
    rc = main(["sweep", "run", str(path)])
    out = capsys.readouterr()
    assert rc == 2, out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: storage"), out.err
    assert "Traceback" not in out.err + out.out
    assert not (job_root / "sweeps" / "refused").exists()  # nothing written
    return lines[0]


def test_a_password_in_the_url_is_refused_and_not_shown(tmp_path, job_root, capsys):
    line = _refused(tmp_path, job_root, capsys, "postgresql://bob:hunter2secret@127.0.0.1:1/hpo")
    assert "hunter2secret" not in line and "holds a password (not shown)" in line


def test_an_unreachable_server_is_one_line(tmp_path, job_root, capsys):
    line = _refused(tmp_path, job_root, capsys, f"postgresql://bob@127.0.0.1:{_free_port()}/hpo")
    assert "storage.url" in line and "cannot use" in line


def test_a_wrong_password_is_one_line(tmp_path, job_root, postgres, capsys):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    line = _refused(tmp_path, job_root, capsys, f"{{url: '{postgres.url()}', password_file: {wrong}}}")  # fmt: skip
    assert "password authentication failed" in line and "not-the-password" not in line


def test_a_password_file_others_can_read_is_refused(tmp_path, job_root, postgres, capsys):
    loose = tmp_path / "loose"
    loose.write_text(postgres.password + "\n")
    loose.chmod(0o644)
    line = _refused(tmp_path, job_root, capsys, f"{{url: '{postgres.url()}', password_file: {loose}}}")  # fmt: skip
    assert "storage.password_file" in line and "chmod 600" in line
    assert postgres.password not in line


def test_a_missing_driver_is_one_line(tmp_path, job_root):
    """Without psycopg (an environment without the hpo extra's driver): the same one line."""
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "name: refused\nobjective: tests.helpers.objectives:curve\ntrials: 2\n"
        "space: {x: {type: uniform, low: 0, high: 1}}\nresources: {site: local}\n"
        "storage: postgresql://bob@127.0.0.1:5432/hpo\n"
    )
    code = ("import sys; sys.modules['psycopg'] = None; from hpcdl.cli import main; "
            f"sys.exit(main(['sweep', 'run', {str(path)!r}]))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=os.environ.copy())  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}: storage: the PostgreSQL driver is not installed: "
        "pip install 'psycopg[binary]' (or hpcdl[hpo])"
    ]
    assert not (job_root / "sweeps" / "refused").exists()


def test_bench_storage_prints_both_storages_at_80_columns(
    tmp_path, job_root, postgres, password_file
):
    """`hpcdl bench storage`, small: every row (journal and PostgreSQL, hpcdl's path and the
    naive one), the inspection rows, 80 columns at most, the JSON beside."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "hpcdl", "bench", "storage", "--writers", "1,2", "--trials", "3",
         "--naive-trials", "2", "--inspect", "20", "--postgres", postgres.url(),
         "--password-file", str(password_file), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if not line.startswith("figures: ")]
    assert max(len(line) for line in table) <= 80, proc.stdout  # the path alone may be longer
    rows = json.loads((out / "bench_storage.json").read_text())
    seen = {(r["storage"], r["path"], r["writers"]) for r in rows["writers"]}
    assert seen == {(k, p, n) for k in ("journal", "postgresql") for p in ("hpcdl", "naive")
                    for n in (1, 2)}  # fmt: skip
    assert [r["storage"] for r in rows["inspect"]] == ["journal", "postgresql"]
    assert all(r["status_s"] > 0 and r["best_s"] > 0 for r in rows["inspect"])
    assert postgres.password not in proc.stdout + proc.stderr


def test_a_study_name_already_in_the_database_is_refused(
    tmp_path, job_root, postgres, password_file, capsys
):
    """Two sweeps never share a study by accident: a spec that names a study the database
    holds already (another sweep's) is refused before anything is written."""
    storage = {"url": postgres.url(), "password_file": str(password_file), "study": "x/taken/1"}
    first = Sweep(spec(storage, name="first", trials=2, final=False))
    first.run()
    first.wait(timeout=120)  # its workers end before the test does
    line = _refused(tmp_path, job_root, capsys, json.dumps(storage))
    assert "storage.study" in line and "'x/taken/1' exists already" in line
