"""What a live Slurm cluster says about its partitions, parsed from ``sinfo`` and ``scontrol``
output, compared with a site profile and drafted into one (pure functions;
:class:`hpcdl.scheduler.slurm.SlurmScheduler` runs the commands)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from hpcdl.config import parse_time, validate
from hpcdl.scheduler.hostlist import expand_hostlist
from hpcdl.site import SiteProfile
from hpcdl.slurm_options import feature_problems


class LivePartition(BaseModel):
    """What Slurm itself says about a partition."""

    name: str
    default: bool
    max_time: str
    max_nodes: int
    cpus_per_node: int
    mem_mib: int
    gpus_per_node: int
    state: str
    preempt_mode: str = "OFF"
    grace_time_s: int = 0
    features: list[str] = []  # every feature some node of the partition offers (sinfo %f)
    node_features: list[list[str]] = []  # each node's features (a default constraint's nodes)


def check_site(
    profile: SiteProfile, live: dict[str, LivePartition], config: dict[str, str] | None = None
) -> list[str]:
    """Every disagreement between a profile and the live cluster's partitions and, given
    ``scontrol show config`` (``config``), its limits (empty when they agree).
    ``hpcdl.scheduler.check_site`` asks the profile's back end for ``live`` and ``config``."""
    problems = []
    if config is not None and profile.max_array_size != max_array_size(config):
        problems.append(
            f"max_array_size {profile.max_array_size} here, "
            f"{max_array_size(config)} on the cluster (MaxArraySize)"
        )
    jobs = max_job_count(config) if config is not None else None
    if jobs is not None and profile.max_array_tasks > jobs:  # a lower limit is the site's choice
        problems.append(
            f"max_array_tasks {profile.max_array_tasks} here, above the cluster's "
            f"MaxJobCount {jobs}"
        )
    for p in profile.partitions:
        lp = live.get(p.name)
        if lp is None:
            problems.append(f"partition {p.name}: missing on the cluster (has: {', '.join(live)})")
            continue
        if lp.state != "UP":
            problems.append(f"partition {p.name}: state is {lp.state}")
        # (field, value here, value on the cluster, do they agree?)
        comparisons = [
            ("default", p.default, lp.default, p.default == lp.default),
            (
                "max_time",
                p.max_time,
                lp.max_time,
                parse_time(p.max_time) == parse_time(lp.max_time),
            ),
            ("max_nodes", p.max_nodes, lp.max_nodes, p.max_nodes in (None, lp.max_nodes)),
            (
                "cpus_per_node",
                p.cpus_per_node,
                lp.cpus_per_node,
                p.cpus_per_node == lp.cpus_per_node,
            ),
            ("mem_per_node", p.mem_per_node, f"{lp.mem_mib}M", p.mem_mib in (None, lp.mem_mib)),
            (
                "gpus_per_node",
                p.gpus_per_node,
                lp.gpus_per_node,
                p.gpus_per_node == lp.gpus_per_node,
            ),
            ("preempt_mode", p.preempt_mode, lp.preempt_mode, p.preempt_mode == lp.preempt_mode),
            (
                "grace_time_s",
                p.grace_time_s,
                lp.grace_time_s,
                p.grace_time_s in (None, lp.grace_time_s),
            ),
        ]
        problems += [
            f"partition {p.name}: {field} {here} here, {there} on the cluster"
            for field, here, there, agree in comparisons
            if not agree
        ]
        problems += feature_problems(p, lp.features, lp.node_features)  # the policy's constraint
    for name in live:
        if name not in {p.name for p in profile.partitions}:
            problems.append(f"partition {name}: on the cluster but not in the profile")
    return problems


def import_site(
    name: str, live: dict[str, LivePartition], config: dict[str, str] | None = None
) -> dict:
    """A draft profile (as a plain mapping) from the live cluster's partitions and limits
    (``config``: ``scontrol show config``), validated before it is returned.
    ``hpcdl.scheduler.import_site`` asks Slurm for ``live`` and ``config``."""
    partitions = []
    for lp in live.values():
        entry: dict = {
            "name": lp.name,
            "max_time": lp.max_time,
            "max_nodes": lp.max_nodes,
            "cpus_per_node": lp.cpus_per_node,
            "mem_per_node": f"{lp.mem_mib}M",
        }
        if lp.default:
            entry["default"] = True
        if lp.gpus_per_node:
            entry.update(gpus_per_node=lp.gpus_per_node, gres="gpu")
        if lp.features:
            entry["features"] = lp.features
        if lp.preempt_mode != "OFF":
            entry.update(preempt_mode=lp.preempt_mode, grace_time_s=lp.grace_time_s)
        partitions.append(entry)
    graces = [lp.grace_time_s for lp in live.values() if lp.preempt_mode == "REQUEUE"]
    data: dict[str, Any] = {
        "name": name,
        "scheduler": "slurm",
        "description": "Imported from the live cluster by 'hpcdl site import'; review before use.",
        "partitions": partitions,
        "env": {},
        "secrets": ["WANDB_API_KEY"],
        "job_root": "~/.hpcdl/jobs",
        # Slurm preempts with SIGTERM; the shortest grace time of a requeueing partition.
        "preemption": {"signal": "USR2", "delay_s": 120, "preempt_signals": ["TERM"]}
        | ({"grace_time_s": min(graces)} if graces else {}),
    }
    if config is not None and max_array_size(config) is not None:
        data["max_array_size"] = max_array_size(config)
    if config is not None and max_job_count(config) is not None:
        data["max_array_tasks"] = max_job_count(config)
    validate(SiteProfile, data, f"imported profile {name!r}")
    return data


#: ``sinfo`` format whose output :func:`parse_partitions` reads: node, cpus, memory, GRES, features.
SINFO_FORMAT = "%N|%c|%m|%G|%f"


def parse_partitions(sinfo_nodes: str, scontrol_partitions: str) -> dict[str, LivePartition]:
    """Partitions from ``scontrol show partition -o`` with per-node resources from
    ``sinfo -h -N -o SINFO_FORMAT``; a partition's resources are its smallest node's."""
    nodes: dict[str, tuple[int, int, str]] = {}
    features: dict[str, set[str]] = {}
    for line in sinfo_nodes.splitlines():
        name, cpus, mem, gres, *more = line.split("|")  # more: the features, if asked for
        nodes[name] = (int(cpus), int(mem.rstrip("+") or 0), gres)
        features[name] = {f for f in (more or [""])[0].split(",") if f and f != "(null)"}
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
            features=sorted(set().union(*(features[n] for n in members))),
            node_features=[sorted(features[n]) for n in members],
            preempt_mode=kv.get("PreemptMode", "OFF").split(",")[0],  # e.g. REQUEUE or GANG,SUSPEND
            grace_time_s=int(kv.get("GraceTime", "0")),
        )
    return out


def parse_config(text: str) -> dict[str, str]:
    """``scontrol show config`` as ``{Key: value}`` (``MaxArraySize = 1001`` lines)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


def max_array_size(config: dict[str, str]) -> int | None:
    """MaxArraySize from :func:`parse_config`'s mapping; None when absent or unreadable."""
    value = config.get("MaxArraySize", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def max_job_count(config: dict[str, str]) -> int | None:
    """MaxJobCount (the jobs slurmctld holds at once, array tasks included) from
    :func:`parse_config`'s mapping; None when absent or unreadable."""
    value = config.get("MaxJobCount", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def gpu_count(gres: str) -> int:
    """GPUs in a node's sinfo GRES string, e.g. ``gpu:2`` or ``gpu:a100:4(S:0-1)``."""
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = item.split(":")
        if parts[0] == "gpu" and len(parts) > 1 and parts[-1].isdigit():
            return int(parts[-1])
    return 0
