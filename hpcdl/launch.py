"""Distributed rendezvous without hostfiles or ssh: from Slurm's variables, submitit's local
executor, torchrun's variables, or MPI (mpi4py). One call: :func:`init_distributed`."""

from __future__ import annotations

import os
import re
import socket
import zlib
from dataclasses import dataclass
from datetime import timedelta

from hpcdl.errors import HpcdlError

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job and how ranks find each other."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # slurm | submitit-local | env | mpi | single

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


def master_port(job_id: str, array_task_id: str | None = None) -> int:
    """A port in 20000–59999 derived from the job (and array task), so that two jobs or two array
    tasks sharing a node do not collide; ``HPCDL_MASTER_PORT`` overrides it."""
    if os.environ.get("HPCDL_MASTER_PORT"):
        return int(os.environ["HPCDL_MASTER_PORT"])
    return 20000 + zlib.crc32(f"{job_id}:{array_task_id or ''}".encode()) % 40000


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's ``SLURM_STEP_TASKS_PER_NODE`` form ``2(x3),1`` → ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise HpcdlError(f"cannot parse Slurm tasks-per-node {spec!r}")
        counts += [int(m[1])] * int(m[2] or 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first node of an allocation: ``scontrol show hostnames`` when present (not in every
    container), else hpcdl's own hostlist parser."""
    from hpcdl.scheduler import hostnames

    try:
        hosts = hostnames(nodelist)
    except ValueError:
        hosts = []
    if not hosts:
        raise HpcdlError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}")
    return hosts[0]


def _resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise HpcdlError(
            f"cannot resolve node {host!r} to an address (check /etc/hosts or DNS)"
        ) from None


def _from_slurm(env: os._Environ[str]) -> DistEnv:
    node_rank = int(env.get("SLURM_NODEID", "0"))
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env["SLURM_TASKS_PER_NODE"])
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    job_id = env.get("SLURM_ARRAY_JOB_ID") or env["SLURM_JOB_ID"]
    return DistEnv(
        rank=int(env["SLURM_PROCID"]),
        world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
        local_rank=int(env["SLURM_LOCALID"]),
        local_world_size=per_node[min(node_rank, len(per_node) - 1)],
        node_rank=node_rank,
        master_addr=_resolve(first_host(nodelist)),
        master_port=master_port(job_id, env.get("SLURM_ARRAY_TASK_ID")),
        source="slurm",
    )


def _from_submitit_local(env: os._Environ[str]) -> DistEnv:
    n = int(env["SUBMITIT_LOCAL_NTASKS"])
    return DistEnv(
        rank=int(env["SUBMITIT_LOCAL_GLOBALID"]),
        world_size=n,
        local_rank=int(env["SUBMITIT_LOCAL_LOCALID"]),
        local_world_size=n,
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=master_port(env["SUBMITIT_LOCAL_JOB_ID"]),
        source="submitit-local",
    )


def _from_env(env: os._Environ[str]) -> DistEnv:
    world = int(env["WORLD_SIZE"])
    return DistEnv(
        rank=int(env["RANK"]),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
        node_rank=int(env.get("NODE_RANK", "0")),
        master_addr=env["MASTER_ADDR"],
        master_port=int(env["MASTER_PORT"]),
        source="env",
    )


def _from_mpi() -> DistEnv:
    """Rank 0 picks a free port and broadcasts its address (its resolved hostname; ``hostname -I``,
    which DeepSpeed uses, can pick the wrong interface)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    leaders = comm.Split(0 if local.Get_rank() == 0 else MPI.UNDEFINED, comm.Get_rank())
    node_rank = leaders.Get_rank() if leaders != MPI.COMM_NULL else -1
    node_rank = local.bcast(node_rank, root=0)
    addr_port = None
    if comm.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR") or _resolve(socket.gethostname())
        addr_port = (addr, _free_port())
    addr, port = comm.bcast(addr_port, root=0)
    return DistEnv(
        rank=comm.Get_rank(),
        world_size=comm.Get_size(),
        local_rank=local.Get_rank(),
        local_world_size=local.Get_size(),
        node_rank=node_rank,
        master_addr=addr,
        master_port=int(os.environ.get("HPCDL_MASTER_PORT") or port),
        source="mpi",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def discover() -> DistEnv:
    """This process's place in the job, from whatever launched it."""
    env = os.environ
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_JOB_ID" in env:
        return _from_slurm(env)
    if "SUBMITIT_LOCAL_GLOBALID" in env:
        return _from_submitit_local(env)
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return _from_env(env)
    if any(k in env for k in _MPI_RANK_VARS):
        return _from_mpi()
    return DistEnv(0, 1, 0, 1, 0, "127.0.0.1", _free_port(), "single")


def backend() -> str:
    """NCCL with GPUs, gloo on CPU."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_s: float = 600, dist_backend: str | None = None) -> DistEnv:
    """Discover ranks, export the environment, bind this rank's GPU and start torch.distributed.

    Usable from any script: ``from hpcdl.launch import init_distributed; env = init_distributed()``.
    """
    import torch
    import torch.distributed as dist

    info = discover()
    info.export()
    chosen = dist_backend or backend()
    if chosen == "nccl":
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(
            chosen,
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return info
