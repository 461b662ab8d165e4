"""The site profile of the fault-injection tests: the dev cluster's, plus its hidden `fault`
partition (node5-7, slurm/devcluster/slurm.conf.in), whose nodes no other test's jobs use, so a
test may set one DOWN while the other tests run. Tests that do take
``@pytest.mark.cluster_lock("fault")`` (they would end each other's jobs)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
FAULT_SITE = "devcluster-fault"


def write_fault_site(site_dir: Path) -> str:
    """Write ``devcluster-fault.yaml`` into ``site_dir``; returns the profile's name."""
    profile = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
    cpu = next(p for p in profile["partitions"] if p["name"] == "cpu")
    fault = {**cpu, "name": "fault", "default": False, "max_time": "04:00:00", "max_nodes": 3,
             "features": ["ib", "intel"]}  # fmt: skip
    profile.update(name=FAULT_SITE, partitions=[*profile["partitions"], fault])
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / f"{FAULT_SITE}.yaml").write_text(yaml.safe_dump(profile))
    return FAULT_SITE
