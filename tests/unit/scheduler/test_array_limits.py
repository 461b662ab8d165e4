"""Arrays over the site's max_array_size (Slurm's MaxArraySize): the split plan and its mapping,
the profile field, and split arrays on the dev cluster behaving as one job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SPLIT_SITE, one_line_error

from hpcdl import Job
from hpcdl.cli import main
from hpcdl.errors import HpcdlError
from hpcdl.scheduler import JobHandle, find_task, load_handles
from hpcdl.scheduler.arrays import (
    ArrayPart,
    expand_dependency,
    global_index,
    lane_shares,
    locate,
    plan_parts,
    slurm_task_id,
)
from hpcdl.scheduler.live import (
    LivePartition,
    check_site,
    import_site,
    max_array_size,
    parse_config,
)
from hpcdl.scheduler.slurm import _expand
from hpcdl.scheduler.state_rows import parse_state_rows
from hpcdl.site import load_site


# -- the plan ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,limit", [(10, 4), (2500, 1001), (1002, 1001), (9, 2), (3, 2), (7, 1)])
@pytest.mark.parametrize("throttle", [None, 1, 2, 3, 5, 100])
def test_plan_covers_every_task_once_within_the_limit_and_the_throttle(n, limit, throttle):
    plans = plan_parts(n, limit, throttle)
    assert len(plans) == -(-n // limit)
    indices = [p.offset + j for p in plans for j in range(p.count)]
    assert indices == list(range(n))
    assert all(1 <= p.count <= limit for p in plans)  # Slurm indices 0..count-1 <= limit-1
    assert max(p.count for p in plans) - min(p.count for p in plans) <= 1  # no tiny tail
    if throttle is None:
        assert all(p.after is None and p.throttle is None for p in plans)
        return
    # parts that may run at the same time: those not waiting on another (one per lane)
    lanes = {p.lane for p in plans}
    heads = [p for p in plans if p.after is None]
    assert len(heads) == len(lanes)
    assert sum(p.throttle for p in heads) <= throttle
    for k, p in enumerate(plans):  # a lane's part waits for that lane's previous part
        assert p.throttle == lane_shares(throttle, len(lanes))[p.lane]
        if p.after is not None:
            assert p.after < k and plans[p.after].lane == p.lane


def test_plan_keeps_arrays_that_fit_whole():
    assert [(p.offset, p.count, p.throttle) for p in plan_parts(1001, 1001, 7)] == [(0, 1001, 7)]
    assert len(plan_parts(50_000, None, None)) == 1


def test_throttle_is_divided_or_chained():
    divided = plan_parts(2500, 1001, 100)  # 3 parts side by side: 34 + 33 + 33
    assert [p.throttle for p in divided] == [34, 33, 33]
    assert [p.after for p in divided] == [None, None, None]
    chained = plan_parts(2500, 1001, 2)  # one part at a time, each %2
    assert [(p.throttle, p.after) for p in chained] == [(2, None), (2, 0), (2, 1)]
    with pytest.raises(HpcdlError, match="cannot be shared"):
        lane_shares(2, 3)


PARTS = [
    ArrayPart(job_id="100", offset=0, count=4),
    ArrayPart(job_id="101", offset=4, count=3, lane=1),
    ArrayPart(job_id="102", offset=7, count=1, lane=2),
]


def test_global_index_maps_to_the_part_and_back():
    seen = []
    for i in range(8):
        part, local = locate(PARTS, i)
        seen.append(slurm_task_id(part, local))
        assert global_index(PARTS, part.job_id, local) == i
    assert seen == ["100_0", "100_1", "100_2", "100_3", "101_0", "101_1", "101_2", "102"]
    with pytest.raises(HpcdlError, match=r"tasks 0\.\.7, not 8"):
        locate(PARTS, 8)


def test_dependencies_on_a_split_array_name_every_part():
    split = {"100": PARTS}
    assert expand_dependency("afterany:100", split) == "afterany:100:101:102"
    assert expand_dependency("afterok:100_5,afterany:7", split) == "afterok:101_1,afterany:7"
    assert expand_dependency("afterok:55:100", split) == "afterok:55:100:101:102"
    assert expand_dependency("aftercorr:100", split) == "aftercorr:100"  # cannot pair: as is
    assert expand_dependency("afterany:101", split) == "afterany:101"  # a part's own id


def test_statuses_are_keyed_by_the_global_index():
    handle = JobHandle(job_id="100", name="x", site="s", scheduler="slurm", folder="/nonexistent",
                       array=8, submitted_at=0, parts=PARTS)  # fmt: skip
    live: dict = {}
    parse_state_rows(
        "100_[0-3]|PENDING|Priority\n101_1|RUNNING|None\n102|COMPLETED|None\n", live, True
    )
    states = {k: s.state for k, s in _expand(handle, live).items()}
    assert list(states) == [f"100_{i}" for i in range(8)]
    assert states["100_0"] == "PENDING" and states["100_5"] == "RUNNING"
    assert states["100_7"] == "COMPLETED" and states["100_4"] == "UNKNOWN"  # forgotten, no file


def test_registry_lines_without_parts_still_load(job_root):
    job_root.mkdir(parents=True)
    old = {"job_id": "55", "name": "old", "site": "devcluster", "scheduler": "slurm",
           "folder": "/x", "array": 3, "tasks": 1, "submitted_at": 1.0, "local_ids": []}  # fmt: skip
    split = {**old, "job_id": "100", "array": 8, "submitted_at": 2.0,
             "parts": [p.model_dump() for p in PARTS]}  # fmt: skip
    (job_root / "registry.jsonl").write_text(json.dumps(old) + "\n" + json.dumps(split) + "\n")
    handles = load_handles([job_root])
    assert handles[0].parts == [] and handles[1].parts == PARTS
    assert find_task("55_2")[0].job_id == "55"
    assert find_task("101_2") == (handles[1], 6)  # a later part's task: its global index
    assert find_task("102")[0].job_id == "100" and find_task("100_7") == (handles[1], 7)


# -- the site profile ----------------------------------------------------------------------------
def _profile(tmp_path: Path, **changes: object) -> Path:
    data = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
    data.update(name="t", **changes)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "value,expected",
    [
        (0, "max_array_size: Input should be greater than or equal to 1"),
        (-5, "max_array_size: Input should be greater than or equal to 1"),
        ("lots", "max_array_size: Input should be a valid integer"),
        (5_000_000, "max_array_size: Input should be less than or equal to 4000001"),
    ],
)
def test_bad_max_array_size(tmp_path, capsys, value, expected):
    line = one_line_error(capsys, main(["site", "show", str(_profile(tmp_path, max_array_size=value))]))  # fmt: skip
    assert expected in line


def test_max_array_size_on_a_local_site_is_refused(tmp_path, capsys):
    data = yaml.safe_load((REPO / "hpcdl/sites/local.yaml").read_text())
    path = tmp_path / "l.yaml"
    path.write_text(yaml.safe_dump({**data, "name": "l", "max_array_size": 10}))
    line = one_line_error(capsys, main(["site", "show", str(path)]))
    assert "a local site has none" in line


def test_shipped_devcluster_has_slurms_default():
    assert load_site("devcluster").max_array_size == 1001
    assert load_site("local").max_array_size is None


def test_import_and_check_read_max_array_size(tmp_path):
    config = parse_config("Configuration data as of x\nMaxArraySize            = 1001\nMaxJobCount = 9\n")  # fmt: skip
    assert max_array_size(config) == 1001 and max_array_size({}) is None
    cpu = LivePartition(name="cpu", default=True, max_time="1:00:00", max_nodes=1,
                        cpus_per_node=1, mem_mib=100, gpus_per_node=0, state="UP")  # fmt: skip
    assert import_site("drafted", {"cpu": cpu}, config)["max_array_size"] == 1001
    assert "max_array_size" not in import_site("drafted", {"cpu": cpu})
    profile = load_site(str(_profile(tmp_path, max_array_size=4)))
    problems = [p for p in check_site(profile, {}, config) if "max_array_size" in p]
    assert problems == ["max_array_size 4 here, 1001 on the cluster (MaxArraySize)"]
    assert not [p for p in check_site(profile, {}, {"MaxArraySize": "4"}) if "array" in p]


def test_render_says_the_array_is_split(split_site):
    job = Job(site=SPLIT_SITE, command=["true"], array=10, throttle=3, dependencies=["afterany:9"])
    script = job.render()
    assert "#SBATCH --array=0-3%1" in script and "#SBATCH --dependency=afterany:9" in script
    assert "submitted as 3 Slurm arrays" in script
    for line in ["part 1: tasks 0-3 (4 tasks, --array=0-3%1)",
                 "part 3: tasks 7-9 (3 tasks, --array=0-2%1)"]:  # fmt: skip
        assert line in script
    assert "Slurm arrays" not in Job(site=SPLIT_SITE, command=["true"], array=4).render()
