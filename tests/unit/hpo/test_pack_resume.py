"""Trial packing across ``sweep resume`` (issue 24): ``trials_per_node``/``trials_per_gpu`` are
resume keys (how the rest of the sweep runs), checked like any spec; a round's workers keep the
packing it was queued with, so a task of that round requeued after the resume runs the lanes its
claims (``TASK+LANE``) name. The cluster run, both directions: tests/cluster/test_pack_resume.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcdl.errors import ConfigError
from hpcdl.hpo.folder import SweepPaths
from hpcdl.hpo.lifecycle import Lifecycle
from hpcdl.hpo.spec import SweepSpec
from hpcdl.hpo.sweep import resumed_spec
from hpcdl.hpo.worker import round_packing
from hpcdl.site import load_site

WHERE = "/sweeps/p/spec.json"


def _spec(**changes) -> SweepSpec:
    return SweepSpec.model_validate({
        "name": "p", "objective": "tests.helpers.pack_objectives:slow",
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random"}, "trials": 6, "parallelism": 1, "trials_per_node": 2,
        "final": False, "resources": {"site": "devcluster", "time": "5m", "cpus_per_task": 2},
        **changes,
    })  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "lanes"),
    [
        (["trials_per_node=4", "resources.cpus_per_task=4"], 4),  # more lanes
        (["trials_per_node=1"], 1),  # fewer: one trial at a time
        (["trials_per_node=null"], 1),
    ],
)
def test_packing_is_a_resume_key(overrides, lanes):
    assert resumed_spec(_spec(), overrides, WHERE).lanes == lanes


def test_packing_on_gpus_is_one_too():
    spec = _spec(trials_per_node=None, trials_per_gpu=1,
                 resources={"site": "devcluster", "partition": "gpu", "gpus_per_node": 2,
                            "tasks_per_node": 1, "cpus_per_task": 4})  # fmt: skip
    assert spec.lanes == 2
    assert resumed_spec(spec, ["trials_per_gpu=2"], WHERE).lanes == 4


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["trials_per_node=3"], "resources.cpus_per_task", "2 CPU(s) for 3 packed trials"),
        (["trials_per_gpu=2"], "trials_per_gpu", "not both"),
        (["trials_per_node=null", "trials_per_gpu=2"], "trials_per_gpu", "needs GPUs"),
        (["trials_per_node=0"], "trials_per_node", "greater than or equal to 1"),
    ],
)
def test_a_packing_the_allocation_cannot_honour_is_one_line(overrides, field, words):
    with pytest.raises(ConfigError) as err:
        resumed_spec(_spec(), overrides, WHERE)
    assert err.value.where == WHERE and err.value.field == field, str(err.value)
    assert words in err.value.problem, str(err.value)


def test_a_round_carries_its_packing(tmp_path: Path):
    spec = _spec()
    life = Lifecycle(spec, SweepPaths(tmp_path / "p"), load_site("devcluster"))
    job = life.round_jobs([0, 1, 2])["workers"]
    assert job.args == (str(tmp_path / "p"), [0, 1, 2], (2, 0))


@pytest.mark.parametrize(
    ("pack", "changes", "expected"),
    [
        ((2, 0), {"trials_per_node": 4, "resources": {"site": "devcluster", "cpus_per_task": 4}},
         (2, 0)),  # the round's, not the resumed spec's
        ((4, 0), {"trials_per_node": None}, (4, 0)),
        (None, {}, (2, 0)),  # a round queued before rounds carried it: the spec's
    ],
)  # fmt: skip
def test_a_worker_runs_its_rounds_packing(pack, changes, expected):
    assert round_packing(pack, _spec(**changes)) == expected
