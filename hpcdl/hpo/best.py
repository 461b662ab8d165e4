"""A sweep's best trial (``sweep best``, ``Sweep.best``): from the study's storage by the
cheapest way that gives Optuna's answer. One objective without constraints or warm start:
one SQL query on a database, the journal read without Optuna's replay (journal_scan);
otherwise Optuna's trials (the Pareto front for several objectives)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hpcdl.errors import HpcdlError
from hpcdl.hpo import storage
from hpcdl.hpo.folder import SweepPaths
from hpcdl.hpo.journal_scan import Unsupported, best_in_journal
from hpcdl.hpo.pareto import best_trials
from hpcdl.hpo.spec import SweepSpec
from hpcdl.util import get_logger

if TYPE_CHECKING:
    import optuna

log = get_logger(__name__)

Found = tuple[int, float | None, dict[str, Any]]


def best_of(spec: SweepSpec, paths: SweepPaths, source: str,
            study: Callable[[], optuna.Study]) -> dict[str, Any]:  # fmt: skip
    """Best finished trial: number, value, parameters (and the final test result if any);
    with several objectives, ``pareto``: the front's trials, each with every objective.
    Infeasible (a constraint > 0) and warm-started trials never count. ``study`` opens the
    sweep's Optuna study, where one is needed."""
    db = storage.database(spec)
    simple = not (spec.multi or spec.constraints or spec.warm_start)
    found: Found | None
    if simple and db is not None:
        # one query, without opening Optuna's RDBStorage (see storage): its answer is final
        found = storage.best_in_database(db, storage.study_name(spec), source)
    else:
        found = _in_journal(spec, paths) if simple else None
    if found is None and (db is None or not simple):
        trials = best_trials(study().get_trials(deepcopy=False), spec.directions)
        if trials and spec.multi:
            return {"objectives": [{"name": m, "direction": d} for m, d in
                                   zip(spec.metrics, spec.directions, strict=True)],
                    "pareto": [{"trial": t.number, **dict(zip(spec.metrics, t.values, strict=True)),
                                "params": t.params} for t in trials]}  # fmt: skip
        if trials:
            found = (trials[0].number, trials[0].values[0], trials[0].params)
    if found is None:
        raise HpcdlError(f"sweep {spec.name!r} has no finished trial yet"
                         + (" that meets its constraints" if spec.constraints else ""))  # fmt: skip
    out: dict[str, Any] = {"trial": found[0], spec.metric: found[1], "params": found[2]}
    final = paths.read_final_result()
    if final is not None:
        out["final"] = final
    return out


def _in_journal(spec: SweepSpec, paths: SweepPaths) -> Found | None:
    """The journal's best trial read without Optuna's replay; None where Optuna must decide
    (or none is finished yet: Optuna then says so the same)."""
    try:
        return best_in_journal(paths.study, storage.study_name(spec),
                               maximize=spec.directions[0] == "maximize")  # fmt: skip
    except Unsupported as exc:
        log.info("sweep %s: %s in the journal; asking Optuna", spec.name, exc)
        return None
