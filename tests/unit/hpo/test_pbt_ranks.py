"""PBT in combination (issue 24): a PBT trial runs on one rank (every rank of a multi-rank trial
would copy the boundary's checkpoint into the same folders at once); packed PBT trials (one
rank each) and elastic ranges are the trials' resources like any other."""

from __future__ import annotations

import pytest

from hpcdl.hpo.space import SpecProblem
from hpcdl.hpo.spec import SweepSpec

BASE = {
    "name": "pbt", "train": "train.yaml", "overrides": {"epochs": 6},
    "space": {"optimizer.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}},
    "sampler": {"name": "random"}, "trials": 4, "final": False,
    "pbt": {"interval_epochs": 2},
}  # fmt: skip


@pytest.mark.parametrize(
    ("resources", "field", "words"),
    [
        ({"nodes": 2, "tasks_per_node": 1}, "resources.nodes", "2 node(s) x 1 task(s)"),
        ({"nodes": "1-2", "tasks_per_node": 1}, "resources.nodes", "1-2 node(s)"),
        ({"tasks_per_node": 2}, "resources.tasks_per_node", "a PBT trial runs on one rank"),
        ({"partition": "gpu", "gpus_per_node": 2}, "resources.tasks_per_node",
         "1 node(s) x 2 task(s)"),  # one task per GPU by default
    ],
)  # fmt: skip
def test_a_multi_rank_pbt_trial_is_refused(resources, field, words):
    with pytest.raises(ValueError) as err:
        SweepSpec.model_validate({**BASE, "resources": {"site": "local", **resources}})
    problem = err.value.errors()[0]["ctx"]["error"]  # type: ignore[attr-defined]
    assert isinstance(problem, SpecProblem) and problem.field == field, problem
    assert words in problem.problem, problem.problem


@pytest.mark.parametrize(
    "changes",
    [
        {"resources": {"site": "local"}},
        {"resources": {"site": "devcluster", "cpus_per_task": 2}, "trials_per_node": 2},
        {"resources": {"site": "devcluster", "partition": "gpu", "gpus_per_node": 2,
                       "tasks_per_node": 1, "cpus_per_task": 2}, "trials_per_gpu": 1},
    ],
)  # fmt: skip
def test_one_rank_pbt_trials_packed_or_not_are_accepted(changes):
    assert SweepSpec.model_validate({**BASE, **changes}).pbt is not None
