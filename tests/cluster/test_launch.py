"""Rendezvous from Slurm variables, submitit's local executor and MPI, with real all-reduces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from hpcdl import Job
from hpcdl.errors import HpcdlError
from hpcdl.launch import discover, first_host, master_port, tasks_per_node

ALLREDUCE = str(REPO / "tests/helpers/allreduce.py")


def test_tasks_per_node_forms():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("4") == [4]
    with pytest.raises(HpcdlError, match="cannot parse"):
        tasks_per_node("two")


def test_master_port_is_deterministic_and_separates_array_tasks(monkeypatch):
    monkeypatch.delenv("HPCDL_MASTER_PORT", raising=False)
    assert master_port("123", "4") == master_port("123", "4")
    ports = {master_port("123", str(t)) for t in range(50)}
    assert len(ports) == 50 and all(20000 <= p < 32768 for p in ports)
    # a requeued job rendezvouses on another port (its previous run may still hold the old one)
    assert master_port("123", "4", "0") == master_port("123", "4")
    assert len({master_port("123", "4", str(r)) for r in range(4)}) == 4
    monkeypatch.setenv("HPCDL_MASTER_PORT", "29501")
    assert master_port("123", "4") == 29501


def test_first_host_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_host("gpu[07-09],cpu1") == "gpu07"


def test_discover_from_slurm_variables(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # as inside a container without scontrol
    monkeypatch.delenv("HPCDL_MASTER_PORT", raising=False)
    for key, value in {
        "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "localhost,localhost",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    info = discover()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert info.node_rank == 1 and info.master_addr == "127.0.0.1" and info.source == "slurm"
    assert info.master_port == master_port("77")


def _reports(prefix: Path, n: int) -> list[dict]:
    files = sorted(prefix.parent.glob(prefix.name + ".*.json"))
    assert len(files) == n, files
    return [json.loads(p.read_text()) for p in files]


def test_local_profile_two_tasks_allreduce(tmp_path):
    job = Job(command=[sys.executable, ALLREDUCE, str(tmp_path / "r")], tasks_per_node=2, time="5m")
    handle = job.submit()
    assert handle.wait(timeout=120) == "COMPLETED", handle.log_paths()[1].read_text()
    reports = _reports(tmp_path / "r", 2)
    assert {r["sum"] for r in reports} == {1.0}
    assert {r["source"] for r in reports} == {"submitit-local"}


def test_mpiexec_discovery_through_mpi4py(tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([str(mpiexec), "-n", "2", sys.executable, ALLREDUCE, str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=180, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = _reports(tmp_path / "m", 2)
    assert {r["sum"] for r in reports} == {1.0}
    assert {r["source"] for r in reports} == {"mpi"}
    assert sorted(r["local_rank"] for r in reports) == [0, 1]


@pytest.mark.slurm
def test_two_nodes_allreduce_on_the_cluster(devcluster, tmp_path):
    job = Job(site=devcluster, nodes=2, tasks_per_node=2, time="5m",
              command=[sys.executable, ALLREDUCE, str(tmp_path / "s")])  # fmt: skip
    handle = job.submit()
    assert handle.wait(timeout=180) == "COMPLETED", handle.log_paths()[1].read_text()
    reports = _reports(tmp_path / "s", 4)
    assert {r["sum"] for r in reports} == {6.0}
    assert {r["master_addr"] for r in reports} == {"127.0.0.1"}
    assert sorted((r["node_rank"], r["local_rank"]) for r in reports) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert {r["backend"] for r in reports} == {"gloo"}
