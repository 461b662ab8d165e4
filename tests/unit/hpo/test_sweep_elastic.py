"""Elastic sweeps (issue 24): ``resources.nodes: MIN-MAX`` with ``time_min``. Slurm may start a
warm worker on any count of the range and bring a requeued one back on another; its trial
resumes there as any run does. Checked before anything queues: the batch must split on every
count, packing needs one node. The run on the dev cluster: tests/cluster/test_sweep_elastic.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hpcdl.errors import ConfigError
from hpcdl.hpo.folder import SweepPaths
from hpcdl.hpo.lifecycle import Lifecycle
from hpcdl.hpo.objective import check_node_range, trial_config
from hpcdl.hpo.spec import SweepSpec
from hpcdl.site import load_site

BASE_CONFIG = Path(__file__).parents[3] / "configs" / "train_digits.yaml"


@pytest.fixture
def train(tmp_path: Path) -> str:
    data = yaml.safe_load(BASE_CONFIG.read_text())
    data["output"] = str(tmp_path / "runs")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _check(spec: SweepSpec) -> None:
    """What TrainObjective.check adds for a range (its data and model checks need no range)."""
    sample = {k: getattr(p, "values", [getattr(p, "low", None)])[0] for k, p in spec.space.items()}
    check_node_range(spec, trial_config(spec, sample, Path("/nonexistent/trial")))


def _spec(train: str, nodes: str, space: dict | None = None, **changes) -> SweepSpec:
    return SweepSpec.model_validate({
        "name": "elastic", "train": train,
        "space": space or {"optimizer.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
        "trials": 2, "parallelism": 1, "final": False,
        "resources": {"site": "devcluster", "nodes": nodes, "tasks_per_node": 1,
                      "time": "20m", "time_min": "10m"},
        **changes,
    })  # fmt: skip


def test_an_elastic_sweep_whose_batch_splits_on_every_count_is_accepted(train):
    spec = _spec(train, "1-2")  # batch 64 of micro-batches of 16: 1 and 2 ranks
    _check(spec)
    job = Lifecycle(spec, SweepPaths(Path("/x")), load_site("devcluster")).round_jobs([0, 1])
    workers = job["workers"]
    assert (workers.min_nodes, workers.nodes, workers.time_min) == (1, 2, "00:10:00")


@pytest.mark.parametrize(
    ("nodes", "batch", "space", "words"),
    [
        # MIN and MAX split a batch of 48 (micro-batches of 16), 2 nodes in between do not
        (
            "1-3",
            48,
            None,
            "1-3: on 2 node(s) (2 ranks) batch.size 48 is not divisible by batch.micro 16 x 2",
        ),
        ("2-4", 64, None, "2-4: on 3 node(s) (3 ranks)"),
        (
            "1-2",
            64,
            {"batch.size": {"type": "choice", "values": [32, 48]}},
            "1-2: on 2 node(s) (2 ranks) batch.size 48",
        ),  # a choice the sample is not
    ],
)
def test_a_batch_that_does_not_split_on_some_count_is_refused(train, nodes, batch, space, words):
    with pytest.raises(ConfigError) as err:
        _check(_spec(train, nodes, space, overrides={"batch.size": batch}))
    assert err.value.field == "resources.nodes" and words in err.value.problem, str(err.value)


def test_packing_refuses_a_node_range(train):
    with pytest.raises(ValueError, match="1-2: a packed trial runs on one node"):
        _spec(train, "1-2", trials_per_node=2, resources={
            "site": "devcluster", "nodes": "1-2", "tasks_per_node": 1, "cpus_per_task": 2})  # fmt: skip
