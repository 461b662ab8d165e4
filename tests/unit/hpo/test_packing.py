"""Trial packing's decisions as tables (hpcdl.hpo.packing): which specs are refused and with
which one line, how a task's CPUs and GPUs are split among its lanes, the name a lane claims
under, and the lifecycle's reading of lane claims. The lanes themselves (fork, affinity,
CUDA_VISIBLE_DEVICES) run on the dev cluster: tests/cluster/test_sweep_packing.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hpcdl.errors import ConfigError
from hpcdl.hpo.decide import Round, next_slot, stopped_slots
from hpcdl.hpo.packing import Lane, claimant, lanes_of, plan, split_cpus, split_gpus, task_of
from hpcdl.hpo.spec import load_spec

BASE = {
    "name": "p",
    "objective": "tests.helpers.objectives:curve",
    "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
    "trials": 8,
    "final": False,
    "resources": {"site": "local", "cpus_per_task": 4},
}

# (label, spec changes, resources changes, field, words of the one-line error)
BAD = [
    ("both kinds", {"trials_per_node": 2, "trials_per_gpu": 1}, {"gpus_per_node": 2, "tasks_per_node": 1},
     "trials_per_gpu", "give trials_per_node or trials_per_gpu, not both"),
    ("per GPU without GPUs", {"trials_per_gpu": 2}, {},
     "trials_per_gpu", "needs GPUs: set resources.gpus_per_node"),
    ("one trial per task", {"trials_per_node": 2, "trials_per_task": 1}, {},
     "trials_per_node", "packed trials run in warm workers: leave trials_per_task out"),
    ("multi-node trials", {"trials_per_node": 2}, {"nodes": 2},
     "resources.nodes", "2: a packed trial runs on one node"),
    ("several tasks per node", {"trials_per_node": 2}, {"tasks_per_node": 2},
     "resources.tasks_per_node", "2: a packed trial is one process; give tasks_per_node: 1"),
    ("GPUs default to one task each", {"trials_per_node": 2}, {"gpus_per_node": 2},
     "resources.tasks_per_node", "with GPUs it defaults to one task per GPU"),
    ("GPUs not shared evenly", {"trials_per_node": 3}, {"gpus_per_node": 2, "tasks_per_node": 1},
     "trials_per_node", "3 trials cannot share resources.gpus_per_node 2 evenly"),
    ("too few CPUs", {"trials_per_node": 8}, {"cpus_per_task": 4},
     "resources.cpus_per_task", "4 CPU(s) for 8 packed trials: each needs one at least"),
    ("zero", {"trials_per_node": 0}, {}, "trials_per_node", "greater than or equal to 1"),
]  # fmt: skip


@pytest.mark.parametrize("label,change,resources,field,words", BAD, ids=[b[0] for b in BAD])
def test_bad_packing_is_one_line_naming_the_field(tmp_path: Path, label, change, resources,
                                                  field, words):  # fmt: skip
    path = tmp_path / "sweep.yaml"
    data = {**BASE, **change, "resources": {**BASE["resources"], **resources}}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert words in message and "\n" not in message


GOOD = [
    # (spec changes, resources changes, lanes)
    ({}, {}, 1),
    ({"trials_per_node": 1}, {}, 1),
    ({"trials_per_node": 4}, {}, 4),
    ({"trials_per_node": 2}, {"gpus_per_node": 2, "tasks_per_node": 1}, 2),
    ({"trials_per_node": 4}, {"gpus_per_node": 2, "tasks_per_node": 1}, 4),  # 2 per GPU
    ({"trials_per_gpu": 2}, {"gpus_per_node": 2, "tasks_per_node": 1}, 4),
    ({"trials_per_gpu": 1}, {"gpus_per_node": 1}, 1),  # one task per GPU is one task here
]  # fmt: skip


@pytest.mark.parametrize("change,resources,lanes", GOOD)
def test_lanes_of_a_valid_spec(tmp_path: Path, change, resources, lanes):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change,
                                    "resources": {**BASE["resources"], **resources}}))  # fmt: skip
    assert load_spec(path).lanes == lanes


@pytest.mark.parametrize("per_node,per_gpu,gpus,lanes", [
    (None, None, 0, 1), (3, None, 0, 3), (None, 2, 4, 8), (2, None, 4, 2),
])  # fmt: skip
def test_lanes_of(per_node, per_gpu, gpus, lanes):
    assert lanes_of(per_node, per_gpu, gpus) == lanes


@pytest.mark.parametrize("cpus,n,want", [
    ([0, 1, 2, 3], 2, [(0, 1), (2, 3)]),
    ([0, 1, 2, 3, 4], 2, [(0, 1, 2), (3, 4)]),  # the first slice one larger
    ([4, 5, 6, 7], 4, [(4,), (5,), (6,), (7,)]),
    ([3, 1, 2, 0], 2, [(0, 1), (2, 3)]),  # the affinity set, sorted
    ([0, 1], 4, [(0,), (1,), (0,), (1,)]),  # fewer real CPUs than lanes: shared, never none
    ([], 2, [(), ()]),
])  # fmt: skip
def test_split_cpus(cpus, n, want):
    assert split_cpus(cpus, n) == want


@pytest.mark.parametrize("gpus,n,want", [
    (["0", "1"], 2, [("0",), ("1",)]),
    (["0", "1", "2", "3"], 2, [("0", "1"), ("2", "3")]),
    (["0", "1"], 4, [("0",), ("0",), ("1",), ("1",)]),  # trials_per_gpu: 2
    (["5"], 3, [("5",), ("5",), ("5",)]),
    ([], 3, [(), (), ()]),
])  # fmt: skip
def test_split_gpus(gpus, n, want):
    assert split_gpus(gpus, n) == want


def test_split_gpus_refuses_an_uneven_share():
    with pytest.raises(ValueError, match="cannot be shared by 3 trials evenly"):
        split_gpus(["0", "1"], 3)


@pytest.mark.parametrize("n,cpus,allotted,gpus,want", [
    (2, [0, 1, 2, 3], 4, ["0", "1"], [Lane(0, (0, 1), 2, ("0",)), Lane(1, (2, 3), 2, ("1",))]),
    # the dev cluster: 4 CPUs allotted, 2 in the affinity mask (the machine's)
    (2, [0, 1], 4, [], [Lane(0, (0,), 2, ()), Lane(1, (1,), 2, ())]),
    (3, [0, 1, 2, 3], 4, [], [Lane(0, (0, 1), 1, ()), Lane(1, (2,), 1, ()), Lane(2, (3,), 1, ())]),
    (2, [0, 1, 2, 3], 0, [], [Lane(0, (0, 1), 2, ()), Lane(1, (2, 3), 2, ())]),  # count unknown
])  # fmt: skip
def test_plan(n, cpus, allotted, gpus, want):
    assert plan(n, cpus, allotted, gpus) == want


SLURM = {"SLURM_JOB_ID": "91", "SLURM_ARRAY_JOB_ID": "90", "SLURM_ARRAY_TASK_ID": "1"}


@pytest.mark.parametrize("env,local,want", [
    ({}, True, None),
    ({"HPCDL_PACK_LANE": "1"}, True, None),  # no task: nothing to resume by name
    ({"SUBMITIT_LOCAL_JOB_ID": "77"}, True, "77"),
    ({"SUBMITIT_LOCAL_JOB_ID": "77"}, False, None),
])  # fmt: skip
def test_claimant_outside_slurm(env, local, want):
    assert claimant(env, local=local) == want


def test_claimant_names_the_lane_after_its_task():
    task = claimant(SLURM)
    assert task is not None and "+" not in task
    assert claimant({**SLURM, "HPCDL_PACK_LANE": "1"}) == f"{task}+1"
    assert task_of(f"{task}+1") == task and task_of(task) == task and task_of(None) is None


def test_a_requeued_tasks_lanes_each_resume_their_own_trial():
    """Two lanes of task 90_1 were running slots 3 and 5: each comes back to its own. With the
    task's name alone both would take slot 3 (the bug the lane suffix prevents)."""
    seen = [(3, "running", "90_1+0"), (4, None, None), (5, "running", "90_1+1")]
    assert next_slot(seen, "90_1+0") == 3
    assert next_slot(seen, "90_1+1") == 5
    assert next_slot(seen, "90_1+2") == 4  # a lane with nothing running takes a free slot
    assert next_slot([(3, "running", "90_1")] * 1, "90_1+0") is None  # another claimant's


@pytest.mark.parametrize("claims,want", [
    ({0: "80+0", 1: "80+1"}, [2]),  # claims of a one-task round (a plain job id) with lanes
    ({0: "80_0+0", 1: "80_1+1"}, [2]),
    ({0: "79_0+0"}, [0, 1, 2]),  # an older round's claim is not this round's
])  # fmt: skip
def test_stopped_slots_reads_lane_claims_as_their_tasks(claims, want):
    """A workers round whose pending task was cancelled: the slots no task of the round claimed
    are the user's to resume; a lane's claim counts as its task's."""
    tasks = {"80_0": "RUNNING", "80_1": "CANCELLED"}  # one worker never started
    view = Round("workers", "80", (0, 1, 2), tasks)
    assert stopped_slots(view, [0, 1, 2], claims, ran=set(), started=set()) == want
