"""Extra sbatch options and the site policy on them, through the CLI and on the dev cluster."""

from __future__ import annotations

import pytest
import yaml
from conftest import devcluster_profile_with, one_line_error, run_cli, sacct_finished

from hpcdl.cli import main
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.job import Job
from hpcdl.scheduler import log_tail
from hpcdl.scheduler.hostlist import expand_hostlist
from hpcdl.site import load_site
from hpcdl.slurm_options import constraint_features, feature_problems


# -- on the dev cluster (node1-2: intel,ib; node3-4: amd,ib) -------------------------------------
def _finished_nodes(handle, timeout: float = 180) -> set[str]:
    """The nodes a finished job ran on, from sacct's NodeList (accounting may first record only
    the first node of an allocation, so the test checks a subset)."""
    state = handle.wait(timeout=timeout)  # raises with the job's log on timeout
    assert state == "COMPLETED", f"{handle.job_id} {state}\n{log_tail(handle)}"
    nodes = set(expand_hostlist(sacct_finished(handle.job_id, 1)[0]["nodes"]))
    assert nodes, f"sacct has no NodeList for {handle.job_id}"
    return nodes


def test_example_gpu_site_policy(capsys):
    script = Job(site="example-gpu-site", command=["true"]).render()
    assert "#SBATCH --constraint=a100_40g" in script  # the production partition's default
    rc = main(["render", "--site", "example-gpu-site", "-p", "develbooster", "--", "true"])
    assert "requires --constraint (site policy)" in one_line_error(capsys, rc)
    rc = main(["render", "--site", "example-gpu-site", "-w", "x1", "--", "true"])
    assert "partition 'booster' does not allow --nodelist" in one_line_error(capsys, rc)


def test_constraint_features_and_site_check_comparison():
    assert constraint_features("[intel&ib|amd*2],gpu_a100") == {"intel", "ib", "amd", "gpu_a100"}
    part = load_site("example-gpu-site").partitions[0]
    assert feature_problems(part, ["a100_40g", "a100_80g", "ib"]) == []
    problems = feature_problems(part, ["a100_80g", "ib"])
    assert problems == [
        "partition booster: features a100_40g,a100_80g,ib here, a100_80g,ib on the cluster",
        "partition booster: policy.defaults constraint 'a100_40g' needs feature 'a100_40g', which "
        "no node offers (nodes offer: a100_80g, ib)",
    ]


@pytest.mark.slurm
def test_constraint_picks_nodes_and_policy_adds_one(devcluster, tmp_path):
    amd = Job(site=devcluster, command=["true"], nodes=2, constraint="amd", time="2m").submit()
    path = str(devcluster_profile_with(tmp_path, cpu={"features": ["amd", "ib", "intel"],
                                       "policy": {"defaults": {"constraint": "intel"},
                                                  "required": ["constraint"]}}))  # fmt: skip
    intel = Job(site=path, command=["true"], nodes=2, time="2m").submit()
    assert _finished_nodes(amd) <= {"node3", "node4"}  # the amd nodes of the 4-node partition
    assert _finished_nodes(intel) <= {"node1", "node2"}  # the policy's default constraint
    with pytest.raises(ConfigError, match="no node of partition 'cpu' offers feature 'nvlink'"):
        Job(site=devcluster, command=["true"], constraint="nvlink").submit()  # the profile knows
    unlisted = str(
        devcluster_profile_with(tmp_path, cpu={"features": None})
    )  # a profile without features
    with pytest.raises(HpcdlError, match=r"sbatch --test-only rejected the job: .*feature"):
        Job(site=unlisted, command=["true"], constraint="nvlink").submit(test_only=True)


@pytest.mark.slurm
def test_site_check_reports_features_and_constraints_no_node_offers(devcluster, tmp_path):
    path = devcluster_profile_with(tmp_path, cpu={"features": ["amd", "ib", "intel"]},
                    gpu={"features": ["amd", "ib", "nvlink"],
                         "policy": {"defaults": {"constraint": "h100"}}})  # fmt: skip
    proc = run_cli("site", "check", str(path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "partition gpu: features amd,ib,nvlink here, amd,ib on the cluster" in proc.stdout
    assert ("partition gpu: policy.defaults constraint 'h100' needs feature 'h100', which no node "
            "offers (nodes offer: amd, ib)") in proc.stdout  # fmt: skip
    assert "partition cpu" not in proc.stdout
    drafted = tmp_path / "drafted.yaml"
    proc = run_cli("site", "import", "--name", "drafted", "-o", str(drafted))
    assert proc.returncode == 0, proc.stderr
    parts = {p["name"]: p for p in yaml.safe_load(drafted.read_text())["partitions"]}
    assert parts["cpu"]["features"] == ["amd", "ib", "intel"]
    assert parts["gpu"]["features"] == ["amd", "ib"]
