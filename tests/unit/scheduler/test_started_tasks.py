"""An elastic job's task count is the count of the nodes Slurm gave it, read from sacct
(hpcdl.scheduler.started); the dev-cluster test is tests/cluster/test_elastic_tasks.py."""

from __future__ import annotations

import pytest

from hpcdl.scheduler.interface import JobHandle
from hpcdl.scheduler.started import slurm_id, started_tasks, tasks_of_start

# (sacct -X -n -P -o State,NNodes rows, tasks per node, tasks)
ROWS = [
    ("RUNNING|1\n", 2, 2),  # nodes 1-2 started on 1 node: 2 ranks, not 4
    ("COMPLETED|2\n", 2, 4),
    ("CANCELLED by 1000|1\n", 1, 1),
    ("PENDING|1\n", 2, None),  # the request, not an allocation
    ("", 2, None),  # accounting has no row yet
    ("RUNNING|\n", 2, None),
]


@pytest.mark.parametrize(("rows", "per_node", "tasks"), ROWS)
def test_tasks_of_start(rows, per_node, tasks):
    assert tasks_of_start(rows, per_node) == tasks


def _handle(**fields) -> JobHandle:
    base = {"job_id": "41", "name": "j", "site": "devcluster", "scheduler": "slurm",
            "folder": "/tmp/j", "tasks": 4, "submitted_at": 0.0}  # fmt: skip
    return JobHandle.model_validate({**base, **fields})


def test_a_job_of_one_node_count_keeps_its_handles_count_without_asking():
    assert started_tasks(_handle()) == 4  # no sacct: a process here would be refused


@pytest.mark.parametrize(
    ("fields", "array_task", "slurm"),
    [
        ({}, None, "41"),
        ({"array": 3}, 2, "41_2"),
        ({"array": 1}, 0, "41"),  # a one-task array is a plain job
        ({"array": 5, "parts": [{"job_id": "41", "offset": 0, "count": 3},
                                {"job_id": "45", "offset": 3, "count": 2}]}, 4, "45_1"),
    ],
)  # fmt: skip
def test_slurm_id(fields, array_task, slurm):
    assert slurm_id(_handle(**fields), array_task) == slurm
