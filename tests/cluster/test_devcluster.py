"""The dev cluster seen from outside: what slurm/devcluster/devcluster.sh up promises.

These tests assume the cluster is up (the session fixture ``devcluster`` in conftest.py runs
``devcluster.sh up``) and only use the ordinary Slurm clients. The module is marked ``root``:
``devcluster.sh`` is an administrator's tool (``up``, ``status``) and the jobs go through
``runuser``. Every job it submits to check the cluster is submitted by the unprivileged
hpcdl-alice (the ``users`` fixture), as on a real site; root only reads (sinfo, scontrol show,
sacct). ``make test`` checks after its root phase that root submitted no job
(``tests/root_jobs.py``), which the last test here proves on a real job.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import AsUser

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "devcluster" / "devcluster.sh"
NODES = ["node1", "node2", "node3", "node4"]
# The hidden `fault` partition's nodes, for tests that set a node DOWN (slurm.conf.in): root
# sees hidden partitions, a user does not (unless `sinfo -a`).
FAULT_NODES = ["node5", "node6", "node7"]

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.usefixtures("devcluster")]


def run(*cmd: str, timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def as_user(user: AsUser, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``cmd`` run by ``user`` (runuser); fails with its output unless it exits 0."""
    proc = user.run(*cmd, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{user.user}: {' '.join(cmd)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def alice(users: dict[str, AsUser]) -> AsUser:
    """hpcdl-alice, who submits every job of this module (not root, as on a real site)."""
    return users["a"]


def sbatch_wait(user: AsUser, tag: str, *args: str, timeout: float = 180) -> tuple[str, str]:
    """Submit a batch job as ``user``, wait for it to end (sbatch --wait, bounded by
    ``timeout``), return (job id, its output). The output goes to the user's work folder."""
    out = user.work / f"devcluster-{tag}-%j.out"
    proc = as_user(user, "sbatch", "--parsable", "--wait", "-t", "5", f"--output={out}", *args,
                   timeout=timeout)  # fmt: skip
    job_id = proc.stdout.strip().split(";")[0]
    return job_id, (user.work / f"devcluster-{tag}-{job_id}.out").read_text()


def partitions() -> dict[str, dict[str, str]]:
    """``scontrol show partition`` as {name: {key: value}}."""
    text = run("scontrol", "show", "partition", "--oneliner").stdout
    parts = {}
    for line in text.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "PartitionName" in fields:
            parts[fields["PartitionName"]] = fields
    return parts


def test_sinfo_shows_four_idle_nodes_in_their_partitions():
    out = run("sinfo", "-h", "-N", "-o", "%N %P %T").stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    by_part: dict[str, set[str]] = {}
    for node, part, _state in rows:
        by_part.setdefault(part.rstrip("*"), set()).add(node)
    gpu_nodes = {"node3", "node4"}
    assert by_part == {"cpu": set(NODES), "gpu": gpu_nodes, "low": set(NODES), "high": set(NODES),
                       "fault": set(FAULT_NODES)}  # fmt: skip
    # The cpu partition is the default one (sinfo marks it with '*').
    assert any(part == "cpu*" for _node, part, _state in rows)
    states = {node: state for node, _part, state in rows}
    assert all(s in {"idle", "mixed", "allocated", "completing"} for s in states.values()), states


def test_nodes_have_four_cpus_and_4000m_and_gpu_nodes_two_gpus():
    out = run("sinfo", "-h", "-N", "-o", "%N|%c|%m|%G").stdout
    nodes = {}
    for line in out.splitlines():
        node, cpus, mem, gres = line.split("|")
        nodes[node] = (int(cpus), int(mem), gres)
    assert set(nodes) == set(NODES + FAULT_NODES)
    for node, (cpus, mem, gres) in nodes.items():
        assert cpus == 4 and mem == 4000, (node, cpus, mem)
        if node in ("node3", "node4"):
            assert gres == "gpu:2", (node, gres)
        else:
            assert gres == "(null)", (node, gres)


def test_partition_limits_match_site_profile():
    site = yaml.safe_load((REPO / "hpcdl/sites" / "devcluster.yaml").read_text())
    parts = {name: p for name, p in partitions().items() if p.get("Hidden") != "YES"}
    assert {p["name"] for p in site["partitions"]} == set(parts)  # `fault` is the tests' own
    for p in site["partitions"]:
        live = parts[p["name"]]
        assert live["MaxTime"] == p["max_time"], (p["name"], live["MaxTime"])
        assert int(live["TotalNodes"]) == p["max_nodes"], (p["name"], live["TotalNodes"])
        assert (live.get("Default") == "YES") == bool(p.get("default")), p["name"]


def test_node_names_resolve_to_loopback():
    for node in NODES:
        assert socket.gethostbyname(node) == "127.0.0.1", node
    assert run("getent", "hosts", "node3").stdout.split()[0] == "127.0.0.1"


def test_up_again_reports_already_up_quickly():
    start = time.monotonic()
    proc = run(str(SCRIPT), "up", timeout=120)
    elapsed = time.monotonic() - start
    assert "already up" in proc.stdout, proc.stdout + proc.stderr
    assert elapsed < 30, f"second up took {elapsed:.1f}s"


def test_status_exits_zero_and_lists_daemons():
    proc = run(str(SCRIPT), "status", timeout=60)
    for daemon in ["munged", "mariadb", "slurmdbd", "slurmctld", *[f"slurmd-{n}" for n in NODES]]:
        assert re.search(rf"^\s+{daemon}\s+running", proc.stdout, re.M), (daemon, proc.stdout)
    assert "devcluster: up" in proc.stdout


def test_batch_job_is_accounted_by_sacct(alice: AsUser):
    job_id, out = sbatch_wait(alice, "sacct", "--job-name=devcluster-sacct", "--wrap", "hostname")
    assert out.strip(), "the job printed nothing"
    # slurmdbd may lag the job's end by a moment (meanwhile it can show a placeholder
    # record named "allocation").
    expected = [[job_id, "devcluster-sacct", alice.user, "COMPLETED", "0:0"]]
    deadline = time.monotonic() + 30
    while True:
        acct = run("sacct", "-n", "-X", "-P", "-j", job_id, "-o",
                   "JobID,JobName,User,State,ExitCode")  # fmt: skip
        rows = [line.split("|") for line in acct.stdout.splitlines() if line]
        if rows == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert rows == expected, acct.stdout


def test_two_nodes_two_tasks_each(alice: AsUser):
    proc = as_user(
        alice,
        "srun",
        "-t",
        "5",
        "-N2",
        "-n4",
        "--ntasks-per-node=2",
        "bash",
        "-c",
        "echo $SLURM_PROCID $SLURMD_NODENAME",
        timeout=180,
    )
    pairs = sorted(tuple(line.split()) for line in proc.stdout.splitlines() if line.strip())
    assert [rank for rank, _ in pairs] == ["0", "1", "2", "3"]
    nodes = [node for _, node in pairs]
    assert len(set(nodes)) == 2 and all(nodes.count(n) == 2 for n in nodes), pairs


def test_gpu_partition_hands_out_two_fake_gpus(alice: AsUser):
    _, out = sbatch_wait(
        alice,
        "gpu",
        "-p",
        "gpu",
        "--gpus-per-node=2",
        "--wrap",
        "echo $CUDA_VISIBLE_DEVICES $SLURM_GPUS_ON_NODE $SLURMD_NODENAME",
    )
    visible, count, node = out.split()
    assert (visible, count) == ("0,1", "2")
    assert node in ("node3", "node4")


@pytest.mark.skipif(os.geteuid() != 0, reason="devcluster.sh needs root")
def test_up_refuses_to_overwrite_a_foreign_config(tmp_path: Path):
    conf = tmp_path / "etc-slurm"
    conf.mkdir()
    (conf / "slurm.conf").write_text("ClusterName=somebody-elses\n")
    proc = run(
        str(SCRIPT),
        "up",
        check=False,
        timeout=120,
        env={**os.environ, "DEVCLUSTER_CONF_DIR": str(conf)},
    )
    assert proc.returncode != 0
    assert "not written by devcluster" in proc.stderr
    assert (conf / "slurm.conf").read_text() == "ClusterName=somebody-elses\n"


def test_root_jobs_check_catches_a_job_root_submits(tmp_path: Path):
    """``tests/root_jobs.py`` (run by ``make test`` after its root phase) lists a job root
    submitted after ``--since`` and exits 1 with its id and name; a ``root-test-`` job (a root
    test's own, like this one) is allowed, and so make test's own check passes. A real job,
    held and cancelled: it never runs."""
    since = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    name = f"root-test-guard-{os.getpid()}"
    job_id = run("sbatch", "--parsable", "--hold", "-t", "1", f"--job-name={name}",
                 f"--output={tmp_path}/%j.out", "--wrap", "true").stdout.strip()  # fmt: skip
    check = [sys.executable, str(REPO / "tests/root_jobs.py"), "--since", since]
    try:
        allowed = run(*check, check=False)
        strict = run(*check, "--allow-prefix", "", check=False)
    finally:
        run("scancel", job_id)
    # (not "exits 0": on a shared machine another session's root job may be listed too)
    assert name not in allowed.stdout + allowed.stderr, allowed.stderr
    assert strict.returncode == 1 and not strict.stdout, strict.stdout + strict.stderr
    lines = strict.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: root submitted "), strict.stderr
    assert f"{job_id} {name} (PENDING)" in lines[0], lines[0]
