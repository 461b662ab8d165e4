"""``hpcdl sweep move-storage``: a sweep's study from its journal file to a PostgreSQL database.

Only while none of the sweep's jobs is queued or running (workers, follow-up, final job). Each
worker reads the spec once when it starts and keeps its storage for every trial it runs, so a
worker still on the journal after the move would write trials the database never sees. Making
them follow would need every worker to stop writing, wait for the copy and reopen its study: what
``sweep cancel`` + ``move-storage`` + ``sweep resume`` do already with hpcdl's own rules (a
cancelled trial is retried under the same number, as after any cancel). So a running sweep moves
in three commands, and this one refuses while anything of the sweep is live.

The order makes a failure harmless: check the target (driver, password file, server, a study
name of its own) → copy with Optuna's ``copy_study`` → compare the copy with the journal (every
trial number, state and value) and check that the journal did not change meanwhile → only then
rewrite ``spec.json``. A failure before that last step deletes the partial copy and leaves the
sweep on its journal; the journal file stays where it was either way (a backup).
"""

from __future__ import annotations

from typing import Any

import optuna
from pydantic import ValidationError

from hpcdl.database import StudyDatabase
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.hpo import storage
from hpcdl.hpo.folder import SweepPaths
from hpcdl.hpo.lifecycle import Lifecycle
from hpcdl.hpo.spec import SweepSpec
from hpcdl.site import SiteProfile
from hpcdl.util import atomic_write_text, get_logger

log = get_logger(__name__)
WHERE = "sweep move-storage"


def target_spec(
    spec: SweepSpec, site: SiteProfile, url: str, password_file: str | None
) -> SweepSpec:
    """The spec with the new storage, checked as ``sweep run`` checks one (one ConfigError)."""
    if storage.database(spec) is not None:
        raise ConfigError(WHERE, "storage", f"sweep {spec.name!r} is in a database already "
                          f"({spec.storage}): only a journal moves")  # fmt: skip
    try:
        db = StudyDatabase.model_validate({"url": url, "password_file": password_file})
    except ValidationError as exc:  # its first message, without the input (maybe a password)
        problem = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise ConfigError(WHERE, "storage", problem) from None
    if db.journal:
        raise ConfigError(
            WHERE, "storage", "give a postgresql:// URL (the sweep is on its journal)"
        )
    moved = storage.resolve(spec.model_copy(update={"storage": db}), site)
    storage.check(moved, WHERE)  # driver, private password file, server, the study name free
    return moved


def move(spec: SweepSpec, paths: SweepPaths, site: SiteProfile, url: str,
         password_file: str | None) -> SweepSpec:  # fmt: skip
    """Copy the study, check the copy, switch the spec; returns the new spec."""
    life = Lifecycle(spec, paths, site)
    _refuse_live(life)
    moved = target_spec(spec, site, url, password_file)
    if not paths.study.is_file():
        raise HpcdlError(f"sweep {spec.name!r} has no journal at {paths.study}: nothing to move")
    before = _stamp(paths)
    db = storage.database(moved)
    assert db is not None
    name = storage.study_name(moved)
    target = storage.open_storage(moved, paths.root, WHERE)
    try:
        optuna.copy_study(from_study_name=storage.study_name(spec),
                          from_storage=storage.journal_storage(paths.root),
                          to_storage=target, to_study_name=name)  # fmt: skip
        _same_trials(storage.journal_storage(paths.root), target, storage.study_name(spec), name)
        if _stamp(paths) != before:
            raise HpcdlError(f"the journal {paths.study} changed during the copy: a worker of "
                             "the sweep is running; 'hpcdl sweep cancel' first")  # fmt: skip
        _refuse_live(life)  # a `sweep resume` in another shell meanwhile
        atomic_write_text(paths.spec, moved.model_dump_json(indent=1))
    except BaseException as exc:
        _drop(target, name)
        if isinstance(exc, HpcdlError):
            raise
        if isinstance(exc, Exception):
            raise HpcdlError(f"{WHERE}: the copy to {db.url} failed ({storage._first_line(exc)}); "
                             "the sweep stays on its journal") from None  # fmt: skip
        raise
    log.info("sweep %s: study moved to %s as %s", spec.name, db.url, name)
    return moved


def _refuse_live(life: Lifecycle) -> None:
    live = [j.handle.job_id for j in life.jobs() if j.live]
    if live:
        name = life.spec.name
        raise HpcdlError(
            f"sweep {name!r} has jobs queued or running ({', '.join(live)}): their workers keep "
            f"the journal open; 'hpcdl sweep cancel {name}', move, then 'hpcdl sweep resume {name}'"
        )


def _stamp(paths: SweepPaths) -> tuple[int, int]:
    st = paths.study.stat()
    return st.st_size, st.st_mtime_ns


def _same_trials(src: Any, dst: Any, src_name: str, dst_name: str) -> None:
    """Every trial under the same number, state, value and parameters: the slots name trials
    by number, so a renumbered copy would attach slots to other trials."""

    def rows(store: Any, name: str) -> list[tuple[Any, ...]]:
        trials = optuna.load_study(study_name=name, storage=store).get_trials(deepcopy=False)
        return [(t.number, t.state, t.values, t.params) for t in trials]

    a, b = rows(src, src_name), rows(dst, dst_name)
    if a != b:
        raise HpcdlError(f"{WHERE}: the copy differs from the journal ({len(a)} trials, "
                         f"{len(b)} copied); the sweep stays on its journal")  # fmt: skip


def _drop(target: Any, name: str) -> None:
    """Delete a partial copy (nothing to do when the copy never created it)."""
    try:
        optuna.delete_study(study_name=name, storage=target)
    except KeyError:
        pass
    except Exception as exc:  # the server went away: say what is left behind
        log.warning("could not delete the partial study %s: %s", name, exc)
