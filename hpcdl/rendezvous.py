"""The rendezvous rule: where a task sits in its job (rank, node, the master's address and port)
read from the scheduler's variables, as torch.distributed's variables. Shared by every task's
payload (:mod:`hpcdl.task_runner`, for command jobs) and :func:`hpcdl.launch.discover` (for
Python code), so the two agree."""

from __future__ import annotations

import os
import re
import socket
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

from hpcdl.errors import HpcdlError
from hpcdl.hostlist import expand_hostlist
from hpcdl.preemption import slurm_task

# Derived master ports: from PORT_LOW up to Linux's default ephemeral range (ip_local_port_range).
PORT_LOW, EPHEMERAL_LOW = 20000, 32768


def master_port(job_id: str, array_task_id: str | None = None, restart: str | None = None) -> int:
    """A port in 20000–32767 derived from the job (and array task), so that two jobs or two array
    tasks sharing a node do not collide; ``HPCDL_MASTER_PORT`` overrides it. Below Linux's
    ephemeral range (32768–60999 by default), where the kernel picks the local port of every
    outgoing connection: a derived port in it was once taken by one, and a requeued job's rank 0
    failed with EADDRINUSE (it was 20000–59999). A requeued job
    (``restart``: ``SLURM_RESTART_COUNT``) gets another port: Slurm may restart it on the same
    nodes seconds after a node failure, while a process of the previous run still holds the old
    port, and the new ranks would rendezvous with it."""
    if os.environ.get("HPCDL_MASTER_PORT"):
        return int(os.environ["HPCDL_MASTER_PORT"])
    key = f"{job_id}:{array_task_id or ''}" + (
        f":{restart}" if restart not in (None, "", "0") else ""
    )
    return PORT_LOW + zlib.crc32(key.encode()) % (EPHEMERAL_LOW - PORT_LOW)


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's ``SLURM_STEP_TASKS_PER_NODE`` form ``2(x3),1`` → ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise HpcdlError(f"cannot parse Slurm tasks-per-node {spec!r}")
        counts += [int(m[1])] * int(m[2] or 1)
    return counts


def resolve(host: str) -> str:
    """A node name as an IPv4 address (what torch.distributed and DeepSpeed connect to)."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise HpcdlError(
            f"cannot resolve node {host!r} to an address (check /etc/hosts or DNS)"
        ) from None


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job and how ranks find each other (torch.distributed's
    variables). Read from the scheduler's variables in every task (:func:`slurm_layout`,
    :func:`local_layout`) and by :func:`hpcdl.launch.discover`; ``master_addr`` is then a node
    name until :meth:`resolved`."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # slurm | submitit-local | env | mpi | single
    num_nodes: int = 1
    job_id: str = ""

    def resolved(self) -> DistEnv:
        """The same place with ``master_addr`` an address every node can reach."""
        return replace(self, master_addr=resolve(self.master_addr))

    def export(self) -> None:
        """Set the torch.distributed / DeepSpeed environment variables."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            NODE_RANK=str(self.node_rank),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def first_host(nodelist: str) -> str:
    """The first node of a Slurm node list (hpcdl's hostlist parser: no ``scontrol`` needed, so
    the same inside a container)."""
    try:
        hosts = expand_hostlist(nodelist)
    except ValueError:
        hosts = []
    if not hosts:
        raise HpcdlError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}")
    return hosts[0]


def slurm_layout(env: Mapping[str, str]) -> DistEnv:
    """From the variables srun gives each task (step variables first, job variables else);
    the master is the first host of the step's node list, the port :func:`master_port`."""
    node_rank = int(env.get("SLURM_NODEID", "0"))
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env["SLURM_TASKS_PER_NODE"])
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    task = slurm_task(env)
    if task is None:
        raise KeyError("SLURM_JOB_ID")  # as any other variable srun always sets
    job_id = task.array_job or task.job
    array_task = None if task.array_task is None else str(task.array_task)
    restart = str(task.restarts) if task.restarts else None
    return DistEnv(
        rank=int(env["SLURM_PROCID"]),
        world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
        local_rank=int(env["SLURM_LOCALID"]),
        local_world_size=per_node[min(node_rank, len(per_node) - 1)],
        node_rank=node_rank,
        num_nodes=len(per_node),
        master_addr=first_host(nodelist),
        master_port=master_port(job_id, array_task, restart),
        job_id=task.job,
        source="slurm",
    )


def local_layout(env: Mapping[str, str]) -> DistEnv:
    """From submitit's local executor (all tasks on this machine)."""
    n = int(env["SUBMITIT_LOCAL_NTASKS"])
    job_id = env["SUBMITIT_LOCAL_JOB_ID"]
    return DistEnv(
        rank=int(env["SUBMITIT_LOCAL_GLOBALID"]),
        world_size=n,
        local_rank=int(env["SUBMITIT_LOCAL_LOCALID"]),
        local_world_size=n,
        node_rank=0,
        num_nodes=1,
        master_addr="127.0.0.1",
        master_port=master_port(job_id),
        job_id=job_id,
        source="submitit-local",
    )


def in_slurm_step(env: Mapping[str, str]) -> bool:
    return all(k in env for k in ("SLURM_PROCID", "SLURM_STEP_ID", "SLURM_JOB_ID"))


def torch_env(layout: DistEnv) -> dict[str, str]:
    """The variables torchrun gives each worker, for a task started directly by srun."""
    return {
        "RANK": str(layout.rank),
        "WORLD_SIZE": str(layout.world_size),
        "LOCAL_RANK": str(layout.local_rank),
        "LOCAL_WORLD_SIZE": str(layout.local_world_size),
        "NODE_RANK": str(layout.node_rank),
        "GROUP_RANK": str(layout.node_rank),
        "GROUP_WORLD_SIZE": str(layout.num_nodes),
        "MASTER_ADDR": resolve(layout.master_addr),
        "MASTER_PORT": str(layout.master_port),
    }


def torchrun_rendezvous(layout: DistEnv) -> dict[str, str]:
    """torchrun's own defaults for ``--rdzv-endpoint/--rdzv-id/--rdzv-conf`` (``PET_*``): the
    c10d store on the first node at :func:`master_port`, hosted by node 0's torchrun."""
    return {
        "PET_RDZV_ENDPOINT": f"{resolve(layout.master_addr)}:{layout.master_port}",
        "PET_RDZV_ID": layout.job_id,
        "PET_RDZV_CONF": f"is_host={'true' if layout.node_rank == 0 else 'false'}",
    }
