"""The Slurm back end's own mapping of a request: its checks against the partition's limits and
the sbatch options it becomes (GRES, signal, requeue, launcher flags). The job stays passive:
it says what it needs; this module alone knows how Slurm is asked for it."""

from __future__ import annotations

from typing import Any

from hpcdl import containers
from hpcdl.config import format_minutes, parse_mem, parse_time
from hpcdl.errors import ConfigError
from hpcdl.scheduler.interface import Request
from hpcdl.scheduler.submission import setup_lines
from hpcdl.site import SiteProfile
from hpcdl.slurm_options import check_job_options


def check_partition(request: Request, site: SiteProfile, where: str) -> None:
    """Raise ConfigError if the request exceeds its partition's limits."""
    try:
        part = site.partition(request.partition)
    except KeyError:
        names = ", ".join(p.name for p in site.partitions)
        raise ConfigError(
            where,
            "partition",
            f"unknown partition {request.partition!r} on site {site.name!r} (available: {names})",
        ) from None
    assert part is not None
    minutes = parse_time(request.time)
    if part.max_minutes is not None and minutes is not None and minutes > part.max_minutes:
        raise ConfigError(
            where,
            "time",
            f"{request.time} exceeds partition {part.name!r} limit {format_minutes(part.max_minutes)}",
        )
    if part.max_nodes is not None and request.nodes > part.max_nodes:
        shown = request.node_range  # MIN-MAX names its MAX as the part over the limit
        largest = f" (MAX {request.nodes})" if request.min_nodes is not None else ""
        raise ConfigError(
            where,
            "nodes",
            f"{shown}{largest} exceeds partition {part.name!r} limit {part.max_nodes}",
        )
    if request.gpus_per_node and not part.gpus_per_node:
        gpu_parts = ", ".join(p.name for p in site.partitions if p.gpus_per_node) or "none"
        raise ConfigError(
            where,
            "gpus_per_node",
            f"partition {part.name!r} has no GPUs (GPU partitions: {gpu_parts})",
        )
    if request.gpus_per_node > part.gpus_per_node:
        raise ConfigError(
            where,
            "gpus_per_node",
            f"{request.gpus_per_node} exceeds partition {part.name!r} limit {part.gpus_per_node}",
        )
    cpus = request.cpus_per_task * request.ntasks_per_node
    if cpus > part.cpus_per_node:
        raise ConfigError(
            where,
            "tasks_per_node",
            f"{request.ntasks_per_node} tasks x {request.cpus_per_task} cpus = {cpus} exceeds "
            f"partition {part.name!r} limit of {part.cpus_per_node} cpus per node",
        )
    if (
        request.mem is not None
        and part.mem_mib is not None
        and parse_mem(request.mem) > part.mem_mib
    ):
        raise ConfigError(
            where, "mem", f"{request.mem} exceeds partition {part.name!r} limit {part.mem_per_node}"
        )
    check_job_options(request, part, where)  # gpus_per_task, the partition's policy, features


def slurm_parameters(request: Request, site: SiteProfile) -> dict[str, Any]:
    """The submitit SlurmExecutor parameters for ``request`` on ``site``."""
    part = site.partition(request.partition)
    assert part is not None
    per_node = request.launched_tasks_per_node  # torchrun: one task with every rank's CPUs
    params: dict[str, Any] = {
        "job_name": slurm_job_name(request.name),
        "partition": part.name,
        "time": parse_time(request.time),
        "nodes": request.nodes,
        "ntasks_per_node": per_node,
        "cpus_per_task": request.cpus_per_task * request.ntasks_per_node // per_node,
        "signal_delay_s": site.preemption.delay_s,
        "wckey": None,
        "setup": setup_lines(request, site),
        # the job's extra sbatch options after the partition's policy (defaults added)
        "additional_parameters": {"export": "ALL", **check_job_options(request, part, "job")},
    }
    if request.gpus_per_node:
        kind = f"{part.gpu_type}:" if part.gpu_type else ""
        if part.gres == "gpu":
            params["gpus_per_node"] = f"{kind}{request.gpus_per_node}"
        else:
            params["gres"] = f"{part.gres}:{kind}{request.gpus_per_node}"
    if request.mem:
        params["mem"] = f"{parse_mem(request.mem)}M"
    account = request.account or site.default_account
    if account:
        params["account"] = account
    qos = request.qos or site.default_qos
    if qos:
        params["qos"] = qos
    if request.dependencies:
        params["dependency"] = ",".join(
            d if ":" in d else f"afterok:{d}" for d in request.dependencies
        )
    if request.throttle:
        params["array_parallelism"] = request.throttle
    if request.requeue:
        params["additional_parameters"]["requeue"] = True
    if request.min_nodes is not None:
        # Elastic start: Slurm may start the job on any count from MIN to MAX. submitit takes
        # an int for its own --nodes (it counts tasks by it); its additional parameters
        # replace a value of the same name in the script.
        params["additional_parameters"]["nodes"] = request.node_range
    if site.preemption.signal != "USR2":
        params["additional_parameters"]["signal"] = (
            f"{site.preemption.signal}@{site.preemption.delay_s}"
        )
    mpi = site.launcher(request.launcher).mpi if request.command is not None else None
    srun = [f"--mpi={mpi}"] if mpi else []
    # pyxis: srun enters the image for commands and callables alike
    srun += containers.srun_args(site.container, request.image(site))
    if srun:
        params["srun_args"] = srun
    return params


def slurm_job_name(name: str) -> str:
    """Slurm's job name: at most 200 characters (a job's name is one line: ``Job`` checks it)."""
    return name[:200] or "hpcdl-job"


def sbatch_quoting(script: str) -> str:
    """The script with its ``#SBATCH`` lines quoted for sbatch's own reader, not bash's.

    submitit quotes each directive's value with ``shlex.quote`` (single quotes), which sbatch
    reads as bash would except for one character: sbatch takes a backslash as an escape even
    inside single quotes (``'a\\b'`` reads as ``ab``, and ``'\\'`` as an unmatched quote, which
    fails the submission). shlex.quote adds no backslash of its own, so doubling every backslash
    on a directive line makes sbatch read each value exactly as given."""
    lines = script.split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() and not line.startswith("#"):
            break  # sbatch reads directives up to the first line of commands
        if line.startswith("#SBATCH") and "\\" in line:
            lines[i] = line.replace("\\", "\\\\")
    return "\n".join(lines)
