"""Population-based training on the dev cluster (issue 24): four digits trials on a warm
worker, exploit and explore at two boundaries (epochs 1 and 2 of 3). It proves what the tables of
tests/unit/hpo/test_pbt.py cannot: the exploiting trial resumed from the better trial's
checkpoint (the step after that trial's boundary validation), with explored parameters that
its run then used, all recorded in its slot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers.train_setup import rows, write_config, write_digits

from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.scheduler import log_tail

# ~30 s (twelve trainer starts, one after the other): over what make test can add, so it runs
# only when asked for: -m scale (make test-scale), or -m pbt once that marker is registered.
pytestmark = [pytest.mark.slurm, pytest.mark.scale]


@pytest.fixture
def selected(request: pytest.FixtureRequest) -> None:
    expr = request.config.getoption("markexpr") or ""
    if "scale" not in expr or "not scale" in expr:
        pytest.skip("the PBT acceptance run (~30 s) runs only with -m scale")


def test_pbt_exploits_a_better_checkpoint_and_explores(devcluster, selected, tmp_path: Path):
    digits = write_digits(tmp_path / "digits")
    train = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs")
    spec = SweepSpec.model_validate({
        "name": "pbt",
        "train": str(train),
        "overrides": {"epochs": 3, "zero_stage": 0, "log.every_steps": 1000,
                      "checkpoint.every_steps": 0, "log.wandb": False},
        "space": {"optimizer.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-2},
                  "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.5}},
        "sampler": {"name": "random", "seed": 0},
        "pbt": {"interval_epochs": 1, "quantile": 0.5},  # boundaries after epochs 1 and 2
        "trials": 4,
        "parallelism": 1,  # one warm worker: each trial meets all the trials before it
        "final": False,
        "resources": {"site": "devcluster", "tasks_per_node": 1, "time": "10m"},
    })  # fmt: skip
    sweep = Sweep(spec)
    try:
        workers = sweep.run()[0]
        try:
            sweep.wait(timeout=300, poll=1.0)
        except TimeoutError as exc:
            pytest.fail(f"{exc}\n{log_tail(workers, 60)}")
    finally:
        sweep.cancel()
    slots = sweep.slots()
    assert [s.state for s in slots] == ["complete"] * 4
    assert sorted(s.trial for s in slots) == [0, 1, 2, 3] and len(sweep.study().trials) == 4
    assert all([e["epoch"] for e in s.pbt] == [1, 2] for s in slots), [s.pbt for s in slots]
    exploits = [(s, e) for s in slots for e in s.pbt if e["action"] == "exploit"]
    assert exploits, [s.pbt for s in slots]
    by_trial = {s.trial: s for s in slots}
    for slot, event in exploits:
        donor = by_trial[event["from_trial"]]
        assert event["from_value"] > event["value"]  # it took a strictly better trial's
        snapshot = Path(event["checkpoint"])
        assert snapshot.parent.parent == sweep.paths.trial_dir(donor)  # the donor's copy
        tag = (snapshot / "latest").read_text().strip()
        # explore: the donor's parameters, each multiplied by 0.8 or 1.2 (within range)
        donor_params = next(r["params"] for r in _scores(sweep) if r["trial"] == donor.trial
                            and r["epoch"] == event["epoch"])  # fmt: skip
        assert event["params"] != donor_params
        for key, value in event["params"].items():
            assert value / donor_params[key] in (pytest.approx(0.8), pytest.approx(1.2)) or (
                value in (spec.space[key].low, spec.space[key].high)
            ), (key, value)  # type: ignore[union-attr]
        # exploit: the trial resumed from that very checkpoint ...
        run = sweep.paths.trial_dir(slot)
        resumes = [r for r in rows(run, "event") if r["event"] == "resume"]
        assert any(r["checkpoint"] == tag for r in resumes), (tag, resumes)
        # ... taken at the donor's first optimizer step after that epoch's validation (its
        # last micro-batches wait for it: a checkpoint before would lose their gradients)
        donor_epochs = {r["epoch"]: r["step"] for r in rows(sweep.paths.trial_dir(donor), "epoch")}
        assert int(tag.removeprefix("step")) == donor_epochs[event["epoch"] - 1] + 1, tag
        # ... and trained on with the explored learning rate: at the same step of the next
        # segment, the schedule's factor is the donor's, the base rate its own (the optimizer
        # loaded from the donor's checkpoint was retuned; without that the rates are equal)
        resumed = next(r for r in resumes if r["checkpoint"] == tag)
        assert resumed["retuned"]["lr"] == event["params"]["optimizer.lr"], resumed
        mine = {r["step"]: r["lr"] for r in rows(run, "step") if r["step"] > resumed["step"]}
        theirs = {r["step"]: r["lr"] for r in rows(sweep.paths.trial_dir(donor), "step")}
        for step in [s for s in mine if theirs.get(s)]:  # the cosine's last step has a rate of 0
            assert mine[step] / theirs[step] == pytest.approx(
                event["params"]["optimizer.lr"] / donor_params["optimizer.lr"]
            ), (mine, theirs)
        # ... and then trained with the explored parameters
        config = yaml.safe_load((run / "config.yaml").read_text())
        if event is slot.pbt[-1] or slot.pbt[-1]["action"] == "kept":
            last = [e for e in slot.pbt if e["action"] == "exploit"][-1]["params"]
            assert config["optimizer"]["lr"] == last["optimizer.lr"]
            assert config["model"]["dropout"] == last["model.dropout"]


def _scores(sweep: Sweep) -> list[dict]:
    path = sweep.paths.root / "pbt" / "scores.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
