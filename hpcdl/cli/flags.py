"""The job options that sbatch also has, read as sbatch reads them (``-n`` and ``-G`` are totals,
not per node), with a clear error or note wherever hpcdl's older meaning would silently change a
command line; and ``sbatch --test-only``'s answer as hpcdl shows it."""

from __future__ import annotations

import re
from typing import Any

import click

from hpcdl.errors import ConfigError

#: sbatch's totals and the per-node fields hpcdl keeps them as.
_TOTALS = {"ntasks": ("-n/--ntasks", "tasks_per_node", "--ntasks-per-node", "tasks"),
           "gpus": ("-G/--gpus", "gpus_per_node", "--gpus-per-node", "GPUs")}  # fmt: skip


class NodesValue(click.ParamType):
    """``-N``: a count (an int, so that -n and -G totals split over it) or ``MIN-MAX``."""

    name = "N|MIN-MAX"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        text = str(value).strip()
        if text.isdigit():
            return int(text)
        if re.fullmatch(r"\d+\s*-\s*\d+", text):
            return text  # its bounds are the job's to check (one line naming the field)
        self.fail(f"{value!r} is not a valid integer or a range MIN-MAX (e.g. 2-4)", param, ctx)


def per_node(data: dict[str, Any], key: str, total: int, where: str) -> None:
    """``-n``/``-G`` (totals, as in sbatch) as the job's per-node count. Before, hpcdl read
    ``-n`` and ``-G`` per node: a total that does not split evenly is an error naming both
    flags, and a multi-node total says what it now means (``-N 2 -n 2``: 2 tasks, not 4)."""
    flag, field, per_flag, what = _TOTALS[key]
    nodes = data.get("nodes", 1)
    if isinstance(nodes, str) and "-" in nodes:  # MIN-MAX: Slurm picks the count at the start
        raise ConfigError(
            where, flag, f"a total of {what} cannot be split over -N/--nodes {nodes} (Slurm "
            f"picks the node count when the job starts): give {per_flag} N for N per node",
        )  # fmt: skip
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        return  # the Job's own validation names the bad nodes value
    if total < 1 or total % nodes:
        raise ConfigError(
            where, flag, f"{total} {what} in all do not split evenly over {nodes} node(s) "
            f"(-N/--nodes {nodes}): give a multiple of {nodes}, or {per_flag} N for N per node",
        )  # fmt: skip
    per = total // nodes
    given = data.get(field)
    if given is not None and given != per:
        raise ConfigError(
            where, flag, f"{total} {what} in all over {nodes} node(s) is {per} per node, "
            f"but {per_flag} (or {field} in the job file) says {given}",
        )  # fmt: skip
    data[field] = per
    if nodes > 1:
        click.echo(f"note: {flag.split('/')[0]} {total} means {total} {what} in all, {per} per "
                   f"node, as in sbatch (for {total} per node: {per_flag} {total})", err=True)  # fmt: skip


# sbatch's short flags that mean something else to sbatch than they once did to hpcdl.
NOT_HPCDL = {
    "-s": "sbatch's -s is --oversubscribe: give the site as --site NAME",
    "-e": "sbatch's -e is --error: give environment variables as --env KEY=VALUE",
}


def when_where(answer: str) -> str:
    """sbatch's ``sbatch: Job 123 to start at T using N processors on nodes X in partition P``
    without the job id, which no job will ever have (nothing was queued by the test)."""
    text = re.sub(r"^(sbatch: )?Job \d+ to start", "would start", answer.strip())
    return f"sbatch --test-only: {text}"


def policy_added(job: Any, site: Any) -> str | None:
    """``site policy for partition 'cpu' added --constraint=intel``: the options the partition's
    policy adds to this job (what it did not set itself), or None. Said wherever a job is
    previewed or fails, since a default the user never typed can be why Slurm refuses it."""
    from hpcdl.scheduler import get_scheduler

    if not get_scheduler(site).queued:
        return None
    part = site.partition(job.partition)
    if part is None:
        return None
    own = job.sbatch_options()
    added = {k: v for k, v in part.policy.defaults.items() if k not in own and v is not False}
    if not added:
        return None
    flags = " ".join(f"--{k}" + ("" if v is True else f"={v}") for k, v in added.items())
    return f"site policy for partition {part.name!r} added {flags}"
