"""Issue 24's search rules as tables: the spec's objectives, constraints and conditions, the
conditional draw, the Pareto front and best trial, what an objective's result must hold, and
which warm-start trials fit a space. No job, no process: an in-memory Optuna study at most."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.hpo.conditions import active, draw_order
from hpcdl.hpo.pareto import WARM, best_trials, dominates, front, measured
from hpcdl.hpo.spec import SweepSpec, load_spec
from hpcdl.hpo.study import make_sampler, suggest
from hpcdl.hpo.warm import misfit

BASE = {
    "name": "s",
    "objective": "tests.helpers.objectives:curve",
    "trials": 4,
    "resources": {"site": "local"},
    "space": {
        "opt": {"type": "choice", "values": ["sgd", "adam"]},
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1.0},
        "momentum": {"type": "uniform", "low": 0.0, "high": 0.99, "when": {"opt": "sgd"}},
    },
}
TWO = {"objectives": [{"name": "acc"}, {"name": "latency", "direction": "minimize"}]}

# (label, change to BASE, field, words of the one-line error)
BAD = [
    ("unknown parent", {"space": {**BASE["space"], "momentum": {"type": "uniform", "low": 0, "high": 1, "when": {"optimizer": "sgd"}}}},
     "space.momentum.when", "unknown parameter 'optimizer' (the space has opt, lr)"),
    ("impossible value", {"space": {**BASE["space"], "momentum": {"type": "uniform", "low": 0, "high": 1, "when": {"opt": "rmsprop"}}}},
     "space.momentum.when", "opt='rmsprop' is impossible: 'opt' takes one of 'sgd', 'adam'"),
    ("impossible in a list", {"space": {**BASE["space"], "momentum": {"type": "uniform", "low": 0, "high": 1, "when": {"opt": ["sgd", "ada"]}}}},
     "space.momentum.when", "opt='ada' is impossible"),
    ("int out of range", {"space": {"layers": {"type": "int", "low": 1, "high": 4}, "width": {"type": "int", "low": 8, "high": 64, "when": {"layers": 9}}}},
     "space.width.when", "layers=9 is impossible: 'layers' takes integers 1..4 step 1"),
    ("continuous parent", {"space": {"lr": {"type": "uniform", "low": 0, "high": 1}, "m": {"type": "uniform", "low": 0, "high": 1, "when": {"lr": 0.5}}}},
     "space.m.when", "'lr' is a continuous range"),
    ("self", {"space": {"a": {"type": "choice", "values": [1, 2], "when": {"a": 1}}}},
     "space.a.when", "cannot depend on itself"),
    ("cycle", {"space": {"a": {"type": "choice", "values": [1, 2], "when": {"b": 1}}, "b": {"type": "choice", "values": [1, 2], "when": {"a": 1}}}},
     "space.a.when", "conditions form a cycle"),
    ("grid sampler", {"sampler": {"name": "grid"}, "space": {"a": {"type": "grid", "values": [1, 2]}, "b": {"type": "grid", "values": [1, 2], "when": {"a": 1}}}},
     "space.b.when", "the grid sampler draws every parameter"),
    ("pruning two objectives", {**TWO, "pruner": {"name": "asha"}},
     "pruner.name", "Optuna does not prune multi-objective studies"),
    ("cmaes two objectives", {**TWO, "sampler": {"name": "cmaes"}},
     "sampler.name", "'cmaes' optimises one objective"),
    ("final with two", {**TWO, "final": True}, "final", "has a Pareto front, not one best"),
    ("metric against objectives", {**TWO, "metric": "loss"}, "metric", "differs from the first of `objectives`"),
    ("direction against objectives", {**TWO, "direction": "minimize"}, "direction", "differs from the first"),
    ("objective twice", {"objectives": [{"name": "acc"}, {"name": "acc"}]}, "objectives.1.name", "named twice"),
    ("constraint is an objective", {**TWO, "constraints": ["latency"]}, "constraints", "'latency' is named twice"),
    ("constraint name", {"constraints": ["mem use"]}, "constraints", "a metric name"),
    ("constraints with cmaes", {"constraints": ["mem"], "sampler": {"name": "cmaes"}}, "constraints", "cmaes sampler ignores constraints"),
    ("no objectives", {"objectives": []}, "objectives", "at least 1 item"),
    ("unknown sampler", {"sampler": {"name": "botorch"}}, "sampler.name", "'gp'"),
]  # fmt: skip


@pytest.mark.parametrize("label,change,field,words", BAD, ids=[b[0] for b in BAD])
def test_bad_search_specs_name_the_file_and_field(tmp_path: Path, label, change, field, words):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change}, sort_keys=False))
    with pytest.raises(ConfigError) as exc:
        load_spec(path)
    assert exc.value.where == str(path) and exc.value.field == field, str(exc.value)
    assert words in exc.value.problem and "\n" not in str(exc.value)


GOOD = [
    ("one objective", {}, ["val_acc"], ["maximize"], True),
    ("two objectives", TWO, ["acc", "latency"], ["maximize", "minimize"], False),
    ("one in the list", {"objectives": [{"name": "loss", "direction": "minimize"}]}, ["loss"], ["minimize"], True),
    ("two, final false", {**TWO, "final": False}, ["acc", "latency"], ["maximize", "minimize"], False),
    ("nsga2 constrained", {**TWO, "constraints": ["mem"], "sampler": {"name": "nsga2"}}, ["acc", "latency"], ["maximize", "minimize"], False),
    ("gp", {"sampler": {"name": "gp"}, "constraints": ["mem"]}, ["val_acc"], ["maximize"], True),
]  # fmt: skip


@pytest.mark.parametrize("label,change,metrics,directions,final", GOOD, ids=[g[0] for g in GOOD])
def test_good_specs_and_their_round_trip(tmp_path, label, change, metrics, directions, final):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change}, sort_keys=False))
    spec = load_spec(path)
    assert (spec.metrics, spec.directions, spec.final) == (metrics, directions, final)
    assert (spec.metric, spec.direction) == (metrics[0], directions[0])
    assert SweepSpec.model_validate_json(spec.model_dump_json()) == spec  # spec.json reloads


def test_load_spec_resolves_a_warm_start_file_next_to_the_spec(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, "warm_start": "prior.json"}))
    assert load_spec(path).warm_start == str(tmp_path / "prior.json")
    path.write_text(yaml.safe_dump({**BASE, "warm_start": "other-sweep"}))
    assert load_spec(path).warm_start == "other-sweep"


# -- conditional draws ----------------------------------------------------------------------------
ACTIVE = [
    (None, {}, True),
    ({"opt": "sgd"}, {"opt": "sgd"}, True),
    ({"opt": "sgd"}, {"opt": "adam"}, False),
    ({"opt": ["sgd", "adam"]}, {"opt": "adam"}, True),
    ({"opt": "sgd"}, {}, False),  # the parent itself was not drawn
    ({"opt": "sgd", "layers": 2}, {"opt": "sgd", "layers": 3}, False),
    ({"opt": "sgd", "layers": 2}, {"opt": "sgd", "layers": 2}, True),
]


@pytest.mark.parametrize("when,drawn,expected", ACTIVE)
def test_active(when, drawn, expected):
    assert active(when, drawn) is expected


def test_draw_order_puts_parents_first():
    spec = SweepSpec.model_validate({**BASE, "space": {
        "nesterov": {"type": "choice", "values": [True, False], "when": {"momentum_on": "yes"}},
        "momentum_on": {"type": "choice", "values": ["yes", "no"], "when": {"opt": "sgd"}},
        "opt": {"type": "choice", "values": ["sgd", "adam"]},
    }})  # fmt: skip
    assert draw_order(spec.space) == ["opt", "momentum_on", "nesterov"]


@pytest.mark.parametrize("sampler", ["random", "tpe", "nsga2"])  # gp: the local sweep test
def test_a_conditional_parameter_is_drawn_exactly_when_its_condition_holds(sampler):
    spec = SweepSpec.model_validate({**BASE, "sampler": {"name": sampler, "n_startup_trials": 2}})
    study = optuna.create_study(sampler=make_sampler(spec), directions=spec.directions)
    seen = set()
    for i in range(6):
        trial = study.ask()
        params = suggest(trial, spec)
        assert ("momentum" in params) == (params["opt"] == "sgd"), params
        assert set(trial.params) == set(params)  # what Optuna stored is what the trial runs
        seen.add(params["opt"])
        study.tell(trial, params["lr"] + params.get("momentum", 0.0) + i)
    assert seen == {"sgd", "adam"}


# -- Pareto front and the best trial -----------------------------------------------------------
MAXMIN = ["maximize", "minimize"]
DOMINATES = [
    ((0.9, 1.0), (0.8, 2.0), MAXMIN, True),
    ((0.9, 1.0), (0.9, 1.0), MAXMIN, False),  # equal: neither
    ((0.9, 2.0), (0.8, 1.0), MAXMIN, False),  # better in one, worse in the other
    ((0.9, 1.0), (0.9, 1.5), MAXMIN, True),
    ((1.0,), (2.0,), ["minimize"], True),
    ((1.0, 1.0), (2.0, 2.0), ["maximize", "maximize"], False),
]


@pytest.mark.parametrize("a,b,directions,expected", DOMINATES)
def test_dominates(a, b, directions, expected):
    assert dominates(a, b, directions) is expected


FRONTS = [
    ([(0, (0.9, 3.0)), (1, (0.8, 1.0)), (2, (0.7, 2.0)), (3, (0.9, 3.0))], MAXMIN, [0, 1, 3]),
    ([(0, (0.5, 1.0)), (1, (0.6, 1.0)), (2, (0.7, 0.5))], MAXMIN, [2]),
    ([(5, (1.0,)), (6, (0.5,))], ["minimize"], [6]),
    ([], MAXMIN, []),
]


@pytest.mark.parametrize("points,directions,expected", FRONTS)
def test_front(points, directions, expected):
    assert front(points, directions) == expected


def _t(number, values, state="COMPLETE", constraints=None, warm=False):
    return SimpleNamespace(number=number, values=values, state=SimpleNamespace(name=state),
                           constraints=constraints or {}, user_attrs={WARM: "x"} if warm else {})  # fmt: skip


BEST = [
    ("max one", [_t(0, [0.5]), _t(1, [0.7]), _t(2, [0.6])], ["maximize"], [1]),
    ("min one", [_t(0, [0.5]), _t(1, [0.7])], ["minimize"], [0]),
    ("a tie: the first", [_t(3, [0.7]), _t(1, [0.7]), _t(2, [0.6])], ["maximize"], [3]),
    ("infeasible set aside", [_t(0, [0.9], constraints={"mem": 0.1}), _t(1, [0.7], constraints={"mem": 0.0})], ["maximize"], [1]),
    ("warm set aside", [_t(0, [0.99], warm=True), _t(1, [0.7])], ["maximize"], [1]),
    ("pruned and failed set aside", [_t(0, None, "PRUNED"), _t(1, None, "FAIL"), _t(2, [0.1])], ["maximize"], [2]),
    ("nothing feasible", [_t(0, [0.9], constraints={"mem": 1.0})], ["maximize"], []),
    ("front", [_t(0, [0.9, 3.0]), _t(1, [0.8, 1.0]), _t(2, [0.7, 2.0]), _t(3, [0.95, 9.0], warm=True)], MAXMIN, [0, 1]),
]  # fmt: skip


@pytest.mark.parametrize("label,trials,directions,expected", BEST, ids=[b[0] for b in BEST])
def test_best_trials(label, trials, directions, expected):
    assert [t.number for t in best_trials(trials, directions)] == expected


def test_best_trials_agree_with_optuna_on_a_constrained_front():
    study = optuna.create_study(directions=MAXMIN)
    for i, (acc, lat, mem) in enumerate([(0.9, 3, 0), (0.8, 1, 0), (0.95, 1, 1), (0.7, 2, -1)]):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.set_constraint("mem", mem)
        study.tell(trial, [acc, lat])
        assert trial.number == i
    ours = [t.number for t in best_trials(study.trials, MAXMIN)]
    assert ours == sorted(t.number for t in study.best_trials) == [0, 1]


# -- an objective's result ---------------------------------------------------------------------
MEASURED = [
    (0.5, ["acc"], [], {"acc": 0.5}),
    ({"acc": 1, "lat": 2.5, "extra": 9}, ["acc", "lat"], [], {"acc": 1.0, "lat": 2.5}),
    ({"acc": 1, "mem": -2}, ["acc"], ["mem"], {"acc": 1.0, "mem": -2.0}),
    ({"acc": float("inf")}, ["acc"], [], {"acc": float("inf")}),
]
MEASURED_BAD = [
    (0.5, ["acc", "lat"], [], "returned one number (0.5); the sweep records acc, lat"),
    (0.5, ["acc"], ["mem"], "records acc, mem: return a dict"),
    ({"acc": 1}, ["acc", "lat"], [], "has no 'lat' (it has acc)"),
    ({"acc": "high"}, ["acc"], [], "'acc' is not a number"),
    ({"acc": float("nan")}, ["acc"], [], "'acc' is NaN"),
]


@pytest.mark.parametrize("result,metrics,constraints,expected", MEASURED)
def test_measured(result, metrics, constraints, expected):
    assert measured(result, metrics, constraints) == expected


@pytest.mark.parametrize("result,metrics,constraints,words", MEASURED_BAD)
def test_measured_refuses(result, metrics, constraints, words):
    with pytest.raises(HpcdlError, match=None) as exc:
        measured(result, metrics, constraints)
    assert words in str(exc.value)


# -- which warm-start trials fit the space ------------------------------------------------------
SPACE = SweepSpec.model_validate(BASE).space
MISFIT = [
    ({"opt": "adam", "lr": 0.01}, None),
    ({"opt": "sgd", "lr": 0.01, "momentum": 0.9}, None),
    ({"opt": "sgd", "lr": 0.01}, "lacks parameter 'momentum'"),
    ({"opt": "adam", "lr": 0.01, "momentum": 0.9}, "has 'momentum', which this space draws only when opt='sgd'"),
    ({"opt": "adam", "lr": 0.01, "wd": 0.1}, "parameter 'wd' is not in this sweep's space"),
    ({"opt": "adam", "lr": 5.0}, "lr=5.0 is outside this sweep's space"),
    ({"opt": "rmsprop", "lr": 0.01}, "opt='rmsprop' is outside this sweep's space"),
]  # fmt: skip


@pytest.mark.parametrize("params,expected", MISFIT)
def test_misfit(params, expected):
    assert misfit(params, SPACE) == expected


def test_a_retry_adopts_a_multi_objective_trial_the_study_completed(tmp_path, monkeypatch):
    """As test_claim_adopt for one objective: the study was told, the slot write was lost.
    ``FrozenTrial.value`` raises on a multi-objective trial; the slot takes the first value."""
    from hpcdl.hpo.folder import Slot, SweepPaths
    from hpcdl.hpo.study import open_study
    from hpcdl.hpo.trial import claim

    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4243")  # another task than the dead one
    spec = SweepSpec.model_validate({**BASE, **TWO, "name": "adopt2"})
    paths = SweepPaths(tmp_path / "adopt2")
    paths.slots.mkdir(parents=True)
    study = open_study(spec, paths.root)
    trial = study.ask()
    study.tell(trial, [0.75, 3.0])
    paths.write_slot(Slot(slot=0, trial=trial.number, params={}, run_id="r0", job="4242"))
    assert claim(paths, spec, study, 0) is None
    slot = paths.read_slot(0)
    assert slot is not None and (slot.state, slot.value) == ("complete", 0.75)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcde", "bcdef", strict=True)
)
WARM_FILES = [
    ("alias bomb", BOMB, "aliases expand to more than 10,000 nodes"),
    ("too big", "#" * (1024 * 1024 + 1), "is over 1048576 bytes"),
    ("not a list", "params: {x: 1}", "give a list of trials"),
    ("no params", "- {values: {val_acc: 1}}", "trial 0 has no `params` mapping"),
    ("values without an objective", "- {params: {opt: adam, lr: 0.1}, values: {acc: 1}}",
     "trial 0: `values` has no number for 'val_acc'"),
    ("a misfit", "- {params: {opt: adam, lr: 0.1, momentum: 0.5}}",
     "trial 0 has 'momentum', which this space draws only when opt='sgd'"),
    ("more to run than trials", "[" + ", ".join(["{params: {opt: adam, lr: 0.1}}"] * 5) + "]",
     "5 parameter sets to run but trials is 4"),
]  # fmt: skip


def _no_sweep(name: str) -> None:
    raise AssertionError(f"a warm-start file opened sweep {name!r}")


@pytest.mark.parametrize("label,text,words", WARM_FILES, ids=[w[0] for w in WARM_FILES])
def test_warm_start_files_are_refused_in_one_line(tmp_path, label, text, words):
    from hpcdl.hpo.warm import load_warm

    prior = tmp_path / "prior.yaml"
    prior.write_text(text)
    spec = SweepSpec.model_validate({**BASE, "warm_start": str(prior)})
    with pytest.raises(ConfigError) as exc:
        load_warm(spec, "sweep.yaml", _no_sweep)
    assert (exc.value.where, exc.value.field) == ("sweep.yaml", "warm_start")
    assert words in exc.value.problem and "\n" not in str(exc.value), str(exc.value)


def test_a_warm_start_file_of_measured_and_unmeasured_trials(tmp_path):
    from hpcdl.hpo.warm import apply, load_warm

    prior = tmp_path / "prior.json"
    prior.write_text('{"trials": [{"params": {"opt": "sgd", "lr": 0.01, "momentum": 0.9},'
                     ' "values": {"val_acc": 0.8, "mem": -1}}, {"params": {"opt": "adam", "lr": 0.1}}]}')  # fmt: skip
    spec = SweepSpec.model_validate({**BASE, "constraints": ["mem"], "warm_start": str(prior)})
    study = optuna.create_study(directions=spec.directions)
    apply(study, spec, load_warm(spec, "sweep.yaml", _no_sweep))
    added, queued = study.trials
    assert (added.state.name, added.values, added.constraints) == ("COMPLETE", [0.8], {"mem": -1.0})
    assert added.user_attrs[WARM] == str(prior)
    assert queued.state.name == "WAITING"
    trial = study.ask()  # the enqueued parameters are this sweep's first trial
    assert suggest(trial, spec) == {"opt": "adam", "lr": 0.1}
