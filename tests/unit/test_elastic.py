"""Elastic start (``nodes: MIN-MAX`` with ``time_min``): the range read, checked against the
partition and the batch, rendered as ``--nodes=MIN-MAX`` and ``--time-min``; bad input is one
line. The job started on 2 nodes and requeued onto 4 (and back) is in
tests/cluster/test_elastic_slurm.py."""

from __future__ import annotations

import pytest
import yaml
from conftest import one_line_error

from hpcdl.cli import main
from hpcdl.config import parse_node_range, validate
from hpcdl.errors import ConfigError
from hpcdl.job import Job
from hpcdl.train.config import TrainConfig, dump_config
from hpcdl.train.preflight import check_elastic

RANGES = [
    ("2-4", (2, 4)), ("1-1", (1, 1)), (" 3 - 8 ", (3, 8)), ("4-2", None), ("0-2", None),
    ("2-", None), ("-3", None), ("2-4-5", None), ("a-b", None), ("3", None), (3, None),
    (None, None), ("", None),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), RANGES)
def test_parse_node_range(text, expected):
    assert parse_node_range(text) == expected


def test_a_range_is_read_as_max_and_min_and_dumps_back_the_same():
    job = Job(command=["true"], nodes="2-4")
    assert (job.nodes, job.min_nodes, job.node_range) == (4, 2, "2-4")
    assert list(job.node_counts) == [2, 3, 4]
    assert job.model_dump()["nodes"] == "2-4" and "min_nodes" not in job.model_dump()
    fixed = Job(command=["true"], nodes="3-3")  # a one-count range is a fixed count
    assert (fixed.nodes, fixed.min_nodes, fixed.node_range, fixed.model_dump()["nodes"]) == (
        3, None, "3", 3)  # fmt: skip
    cfg = validate(TrainConfig, {"data": {"train": "t", "val": "v"},
                                 "job": {"nodes": "2-4", "time_min": "30m"}}, "t")  # fmt: skip
    again = validate(TrainConfig, yaml.safe_load(dump_config(cfg)), "t")
    assert (again.job.nodes, again.job.min_nodes, again.job.time_min) == (4, 2, "00:30:00")


BAD = [
    (["-N", "4-2"], "error: command line: nodes: must be a node count N or a range MIN-MAX "
     "with 1 <= MIN <= MAX (e.g. 2-4) (got '4-2')"),
    (["-N", "0-2"], "nodes: must be a node count N or a range MIN-MAX"),
    (["-N", "two"], "'two' is not a valid integer or a range MIN-MAX (e.g. 2-4)"),
    (["-N", "2-6"], "nodes: 2-6 (MAX 6) exceeds partition 'cpu' limit 4"),
    (["-p", "gpu", "-N", "1-3"], "nodes: 1-3 (MAX 3) exceeds partition 'gpu' limit 2"),
    (["-N", "2-4", "-n", "8"], "-n/--ntasks: a total of tasks cannot be split over -N/--nodes "
     "2-4 (Slurm picks the node count when the job starts): give --ntasks-per-node N"),
    (["-N", "2-4", "-t", "1h", "--time-min", "2h"], "time_min 02:00:00 exceeds the job's time 1h"),
    (["--time-min", "soon"], "time_min: invalid time 'soon'"),
    (["-N", "2-4", "--launcher", "torchrun"], "launcher torchrun needs a fixed node count"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expected"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_ranges_are_one_line(capsys, args, expected):
    cmd = ["python", "x.py"] if "torchrun" in args else ["true"]
    line = one_line_error(capsys, main(["render", "--site", "devcluster", *args, "--", *cmd]))
    assert expected in line, line


def test_render_asks_slurm_for_the_range_and_the_minimum_time(capsys):
    args = ["-p", "low", "-N", "2-4", "-t", "2h", "--time-min", "30m"]
    assert main(["render", "--site", "devcluster", *args, "--", "true"]) == 0
    lines = set(capsys.readouterr().out.splitlines())
    assert {"#SBATCH --nodes=2-4", "#SBATCH --time-min=00:30:00", "#SBATCH --time=120"} <= lines
    assert main(["render", "--site", "devcluster", "-N", "3", "--", "true"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=3" in out.splitlines() and "--time-min" not in out


# batch 48 splits over 2, 3 and 4 ranks (micro 4); batch 64 (micro 16) not over 3 ranks
BATCHES = [
    ("2-4", 1, 48, 4, None),
    ("2-4", 1, 64, 16, "job.nodes: 2-4: on 3 node(s) (3 ranks) batch.size 64 is not divisible by "
     "batch.micro 16 x 3; choose a batch.size that every count in the range divides"),
    ("1-2", 2, 64, 16, None),
    ("1-3", 2, 64, 8, "on 3 node(s) (6 ranks) batch.size 64 is not divisible by batch.micro 8 x 6"),
    ("3", 1, 64, 16, None),  # one count: preflight.check_world says it, naming batch.size
]  # fmt: skip


@pytest.mark.parametrize(("nodes", "tasks", "size", "micro", "error"), BATCHES)
def test_the_batch_must_split_on_every_count_of_the_range(nodes, tasks, size, micro, error):
    cfg = validate(TrainConfig, {"data": {"train": "t", "val": "v"},
                                 "batch": {"size": size, "micro": micro},
                                 "job": {"nodes": nodes, "tasks_per_node": tasks}}, "t")  # fmt: skip
    if error is None:
        check_elastic(cfg, "t")
    else:
        with pytest.raises(ConfigError, match=r"^t: job\.nodes: ") as info:
            check_elastic(cfg, "t")
        assert error in str(info.value)
