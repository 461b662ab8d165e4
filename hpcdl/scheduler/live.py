"""What a live Slurm cluster says about its partitions, parsed from ``sinfo`` and ``scontrol``
output (pure functions; :class:`hpcdl.scheduler.slurm.SlurmScheduler` runs the commands)."""

from __future__ import annotations

import re

from hpcdl.scheduler.hostlist import expand_hostlist
from hpcdl.site import LivePartition

#: ``sinfo`` format whose output :func:`parse_partitions` reads: node, cpus, memory, GRES.
SINFO_FORMAT = "%N|%c|%m|%G"


def parse_partitions(sinfo_nodes: str, scontrol_partitions: str) -> dict[str, LivePartition]:
    """Partitions from ``scontrol show partition -o`` with per-node resources from
    ``sinfo -h -N -o SINFO_FORMAT``; a partition's resources are its smallest node's."""
    nodes: dict[str, tuple[int, int, str]] = {}
    for line in sinfo_nodes.splitlines():
        name, cpus, mem, gres = line.split("|")
        nodes[name] = (int(cpus), int(mem.rstrip("+") or 0), gres)
    out = {}
    for line in scontrol_partitions.splitlines():
        kv = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        members = [n for n in expand_hostlist(kv.get("Nodes", "")) if n in nodes]
        max_nodes = kv.get("MaxNodes", "UNLIMITED")
        out[kv["PartitionName"]] = LivePartition(
            name=kv["PartitionName"],
            default=kv.get("Default") == "YES",
            max_time=kv.get("MaxTime", "UNLIMITED").replace("UNLIMITED", "infinite"),
            max_nodes=int(kv.get("TotalNodes", len(members)))
            if max_nodes == "UNLIMITED"
            else int(max_nodes),
            cpus_per_node=min((nodes[n][0] for n in members), default=0),
            mem_mib=min((nodes[n][1] for n in members), default=0),
            gpus_per_node=min((gpu_count(nodes[n][2]) for n in members), default=0),
            state=kv.get("State", "UP"),
        )
    return out


def gpu_count(gres: str) -> int:
    """GPUs in a node's sinfo GRES string, e.g. ``gpu:2`` or ``gpu:a100:4(S:0-1)``."""
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = item.split(":")
        if parts[0] == "gpu" and len(parts) > 1 and parts[-1].isdigit():
            return int(parts[-1])
    return 0
