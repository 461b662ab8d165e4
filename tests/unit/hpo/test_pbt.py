"""Population-based training's rules as tables (hpcdl.hpo.pbt_spec): which ``pbt:`` sections
are refused and with which one line, who exploits whom, how explore perturbs; and the two
trainer pieces it needs, in-process: a stop that checkpoints pickles its flag, and a load
followed by ``retune`` takes the config's learning rate and weight decay (and changes nothing
on a plain resume). The whole loop runs on the dev cluster: tests/cluster/test_sweep_pbt.py."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from hpcdl.errors import ConfigError
from hpcdl.hpo.pbt_spec import donor, perturb, perturbed_names, rng_for
from hpcdl.hpo.spec import SweepSpec, load_spec
from hpcdl.train.config import TrainConfig
from hpcdl.train.engine import retune
from hpcdl.train.stop import StopTraining

SPACE = {
    "optimizer.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
    "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
    "model.width": {"type": "int", "low": 8, "high": 64, "step": 8},
    "model.activation": {"type": "choice", "values": ["relu", "tanh"]},
    "batch.size": {"type": "int", "low": 16, "high": 64},
}
BASE = {
    "name": "pbt",
    "train": "train.yaml",
    "overrides": {"epochs": 6},
    "space": SPACE,
    "sampler": {"name": "random"},
    "trials": 4,
    "final": False,
    "pbt": {"interval_epochs": 2},
    "resources": {"site": "local"},
}

# (label, change to BASE, field, words of the one-line error)
BAD = [
    ("own objective", {"objective": "tests.helpers.objectives:curve"}, "pbt",
     "PBT copies the checkpoints of hpcdl's trainer"),
    ("several objectives", {"objectives": [{"name": "val_acc"}, {"name": "val_loss", "direction": "minimize"}]},
     "pbt", "PBT ranks trials by one objective"),
    ("with a pruner", {"pruner": {"name": "asha"}}, "pruner.name", "PBT replaces a bad trial's weights"),
    ("final retraining", {"final": True}, "final", "give final: false"),
    ("interval as long as training", {"pbt": {"interval_epochs": 6}}, "pbt.interval_epochs",
     "6: must be below the trials' epochs (6)"),
    ("unknown parameter", {"pbt": {"interval_epochs": 2, "perturb": ["optimizer.momentum"]}},
     "pbt.perturb", "'optimizer.momentum' is not a parameter of the space"),
    ("a choice", {"pbt": {"interval_epochs": 2, "perturb": ["model.activation"]}},
     "pbt.perturb", "'model.activation' is a choice: PBT perturbs numbers"),
    ("the batch size", {"pbt": {"interval_epochs": 2, "perturb": ["batch.size"]}},
     "pbt.perturb", "a resumed checkpoint keeps its batch size"),
    ("nothing numeric", {"space": {"model.activation": SPACE["model.activation"]}},
     "pbt.perturb", "the space has no numeric parameter to perturb"),
    ("quantile above a half", {"pbt": {"interval_epochs": 2, "quantile": 0.6}},
     "pbt.quantile", "less than or equal to 0.5"),
    ("factor not positive", {"pbt": {"interval_epochs": 2, "factors": [0.8, 0]}},
     "pbt.factors", "give numbers > 0"),
    ("no interval", {"pbt": {}}, "pbt.interval_epochs", "Field required"),
]  # fmt: skip


@pytest.mark.parametrize("label,change,field,words", BAD, ids=[b[0] for b in BAD])
def test_bad_pbt_section_is_one_line_naming_the_field(tmp_path: Path, label, change, field, words):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change}))
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert words in message and "\n" not in message


def test_perturbed_names_default_to_the_numbers_a_resume_can_take():
    spec = SweepSpec.model_validate(BASE)
    assert spec.pbt is not None
    assert perturbed_names(spec.space, spec.pbt) == ["optimizer.lr", "model.dropout", "model.width"]
    chosen = spec.pbt.model_copy(update={"perturb": ["model.dropout"]})
    assert perturbed_names(spec.space, chosen) == ["model.dropout"]


# (label, me, scores, quantile, maximize, who may be chosen)
DONORS = [
    ("alone", 0, {0: 0.5}, 0.25, True, {None}),
    ("not recorded", 3, {0: 0.5, 1: 0.9}, 0.25, True, {None}),
    ("two: the worse takes the better", 1, {0: 0.9, 1: 0.5}, 0.25, True, {0}),
    ("two: the better keeps its own", 0, {0: 0.9, 1: 0.5}, 0.25, True, {None}),
    ("minimize: lower is better", 0, {0: 0.9, 1: 0.5}, 0.25, False, {1}),
    ("a tie: nobody strictly better", 1, {0: 0.5, 1: 0.5}, 0.25, True, {None}),
    ("four, quarter: only the worst", 3, {0: 0.9, 1: 0.8, 2: 0.7, 3: 0.1}, 0.25, True, {0}),
    ("four, quarter: the middle keeps", 2, {0: 0.9, 1: 0.8, 2: 0.7, 3: 0.1}, 0.25, True, {None}),
    ("four, half: the bottom two", 2, {0: 0.9, 1: 0.8, 2: 0.7, 3: 0.1}, 0.5, True, {0, 1}),
    ("eight, quarter: one of the top two", 7, {i: 1 - i / 10 for i in range(8)}, 0.25, True, {0, 1}),
    ("three, half: k is 1", 2, {0: 0.3, 1: 0.2, 2: 0.1}, 0.5, True, {0}),
]  # fmt: skip


@pytest.mark.parametrize("label,me,scores,quantile,maximize,allowed", DONORS,
                         ids=[d[0] for d in DONORS])  # fmt: skip
def test_donor(label, me, scores, quantile, maximize, allowed):
    seen = {donor(me, scores, quantile, maximize, random.Random(seed)) for seed in range(20)}
    assert seen <= allowed and seen, seen


def test_the_same_sweep_decides_the_same_way_again():
    scores = {i: 1 - i / 10 for i in range(8)}
    first = [donor(7, scores, 0.25, True, rng_for(0, 7, e)) for e in range(10)]
    assert first == [donor(7, scores, 0.25, True, rng_for(0, 7, e)) for e in range(10)]
    assert len(set(first)) == 2  # and it does pick among the top


PARAMS = {"optimizer.lr": 0.01, "model.dropout": 0.45, "model.width": 32,
          "model.activation": "tanh", "batch.size": 32}  # fmt: skip
SPEC = SweepSpec.model_validate(BASE)


@pytest.mark.parametrize("factor,want", [
    (0.8, {"optimizer.lr": 0.008, "model.dropout": 0.36, "model.width": 24}),  # 25.6 → step 8
    (1.2, {"optimizer.lr": 0.012, "model.dropout": 0.5, "model.width": 40}),  # dropout capped
    (10.0, {"optimizer.lr": 0.1, "model.dropout": 0.5, "model.width": 64}),  # all at their highs
    (0.001, {"optimizer.lr": 1e-4, "model.dropout": 0.00045, "model.width": 8}),
])  # fmt: skip
def test_perturb_multiplies_within_range(factor, want):
    names = ["optimizer.lr", "model.dropout", "model.width"]
    got = perturb(PARAMS, SPEC.space, names, [factor], random.Random(0))
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert isinstance(got["model.width"], int)
    assert {k: got[k] for k in ("model.activation", "batch.size")} == {"model.activation": "tanh",
                                                                       "batch.size": 32}  # fmt: skip


def test_perturb_leaves_out_a_parameter_the_trial_has_not():
    got = perturb({"optimizer.lr": 0.01}, SPEC.space, ["optimizer.lr", "model.dropout"], [2.0],
                  random.Random(0))  # fmt: skip
    assert got == {"optimizer.lr": 0.02}


def test_a_checkpointing_stop_keeps_its_flag_across_processes():
    stop = pickle.loads(pickle.dumps(StopTraining("boundary", tag="pbt", checkpoint=True)))
    assert (str(stop), stop.tag, stop.checkpoint) == ("boundary", "pbt", True)
    assert pickle.loads(pickle.dumps(StopTraining("x"))).checkpoint is False


def _engine(lr: float, weight_decay: float, steps: int) -> SimpleNamespace:
    """A real optimizer and LambdaLR, stepped ``steps`` times, as DeepSpeed's engine holds them."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(steps):
        opt.step()
        sched.step()
    return SimpleNamespace(optimizer=opt, lr_scheduler=sched)


def _cfg(lr: float, weight_decay: float) -> TrainConfig:
    return TrainConfig.model_validate({"name": "t", "model": {"name": "mlp"},
                                       "data": {"train": "/d/train", "val": "/d/val"},
                                       "optimizer": {"lr": lr, "weight_decay": weight_decay}})  # fmt: skip


def test_retune_changes_nothing_on_a_plain_resume():
    engine = _engine(0.01, 0.02, 3)
    before = (engine.optimizer.state_dict(), engine.lr_scheduler.state_dict())
    assert retune(engine, _cfg(0.01, 0.02)) is None
    assert engine.optimizer.state_dict()["param_groups"] == before[0]["param_groups"]
    assert engine.lr_scheduler.state_dict() == before[1]


def test_retune_puts_the_configs_rate_and_decay_into_a_loaded_optimizer():
    """What a PBT exploit resumes: the donor's optimizer (lr 0.01 after 3 steps of the schedule)
    with the explored lr 0.02 and weight decay 0.05; the schedule goes on from its step."""
    engine = _engine(0.01, 0.02, 3)
    assert retune(engine, _cfg(0.02, 0.05)) == {"lr": 0.02, "weight_decay": 0.05}
    group = engine.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.02 / 4) and group["weight_decay"] == 0.05
    engine.optimizer.step()
    engine.lr_scheduler.step()
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.02 / 5)


def test_an_exploit_copies_only_a_boundary_copy_of_the_named_trial_in_this_sweep(tmp_path: Path):
    """The scores file names the checkpoint to copy; a trial copies it only from the named
    trial's own ``pbt/epoch-E`` folder in this sweep (not another sweep's, not through a link
    out of it), whatever the file says."""
    from hpcdl.hpo.pbt import own_snapshot

    sweep, other = tmp_path / "sweep", tmp_path / "other"
    good = sweep / "trials/trial-00002/pbt/epoch-00003"
    for folder in (good, other / "trials/trial-00002/pbt/epoch-00003", tmp_path / "outside"):
        folder.mkdir(parents=True)
    (sweep / "trials/trial-00002/pbt/epoch-00009").symlink_to(tmp_path / "outside")
    assert own_snapshot(good, sweep, 2)
    assert own_snapshot(sweep / "trials/trial-00002/pbt/../pbt/epoch-00003", sweep, 2)
    assert not own_snapshot(good, sweep, 1)  # another trial's folder than the record's
    assert not own_snapshot(other / "trials/trial-00002/pbt/epoch-00003", sweep, 2)
    assert not own_snapshot(sweep / "trials/trial-00002/pbt/epoch-00009", sweep, 2)  # a link out
    assert not own_snapshot(sweep / "trials/trial-00002/pbt/epoch-00004", sweep, 2)  # missing
    assert not own_snapshot(sweep / "trials/trial-00002", sweep, 2)
