"""Site warnings through the CLI in a fresh process and against the dev cluster (issue 26)."""

from __future__ import annotations

import pytest
import yaml
from conftest import REFUSED_DEFAULT, REPO, SITE_CPU_PARTITION, run_cli

from hpcdl.cli import main
from hpcdl.site import SiteProfile, default_fit_problems


def test_site_check_warns_about_a_default_that_does_not_fit_naming_file_field_and_limit(
    tmp_path, capsys
):
    site = tmp_path / "fit.yaml"
    cpu = {
        **SITE_CPU_PARTITION,
        "policy": {"defaults": {"mem-per-cpu": "1500M", "time-min": "2-00:00:00"}},
    }
    site.write_text(yaml.safe_dump({"name": "fit", "scheduler": "local", "partitions": [cpu]}))
    assert main(["site", "check", str(site)]) == 0  # a warning: the profile still loads
    err = sorted(capsys.readouterr().err.splitlines())  # in the order the profile parses them
    assert err == [
        f"hpcdl: warning: {site}: partitions.0.policy.defaults.mem-per-cpu: --mem-per-cpu=1500M "
        "x 4 CPUs per node exceeds partition 'cpu' mem_per_node 4000M: a job given this default "
        "can use at most 2 of the 4 CPUs per node there",
        f"hpcdl: warning: {site}: partitions.0.policy.defaults.time-min: --time-min=2-00:00:00 "
        f"exceeds partition 'cpu' max_time 1-00:00:00: {REFUSED_DEFAULT}",
    ]
    for shipped in ("local", "devcluster", "example-gpu-site"):  # their defaults fit
        profile = yaml.safe_load((REPO / f"hpcdl/sites/{shipped}.yaml").read_text())
        assert default_fit_problems(SiteProfile.model_validate(profile)) == [], shipped


# -- an sbatch refusal is said once, in one line (issue 26, finding 5: "printed twice") -----------
@pytest.mark.slurm
@pytest.mark.parametrize("array", [[], ["--array", "2"]])  # submitit has two submission paths
def test_an_sbatch_refusal_is_one_line_said_once(devcluster, job_root, array):
    # 3 nodes with feature intel: the dev cluster has 2 (node1-2), hpcdl cannot know, sbatch refuses
    proc = run_cli("submit", "--site", devcluster, "-C", "intel", "-N", "3", "-t", "1m", *array,
                   "--", "true")  # fmt: skip
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.splitlines() == [
        "error: submission failed: sbatch: error: Batch job submission failed: Requested node "
        "configuration is not available"
    ], proc.stderr
    assert proc.stdout == ""
    assert [p.name for p in job_root.iterdir() if p.name != "registry.jsonl"] == []  # no folder


@pytest.mark.slurm
def test_site_check_on_the_cluster_names_the_nodes_a_default_constraint_leaves(
    devcluster, tmp_path
):
    data = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
    data["name"] = "intelsite"
    data["partitions"][0]["policy"] = {"defaults": {"constraint": "intel"}}  # node1-2 of 4
    site = tmp_path / "intelsite.yaml"
    site.write_text(yaml.safe_dump(data))
    proc = run_cli("site", "check", str(site))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        "intelsite: partition cpu: policy.defaults constraint 'intel' is met by 2 of its 4 nodes, "
        "fewer than max_nodes 4: a job given this default can have at most 2 nodes"
    ]
