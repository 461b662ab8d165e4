"""The rest of the first hour (issue 26): what an admin's profile promises and does not keep is
said by 'site check' and 'site list'; an sbatch refusal is said once."""

from __future__ import annotations

import pytest
import yaml
from conftest import REFUSED_DEFAULT, REPO, SITE_CPU_PARTITION

from hpcdl.cli import main
from hpcdl.site import Partition, SiteProfile, default_fit_problems

GPU = {**SITE_CPU_PARTITION, "name": "gpu", "default": False, "gpus_per_node": 2}


def _profile(partition: dict, defaults: dict) -> SiteProfile:
    part = Partition.model_validate({**partition, "policy": {"defaults": defaults}})
    return SiteProfile(name="fit", scheduler="local", partitions=[part])


# -- a policy default that does not fit its partition (issue 26, finding 5's site check) ----------
@pytest.mark.parametrize(
    ("partition", "defaults", "expected"),
    [
        (SITE_CPU_PARTITION, {"time-min": "2-00:00:00"},
         f"--time-min=2-00:00:00 exceeds partition 'cpu' max_time 1-00:00:00: {REFUSED_DEFAULT}"),
        (SITE_CPU_PARTITION, {"time-min": "1-00:00:00"}, None),  # equal to the limit: fits
        (SITE_CPU_PARTITION, {"mem-per-cpu": "5G"},
         f"--mem-per-cpu=5G exceeds partition 'cpu' mem_per_node 4000M: {REFUSED_DEFAULT}"),
        (SITE_CPU_PARTITION, {"mem-per-cpu": "1500M"},
         "--mem-per-cpu=1500M x 4 CPUs per node exceeds partition 'cpu' mem_per_node 4000M: a "
         "job given this default can use at most 2 of the 4 CPUs per node there"),
        (SITE_CPU_PARTITION, {"mem-per-cpu": "1000M"}, None),  # 4 x 1000M = the node's 4000M
        ({**SITE_CPU_PARTITION, "mem_per_node": None}, {"mem-per-cpu": "64G"}, None),  # no memory limit known
        (SITE_CPU_PARTITION, {"mincpus": 8}, f"--mincpus=8 exceeds partition 'cpu' cpus_per_node 4: {REFUSED_DEFAULT}"),
        (SITE_CPU_PARTITION, {"mincpus": 4}, None),
        (GPU, {"cpus-per-gpu": 3},
         "--cpus-per-gpu=3 x 2 GPUs per node exceeds partition 'gpu' cpus_per_node 4: a job "
         "given this default can use at most 1 of the 2 GPUs per node there"),
        (GPU, {"cpus-per-gpu": 2}, None),
        (GPU, {"gpus-per-task": 3},
         f"--gpus-per-task=3 exceeds partition 'gpu' gpus_per_node 2: {REFUSED_DEFAULT}"),
        (GPU, {"gpus-per-task": 2, "mem-per-gpu": "5G"},
         f"--mem-per-gpu=5G exceeds partition 'gpu' mem_per_node 4000M: {REFUSED_DEFAULT}"),
        (SITE_CPU_PARTITION, {"constraint": "intel", "exclusive": True}, None),  # no limit to exceed
    ],
)  # fmt: skip
def test_policy_defaults_that_do_not_fit_their_partition(partition, defaults, expected):
    problems = default_fit_problems(_profile(partition, defaults))
    assert [p for _, p in problems] == ([expected] if expected else []), problems


# -- a profile whose name differs from its file name, in 'site list' (issue 26, finding 8) ---------
def test_site_list_warns_when_a_name_differs_from_its_file_and_says_what_site_picks(
    tmp_path, monkeypatch, capsys
):
    local = yaml.safe_load((REPO / "hpcdl/sites/local.yaml").read_text())
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "mine.yaml").write_text(yaml.safe_dump({**local, "name": "other"}))
    (sites / "good.yaml").write_text(yaml.safe_dump({**local, "name": "good"}))
    monkeypatch.setenv("HPCDL_SITE_PATH", f"{sites}:{REPO / 'hpcdl/sites'}")
    assert main(["site", "list"]) == 0
    out = capsys.readouterr()
    assert "mine " in out.out and "good " in out.out  # still listed
    warnings = [line for line in out.err.splitlines() if "warning" in line]
    assert warnings == [
        f"hpcdl: warning: {sites / 'mine.yaml'}: name: 'other' differs from the file name "
        "'mine': '--site mine' picks this file and refuses it, '--site other' finds no profile; "
        "rename one"
    ]
    # what the warning says is what --site does
    assert main(["site", "show", "mine"]) == 2
    assert "'other' must match the file name 'mine'" in capsys.readouterr().err
    assert main(["site", "show", "other"]) == 2
    assert "unknown site profile 'other'" in capsys.readouterr().err
    # with an other.yaml on the path, --site other picks that one, and the warning says so
    (sites / "other.yaml").write_text(yaml.safe_dump({**local, "name": "other"}))
    assert main(["site", "list"]) == 0
    err = capsys.readouterr().err
    assert f"'--site other' picks {sites / 'other.yaml'}; rename one" in err, err


# -- a default constraint that leaves fewer nodes than max_nodes (issue 26, finding 5) -----------
@pytest.mark.parametrize(
    ("expr", "features", "expected"),
    [
        ("intel", {"intel", "ib"}, True),
        ("intel", {"amd", "ib"}, False),
        ("intel&ib", {"intel"}, False),
        ("intel|amd", {"amd"}, True),
        ("ib&(intel|amd)", {"amd", "ib"}, True),
        ("(intel|amd)&nvlink", {"amd", "ib"}, False),
        ("a100*2", {"a100"}, None),  # counts: for a set of nodes, sbatch's to judge
        ("[a100|h100]", {"a100"}, None),  # matching OR: all nodes alike
        ("intel,ib", {"intel"}, None),
        ("intel|", {"intel"}, None),
        ("(intel", {"intel"}, None),
    ],
)
def test_which_nodes_meet_a_constraint(expr, features, expected):
    from hpcdl.slurm_options.policy import satisfies

    assert satisfies(expr, features) is expected


def test_site_check_says_how_many_nodes_a_default_constraint_leaves():
    from hpcdl.scheduler.live import check_site, parse_partitions

    sinfo = "\n".join(f"node{i}|4|4000|(null)|{f}" for i, f in
                      ((1, "intel,ib"), (2, "intel,ib"), (3, "amd,ib"), (4, "amd,ib")))  # fmt: skip
    live = parse_partitions(sinfo, "PartitionName=cpu Nodes=node[1-4] Default=YES "
                                   "MaxNodes=4 MaxTime=1-00:00:00 State=UP")  # fmt: skip
    assert live["cpu"].node_features == [["ib", "intel"]] * 2 + [["amd", "ib"]] * 2

    def problems(defaults: dict) -> list[str]:
        cpu = {
            **SITE_CPU_PARTITION,
            "features": ["amd", "ib", "intel"],
            "policy": {"defaults": defaults},
        }
        return check_site(SiteProfile(name="x", scheduler="slurm", partitions=[cpu]), live)

    assert problems({"constraint": "intel"}) == [
        "partition cpu: policy.defaults constraint 'intel' is met by 2 of its 4 nodes, fewer "
        "than max_nodes 4: a job given this default can have at most 2 nodes"
    ]
    assert problems({"constraint": "ib"}) == []  # every node
    assert problems({"constraint": "intel|amd"}) == []
    assert problems({"constraint": "[intel|amd]"}) == []  # not read: not guessed
