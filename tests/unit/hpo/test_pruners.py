"""ASHA with capped rungs (``pruner.max_rungs``) and the replay of pruners on recorded curves
(``hpcdl bench hpo``), as tables. No job, no process: in-memory Optuna studies."""

from __future__ import annotations

import random
from pathlib import Path

import optuna
import pytest
import yaml

from hpcdl.errors import ConfigError
from hpcdl.hpo.pruners import (
    CappedSuccessiveHalvingPruner,
    RungPruner,
    promotable,
    rung_steps,
    value_at,
)
from hpcdl.hpo.replay import replay
from hpcdl.hpo.spec import load_spec
from hpcdl.hpo.study import make_pruner

optuna.logging.set_verbosity(optuna.logging.ERROR)

# (value, others, reduction factor, maximize, goes on)
PROMOTE = [
    (0.5, [], 3, True, True),  # the first trial at a rung: nothing to compare with
    (0.4, [0.5], 3, True, False),  # fewer than rf values: only the best goes on
    (0.5, [0.5], 3, True, True),  # a tie with the best goes on
    (0.7, [0.9, 0.8], 3, True, False),
    (0.8, [0.9, 0.7, 0.6, 0.5, 0.4], 3, True, True),  # 6 values, rf 3: the best 2 go on
    (0.7, [0.9, 0.8, 0.6, 0.5, 0.4], 3, True, False),
    (0.8, [0.9, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], 4, True, True),  # 8 values, rf 4: best 2
    (0.2, [0.9, 0.3, 0.5], 2, False, True),  # minimize: the lowest go on
    (0.5, [0.1, 0.3, 0.9], 2, False, False),
    (float("nan"), [], 3, True, False),  # a diverged trial stops
]


@pytest.mark.parametrize("value,others,rf,maximize,goes_on", PROMOTE)
def test_promotable(value, others, rf, maximize, goes_on):
    assert promotable(value, list(others), rf, maximize) is goes_on


@pytest.mark.parametrize("args,steps", [((1, 3, 1), [1]), ((1, 3, 3), [1, 3, 9]),
                                        ((2, 4, 2), [2, 8]), ((1, 2, 4), [1, 2, 4, 8])])  # fmt: skip
def test_rung_steps(args, steps):
    assert rung_steps(*args) == steps


@pytest.mark.parametrize("step,value", [(1, 0.1), (2, 0.1), (3, 0.3), (4, 0.3), (9, 0.5)])
def test_value_at_is_the_latest_at_or_before_the_step(step, value):
    assert value_at({1: 0.1, 3: 0.3, 5: 0.5}, step) == value


@pytest.mark.parametrize("values,value", [({3: 0.3, 5: 0.5}, 0.3), ({}, None)])
def test_value_at_before_the_first_report_is_the_first(values, value):
    assert value_at(values, 1) == value


def curves(seed: int, n: int = 24, epochs: int = 9) -> list[list[float]]:
    """Noisy rising curves that cross: a rate and a ceiling per trial."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        rate, top = rng.uniform(0.05, 1.0), rng.uniform(0.5, 1.0)
        out.append([top * (1 - (1 - rate) ** e) + rng.gauss(0, 0.02) for e in range(1, epochs + 1)])
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_resource,rf", [(1, 2), (1, 3), (2, 3), (1, 4)])
def test_uncapped_decides_as_optunas_asha(seed, min_resource, rf):
    """With more rungs than a trial reaches, the pruner is Optuna's SuccessiveHalvingPruner:
    the same epochs for every trial."""
    c = curves(seed)
    ours = replay(c, CappedSuccessiveHalvingPruner(min_resource, rf, max_rungs=10), 2.0)
    optunas = optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=rf)
    assert ours == replay(c, optunas, 2.0)
    assert ours.pruned > 0  # the curves give the pruner something to cut


def test_after_max_rungs_a_trial_runs_to_the_end():
    # trial 2 is best at epoch 1, then the worst by far at epoch 3 (Optuna's ASHA cuts it there)
    c = [[0.5, 0.6, 0.9, 0.9], [0.4, 0.5, 0.8, 0.8], [0.6, 0.6, 0.1, 0.2]]
    assert replay(c, CappedSuccessiveHalvingPruner(1, 3, max_rungs=1), 2.0).stopped_at == (4, 1, 4)
    assert replay(c, CappedSuccessiveHalvingPruner(1, 3, max_rungs=2), 2.0).stopped_at == (4, 1, 3)


def test_rungs_passed_between_two_reports_are_judged_at_the_later_one():
    """An objective that reports every few steps: a trial first reporting step 5 is judged at
    rungs 1 and 4 (its value then is its step-5 value, the latest it has)."""
    study = optuna.create_study(direction="maximize",
                                pruner=CappedSuccessiveHalvingPruner(1, 2, max_rungs=3))  # fmt: skip
    for value in (0.9, 0.8):
        t = study.ask()
        for step in (1, 4, 5):
            t.report(value, step)
        study.tell(t, value)
    late = study.ask()
    late.report(0.5, 5)  # below both at rungs 1 and 4
    assert late.should_prune()
    early = study.ask()
    early.report(0.95, 5)
    assert not early.should_prune()


# (curves, target, pruner, epochs to target, epochs in all, pruned)
REPLAY = [
    ([[0.1, 0.2], [0.3, 0.9]], 0.9, optuna.pruners.NopPruner(), 4, 4, 0),
    ([[0.1, 0.2], [0.3, 0.9]], 0.95, optuna.pruners.NopPruner(), None, 4, 0),
    # the second trial is cut after epoch 1; the third reaches 0.8 at its second epoch
    ([[0.5, 0.6], [0.2, 0.9], [0.6, 0.8]], 0.8, CappedSuccessiveHalvingPruner(1, 2, 1), 5, 5, 1),
    ([[], [0.3, 0.9]], 0.9, optuna.pruners.NopPruner(), 2, 2, 0),  # a trial failed at once
]


@pytest.mark.parametrize("c,target,pruner,to_target,total,pruned", REPLAY)
def test_replay(c, target, pruner, to_target, total, pruned):
    r = replay(c, pruner, target)
    assert (r.to_target, r.total, r.pruned) == (to_target, total, pruned)


BASE = {"name": "s", "objective": "tests.helpers.objectives:curve", "trials": 4,
        "resources": {"site": "local"}, "space": {"x": {"type": "uniform", "low": 0, "high": 1}}}  # fmt: skip


def test_max_rungs_makes_the_capped_pruner(tmp_path: Path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, "pruner": {"name": "asha", "max_rungs": 1}}))
    assert isinstance(make_pruner(load_spec(path)), CappedSuccessiveHalvingPruner)
    path.write_text(yaml.safe_dump({**BASE, "pruner": {"name": "asha"}}))
    assert type(make_pruner(load_spec(path))) is optuna.pruners.SuccessiveHalvingPruner


def assert_refused(tmp_path: Path, pruner: dict, field: str, words: str) -> None:
    """A spec with ``pruner`` is one line naming ``field`` and saying ``words``."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, "pruner": pruner}))
    with pytest.raises(ConfigError) as exc:
        load_spec(path)
    assert exc.value.field == field and words in exc.value.problem, str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("pruner,words", [({"name": "hyperband", "max_rungs": 1}, "only the asha"),
                                          ({"name": "asha", "max_rungs": 0}, "greater than or equal to 1")])  # fmt: skip
def test_bad_max_rungs_is_one_line_naming_the_field(tmp_path: Path, pruner, words):
    assert_refused(tmp_path, pruner, "pruner.max_rungs", words)


# (curves, rungs, epochs each trial ran): each rung keeps 1/its own factor of the trials that
# reached it; after the last rung a trial runs to the end
RUNGS = [
    # rung 1 keeps the best quarter of 4 (only the best so far), rung 3 half of those that got there
    ([[0.5, 0.6, 0.9, 0.9], [0.4, 0.5, 0.8, 0.8], [0.6, 0.6, 0.1, 0.2]], {1: 4, 3: 2},
     (4, 1, 3)),
    # the same curves, one rung: trial 2 runs on
    ([[0.5, 0.6, 0.9, 0.9], [0.4, 0.5, 0.8, 0.8], [0.6, 0.6, 0.1, 0.2]], {1: 4}, (4, 1, 4)),
    # rf 2 at both rungs: trial 1 ties trial 0 at epoch 2 and goes on, trial 2 is below both
    ([[0.5, 0.9, 0.9], [0.6, 0.9, 0.9], [0.7, 0.8, 0.8]], {1: 2, 2: 2}, (3, 3, 2)),
    # rungs given out of order are sorted
    ([[0.5, 0.6, 0.9, 0.9], [0.4, 0.5, 0.8, 0.8], [0.6, 0.6, 0.1, 0.2]], {3: 2, 1: 4},
     (4, 1, 3)),
]  # fmt: skip


@pytest.mark.parametrize("c,rungs,stopped", RUNGS)
def test_each_rung_keeps_its_own_fraction(c, rungs, stopped):
    assert replay(c, RungPruner(rungs), 2.0).stopped_at == stopped


@pytest.mark.parametrize("seed", range(3))
def test_rungs_of_one_factor_decide_as_the_capped_pruner(seed):
    c = curves(seed)
    capped = replay(c, CappedSuccessiveHalvingPruner(1, 3, max_rungs=2), 2.0)
    assert replay(c, RungPruner({1: 3, 3: 3}), 2.0) == capped


def test_rungs_make_the_rung_pruner(tmp_path: Path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, "pruner": {"name": "asha", "rungs": {1: 4, 3: 2}}}))
    pruner = make_pruner(load_spec(path))
    assert type(pruner) is RungPruner and pruner.rungs == {1: 4, 3: 2}


@pytest.mark.parametrize("pruner,words", [
    ({"name": "hyperband", "rungs": {1: 4}}, "only the asha pruner has rungs"),
    ({"name": "asha", "rungs": {1: 4}, "max_rungs": 1}, "give one of them"),
    ({"name": "asha", "rungs": {1: 1}}, "factors >= 2"),
    ({"name": "asha", "rungs": {0: 4}}, "epochs >= 1"),
    ({"name": "asha", "rungs": {}}, "epochs >= 1"),
])  # fmt: skip
def test_bad_rungs_are_one_line_naming_the_field(tmp_path: Path, pruner, words):
    assert_refused(tmp_path, pruner, "pruner.rungs", words)
