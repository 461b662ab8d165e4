"""A sweep's budget on the local profile (real workers, real Optuna): sampling stops once the
trials have spent it, within one trial, and the sweep finishes without the unsampled slots."""

from __future__ import annotations

import json

from hpcdl.cli import main
from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.budget import read_journals, spans


def test_budget_stops_sampling_within_one_trial(job_root, monkeypatch, capsys):
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "0.5")  # 4 epochs: about 2 s a trial
    budget_s = 5.0
    spec = SweepSpec.model_validate({
        "name": "budget",
        "objective": "tests.helpers.objectives:curve",
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random", "seed": 0},
        "trials": 20, "parallelism": 1, "final": False,
        "resources": {"site": "local", "time": "10m"},
        "budget": {"node_hours": budget_s / 3600},
    })  # fmt: skip
    sweep = Sweep(spec)
    sweep.run()
    sweep.wait(timeout=120)  # finished: the unsampled slots are not missing
    ran = [s for s in sweep.slots() if s.state != "running"]
    assert 2 <= len(ran) < 20 and all(s.state == "complete" for s in ran)
    lengths = [(s.ended or 0) - s.claimed for s in spans(read_journals(sweep.paths), [])]
    assert len(lengths) == len(ran)
    total = sum(lengths)
    # the last trial started before the budget was spent and ran to its end: over by less
    # than that one trial; without it the sweep was still under
    assert budget_s <= total < budget_s + lengths[-1]
    assert total - lengths[-1] < budget_s
    note = json.loads(sweep.paths.budget_spent.read_text())
    assert note["unit"] == "node-hours" and note["spent"] * 3600 >= budget_s
    assert len(sweep.study().trials) == len(ran)  # nothing sampled after the note
    assert main(["sweep", "status", "budget"]) == 0
    out = capsys.readouterr().out
    assert (
        f"budget: {total / 3600:.3g} of {budget_s / 3600:g} node-hours spent, 0 left; "
        "sampling stopped"
        in out
        and "finished" in out
    )
    # more trials would never be sampled: extend says so instead of a round that does nothing
    assert main(["sweep", "extend", "budget", "4"]) == 2
    err = capsys.readouterr().err
    assert "stopped sampling: its budget is spent" in err and "warm_start=budget" in err
    assert sweep.paths.load_spec().trials == 20  # nothing changed
