"""Distributed rendezvous without hostfiles or ssh: from Slurm's variables, submitit's local
executor, torchrun's variables, or MPI (mpi4py). One call: :func:`init_distributed`."""

from __future__ import annotations

import os
import random
import socket
from datetime import timedelta

from hpcdl import exit_guard
from hpcdl.rendezvous import (
    EPHEMERAL_LOW,
    PORT_LOW,
    DistEnv,
    in_slurm_step,
    local_layout,
    master_port,
    resolve,
    slurm_layout,
    tasks_per_node,
)

__all__ = ["DistEnv", "discover", "init_distributed", "master_port", "tasks_per_node"]

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


def _from_slurm(env: os._Environ[str]) -> DistEnv:
    """The rule command jobs get too (``hpcdl.task_runner.slurm_layout``)."""
    return slurm_layout(env).resolved()


def _from_submitit_local(env: os._Environ[str]) -> DistEnv:
    return local_layout(env).resolved()


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
        addr = os.environ.get("MASTER_ADDR") or resolve(socket.gethostname())
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


def _free_port(tries: int = 50) -> int:
    """A port free now, below Linux's ephemeral range, like :func:`master_port`'s: the kernel's
    own pick (``bind(0)``) is in that range, where every outgoing connection takes its local
    port, and in the seconds before rank 0 binds it for good (imports, then the rendezvous) a
    gloo connection of another job took it (EADDRINUSE, seen with two ``mpiexec`` runs at once).
    Random, not derived: an MPI or single-process run has no job id to derive it from."""
    rng = random.SystemRandom()
    for _ in range(tries):
        port = rng.randrange(PORT_LOW, EPHEMERAL_LOW)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {PORT_LOW}-{EPHEMERAL_LOW - 1} after {tries} tries")


def discover() -> DistEnv:
    """This process's place in the job, from whatever launched it."""
    env = os.environ
    if in_slurm_step(env):
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
    exit_guard.install()  # gloo's threads can outlive the group: leave safely at exit
    if not dist.is_initialized():
        dist.init_process_group(
            chosen,
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return info
