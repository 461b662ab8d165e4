"""A second dev cluster beside the shared one (``devcluster.sh up --instance NAME --nodes N``,
issue 21): its own nodes, ports, config and job ids; the shared cluster's daemons are neither
restarted nor joined by processes that another checkout's ``devcluster.sh`` (which knows
nothing of instances) would take for strangers; ``down --instance`` leaves nothing running.
Root (the script starts daemons); the job is hpcdl-alice's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import AsUser

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "devcluster" / "devcluster.sh"
NAME, PORT = "tinyinst", "18900"
CONF = f"/etc/slurm-{NAME}/slurm.conf"

pytestmark = [pytest.mark.slurm, pytest.mark.root]


def _run(
    *cmd: str, check: bool = True, timeout: float = 180, **env: str
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def _daemons(*names: str) -> set[tuple[int, str]]:
    """(pid, command name) of the live processes with one of these command names."""
    out = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            comm = Path(entry.path, "comm").read_text().strip()
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if comm in names and state not in ("Z", "X"):
            out.add((int(entry.name), comm))
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="devcluster.sh needs root")
def test_a_second_instance_beside_the_shared_cluster(users: dict[str, AsUser]):
    alice = users["a"]
    shared = _daemons("slurmctld", "slurmd")
    others = _daemons("islurmctld", "islurmd")  # another instance may be up (the scale run's)
    shared_nodes = _run("sinfo", "-h", "-N", "-o", "%N").stdout.split()
    refused = _run(str(SCRIPT), "up", "--nodes", "8", check=False)
    assert refused.returncode != 0 and "--nodes needs --instance" in refused.stderr
    try:
        _run(str(SCRIPT), "up", "--instance", NAME, "--nodes", "2", "--port-base", PORT)
        nodes = _run("sinfo", "-h", "-N", "-o", "%N %T", SLURM_CONF=CONF).stdout.split("\n")
        assert sorted(n.split()[0] for n in nodes if n) == [f"{NAME}1", f"{NAME}2"], nodes
        out = alice.work / "instance-%j.out"
        proc = alice.run("sbatch", "--parsable", "--wait", "-t", "2", "-N", "2", f"--output={out}",
                         "--wrap", "srun printenv SLURMD_NODENAME SLURM_CLUSTER_NAME",
                         timeout=120, SLURM_CONF=CONF)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        job = proc.stdout.strip().split(";")[0]
        text = (alice.work / f"instance-{job}.out").read_text().split()
        assert sorted(text) == sorted([f"{NAME}1", f"{NAME}2", NAME, NAME]), text
        assert int(job) >= 10_000_000  # its own job ids, apart from the shared cluster's
        acct = _run("sacct", "-n", "-X", "-P", "-j", job, "-o", "State,Cluster", SLURM_CONF=CONF)
        assert acct.stdout.strip() == f"COMPLETED|{NAME}", acct.stdout
        # the shared cluster: the same daemons (none restarted), the same nodes, and no other
        # process named slurmctld/slurmd (the instance's are islurmctld/islurmd)
        assert _daemons("slurmctld", "slurmd") == shared
        assert _run("sinfo", "-h", "-N", "-o", "%N").stdout.split() == shared_nodes
        assert len(_daemons("islurmctld", "islurmd") - others) == 3
    finally:
        _run(str(SCRIPT), "down", "--instance", NAME, check=False)
    assert _daemons("islurmctld", "islurmd") == others
    assert _daemons("slurmctld", "slurmd") == shared
