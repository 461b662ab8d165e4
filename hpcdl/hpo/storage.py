"""The sweep's study storage: Optuna's journal file in the sweep folder (the default), or a
PostgreSQL database through Optuna's public ``RDBStorage`` (``storage:`` in the spec, or the
site profile's ``study_storage``).

``sweep run`` decides once (:func:`resolve`) and writes the answer into the sweep's spec, so
every worker, the final job and ``sweep status/best/resume`` open the same study even if the
site profile changes later. In a database the study's name is ``USER/SWEEP/RANDOM``: two users
(or a sweep started again after its folder was removed) never share a study by accident.

Only the study lives in the database: slots, claims, the workers' journals and events stay in
the sweep folder, so hpcdl's rules (claims, retries, rounds) are the same for both storages.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcdl.credentials import Secret, read_secret_file
from hpcdl.database import StudyDatabase
from hpcdl.errors import ConfigError
from hpcdl.hpo import db_retry
from hpcdl.hpo.folder import SweepPaths
from hpcdl.hpo.spec import SweepSpec
from hpcdl.site import SiteProfile
from hpcdl.util import get_logger

if TYPE_CHECKING:
    import optuna

log = get_logger(__name__)

CONNECT_TIMEOUT_S = 10  # libpq's connect_timeout: an unreachable server fails, never hangs
#: How long a worker keeps retrying a connection that fails for a reason that passes (see
#: db_retry); ``sweep run`` and ``sweep status`` never retry: a user waits for them.
WORKER_CONNECT_WAIT_ENV = "HPCDL_DB_CONNECT_WAIT_S"
WORKER_CONNECT_WAIT_S = 600.0

#: One RDBStorage (one SQLAlchemy engine and its connections) per database and process: the
#: study, the trial reporter and the final job share it.
_DATABASES: dict[tuple[str, str | None], optuna.storages.RDBStorage] = {}


def database(spec: SweepSpec) -> StudyDatabase | None:
    return spec.storage if spec.storage is not None and not spec.storage.journal else None


def study_name(spec: SweepSpec) -> str:
    """The study's name: the sweep's in its own journal file; the one ``sweep run`` chose in a
    shared database."""
    db = database(spec)
    return db.study if db is not None and db.study else spec.name


def resolve(spec: SweepSpec, site: SiteProfile) -> SweepSpec:
    """The spec with its storage decided: its own, else the site's ``study_storage``, else the
    journal; a database gets a study name of its own unless the spec gives one."""
    chosen = spec.storage or site.study_storage or StudyDatabase(url="journal")
    if not chosen.journal and chosen.study is None:
        user = pwd.getpwuid(os.getuid()).pw_name
        chosen = chosen.model_copy(update={"study": f"{user}/{spec.name}/{secrets.token_hex(4)}"})
    if chosen.password_path is not None:  # the jobs run elsewhere (another folder, a node)
        chosen = chosen.model_copy(update={"password_file": str(chosen.password_path)})
    return spec.model_copy(update={"storage": chosen})


def password(db: StudyDatabase, where: str) -> str | None:
    """The password from ``password_file`` (this user's, mode 0600, checked as site secrets
    are); None leaves it to libpq (``~/.pgpass``, ``PGPASSFILE``)."""
    if db.password_file is None:
        return None
    secret = Secret(name="PGPASSWORD", file=db.password_file)
    return read_secret_file(secret, where, field="storage.password_file")


def _rdb(
    db: StudyDatabase, where: str, create: bool = False, retry: bool = False
) -> optuna.storages.RDBStorage:
    """This process's RDBStorage. Only ``sweep run`` (``create``) creates Optuna's tables and
    checks their schema version against this Optuna: the workers and ``sweep status/best``
    skip both (0.17 s and alembic's import, a fifth of ``sweep best`` on 10,000 trials)."""
    key = (db.sqlalchemy_url, db.password_file)
    if key not in _DATABASES:
        connect: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S}
        pw = password(db, where)
        if pw is not None:  # passed to the driver, never put in the URL (which errors show)
            connect["password"] = pw

        def make() -> optuna.storages.RDBStorage:
            import optuna

            return optuna.storages.RDBStorage(
                db.sqlalchemy_url,
                # One process needs one connection (it never writes from two threads); a small
                # pool keeps hundreds of workers within the server's max_connections.
                engine_kwargs={
                    "connect_args": connect,
                    "pool_size": 1,
                    "max_overflow": 2,
                    "pool_pre_ping": True,
                },
                skip_table_creation=not create,
                skip_compatibility_check=not create,
            )

        _DATABASES[key] = make() if create or not retry else _retrying(make, db.url)
    return _DATABASES[key]


def _retrying(make: Any, url: str) -> optuna.storages.RDBStorage:
    """``make()``, again after a jittered wait while it fails for a reason that passes, until
    the worker's deadline; then (or at once, for a reason that does not pass) its error."""
    wait_s = float(os.environ.get(WORKER_CONNECT_WAIT_ENV, WORKER_CONNECT_WAIT_S))
    deadline = time.monotonic() + wait_s
    waits = db_retry.delays(random.Random())  # unseeded: workers must not wait alike
    attempt = 0
    while True:
        attempt += 1
        try:
            return make()
        except Exception as exc:
            pause = next(waits)
            if not db_retry.transient(exc) or time.monotonic() + pause > deadline:
                raise
            log.warning("cannot connect to %s (attempt %d: %s); again in %.1f s",
                        url, attempt, _first_line(db_retry.root_cause(exc)), pause)  # fmt: skip
            time.sleep(pause)


def open_storage(
    spec: SweepSpec, sweep_dir: Path, where: str = "", retry: bool = False
) -> optuna.storages.BaseStorage:
    """The sweep's storage: a journal storage on ``SWEEP/study.journal`` (a new one per call:
    each catches up with the file when it reads), or this process's RDBStorage."""
    db = database(spec)
    if db is not None:
        return _rdb(db, where or str(SweepPaths(sweep_dir).spec), retry=retry)
    return journal_storage(sweep_dir)


def journal_storage(sweep_dir: Path) -> optuna.storages.JournalStorage:
    """Journal file storage: no database server, safe across nodes (SQLite on NFS/Lustre is not)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(SweepPaths(sweep_dir).study)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def check(spec: SweepSpec, where: str) -> None:
    """Before ``sweep run`` writes anything: the driver is installed, the password file is
    private, the server answers, and the study's name is free. One ConfigError otherwise."""
    db = database(spec)
    if db is None:
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ConfigError(where, "storage", "the PostgreSQL driver is not installed: "
                          "pip install 'psycopg[binary]' (or hpcdl[hpo])") from None  # fmt: skip
    try:
        storage = _rdb(db, where, create=True)
        storage.get_study_id_from_name(study_name(spec))
    except KeyError:
        return  # the study is new: what a new sweep needs
    except ConfigError:
        raise
    except Exception as exc:  # SQLAlchemy's OperationalError and the like: one line
        _DATABASES.pop((db.sqlalchemy_url, db.password_file), None)
        raise ConfigError(
            where, "storage.url", f"cannot use {db.url}: {_first_line(exc)}"
        ) from None
    raise ConfigError(where, "storage.study", f"study {study_name(spec)!r} exists already in "
                      f"{db.url}: a new sweep needs a study of its own (leave storage.study out)")  # fmt: skip


def _first_line(exc: BaseException) -> str:
    """The driver's own reason (``connection refused``, ``password authentication failed``)
    without SQLAlchemy's SQL dump and links."""
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    return lines[0] if lines else type(orig).__name__


# The best finished trial of a study in one query, as Optuna's find_max/min_value_trial_id
# orders them (value_type first: -inf < finite < +inf, then the value; the lowest trial_id of
# a tie). Read with psycopg alone: opening an RDBStorage imports SQLAlchemy's models and
# alembic and asks for the schema version (0.8 s of the 1.2 s `sweep best` took on 10,000
# trials); the table names are Optuna's schema, which alembic migrations keep.
_BEST_SQL = """
WITH study AS (
    SELECT s.study_id, d.direction FROM studies s
    JOIN study_directions d ON d.study_id = s.study_id AND d.objective = 0
    WHERE s.study_name = %(name)s
), best AS (
    SELECT t.trial_id, t.number, v.value, v.value_type FROM trials t
    JOIN study ON study.study_id = t.study_id
    JOIN trial_values v ON v.trial_id = t.trial_id AND v.objective = 0
    WHERE t.state = 'COMPLETE'
    ORDER BY
        CASE WHEN study.direction = 'MAXIMIZE' THEN -1 ELSE 1 END
          * CASE v.value_type WHEN 'INF_NEG' THEN -1 WHEN 'INF_POS' THEN 1 ELSE 0 END,
        CASE WHEN study.direction = 'MAXIMIZE' THEN -v.value ELSE v.value END,
        t.trial_id
    LIMIT 1
)
SELECT best.number, best.value, best.value_type, p.param_name, p.param_value,
       p.distribution_json
FROM best LEFT JOIN trial_params p ON p.trial_id = best.trial_id
ORDER BY p.param_id
"""


def best_in_database(
    db: StudyDatabase, name: str, where: str
) -> tuple[int, float, dict[str, Any]] | None:
    """``(number, value, params)`` of study ``name``'s best complete trial, None if it has
    none (or no such study). Parameters in their external form, as ``FrozenTrial.params``."""
    import psycopg

    from hpcdl.hpo.journal_scan import external  # not Optuna's: its import is 0.16 s

    connect: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S}
    pw = password(db, where)
    if pw is not None:
        connect["password"] = pw
    libpq_url = "postgresql://" + db.url.split("://", 1)[1]
    try:
        with psycopg.connect(libpq_url, **connect) as conn:
            rows = conn.execute(_BEST_SQL, {"name": name}).fetchall()
    except psycopg.Error as exc:  # the server's reason in one line (never the password)
        raise ConfigError(
            where, "storage.url", f"cannot read {db.url}: {_first_line(exc)}"
        ) from None
    if not rows:
        return None
    number, value, value_type = rows[0][:3]
    if value_type != "FINITE":
        value = float("inf") if value_type == "INF_POS" else float("-inf")
    params = {p: external(v, json.loads(d)) for *_, p, v, d in rows if p is not None}
    return int(number), float(value), params
