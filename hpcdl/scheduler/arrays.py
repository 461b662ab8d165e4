"""Arrays larger than the site's ``max_array_size`` (Slurm's ``MaxArraySize``): how one hpcdl
array becomes several Slurm arrays ("parts"), and how a global task index maps onto them (pure
functions; the Slurm back end submits, queries and cancels the parts).

The throttle scheme keeps the job's ``%P`` a bound on *all* its running tasks. Parts run in
"lanes": the parts of one lane run one after another (each waits ``afterany`` on the lane's
previous part), lanes run side by side and share ``P`` (lane ``j`` gets ``P // L``, +1 for the
first ``P % L`` lanes, as each of its parts' ``%`` throttle). With ``P >= parts`` (or no
throttle) every part is its own lane: all parts run at once and divide ``P``. With
``P < parts`` there is one lane: part k+1 starts when part k has ended, each with ``%P``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from hpcdl.errors import HpcdlError


class ArrayPart(BaseModel):
    """One Slurm array of a split hpcdl array: its tasks are global ``offset..offset+count-1``,
    Slurm's ``0..count-1``."""

    job_id: str
    offset: int
    count: int
    lane: int = 0
    throttle: int | None = None  # its %P at submission (None: submitit's default)


@dataclass(frozen=True)
class PartPlan:
    """A part before it is submitted; ``after`` is the index of the part it waits for."""

    offset: int
    count: int
    lane: int
    throttle: int | None
    after: int | None


def lane_shares(throttle: int, lanes: int) -> list[int]:
    """``throttle`` divided among ``lanes`` (each >= 1, summing to ``throttle``)."""
    if lanes < 1 or throttle < lanes:
        raise HpcdlError(f"a throttle of {throttle} cannot be shared by {lanes} parallel arrays")
    base, extra = divmod(throttle, lanes)
    return [base + (j < extra) for j in range(lanes)]


def plan_parts(n: int, max_size: int | None, throttle: int | None) -> list[PartPlan]:
    """How an array of ``n`` tasks is submitted: one part when it fits ``max_size`` (None:
    unlimited), else ``ceil(n / max_size)`` parts of near-equal size (no tiny last part)."""
    if max_size is None or n <= max_size:
        return [PartPlan(0, n, 0, throttle, None)]
    count = -(-n // max_size)
    base, extra = divmod(n, count)
    lanes = count if throttle is None or throttle >= count else 1
    shares = lane_shares(throttle, lanes) if throttle is not None else [None] * lanes
    plans, offset = [], 0
    for k in range(count):
        size = base + (k < extra)
        lane = k % lanes
        plans.append(PartPlan(offset, size, lane, shares[lane], k - lanes if k >= lanes else None))
        offset += size
    return plans


def lanes_of(parts: list[ArrayPart]) -> int:
    return max((p.lane for p in parts), default=0) + 1


def locate(parts: list[ArrayPart], index: int) -> tuple[ArrayPart, int]:
    """The part holding global task ``index`` and the task's index within it."""
    for part in parts:
        if part.offset <= index < part.offset + part.count:
            return part, index - part.offset
    total = sum(p.count for p in parts)
    raise HpcdlError(f"array {parts[0].job_id} has tasks 0..{total - 1}, not {index}")


def slurm_task_id(part: ArrayPart, local: int) -> str:
    """Slurm's id of one task of a part (a one-task part is a plain job: submitit submits a
    batch of one without ``--array``)."""
    return f"{part.job_id}_{local}" if part.count > 1 else part.job_id


def global_index(parts: list[ArrayPart], job_id: str, local: int | None) -> int | None:
    """The global index of Slurm task ``job_id``_``local`` (``None`` for a whole-part id)."""
    for part in parts:
        if part.job_id == job_id:
            return None if local is None else part.offset + local
    return local


def expand_dependency(spec: str, split: dict[str, list[ArrayPart]]) -> str:
    """A ``--dependency`` value with every split array's first id replaced by all its parts
    (``afterany:123`` -> ``afterany:123:124:125``) and a global task by its part's task
    (``afterok:123_1500`` -> ``afterok:124_499``). ``aftercorr`` pairs tasks by index inside
    one Slurm array, which a split cannot keep: it is left as written."""
    items = []
    for item in spec.split(","):
        kind, sep, rest = item.partition(":")
        if not sep:  # a bare id
            kind, rest = "", item
        if kind == "aftercorr":
            items.append(item)
            continue
        out: list[str] = []
        for jid in rest.split(":"):
            base, _, task = jid.partition("_")
            parts = split.get(base)
            if not parts:
                out.append(jid)
            elif task.isdigit():
                out.append(slurm_task_id(*locate(parts, int(task))))
            else:
                out += [p.job_id for p in parts]
        items.append(f"{kind}:{':'.join(out)}" if sep else ",".join(out))
    return ",".join(items)


def describe(parts: list[PartPlan], n: int, max_size: int | None) -> list[str]:
    """Comment lines for ``render``: which Slurm arrays a split array becomes."""
    if len(parts) < 2:
        return []
    lanes = max(p.lane for p in parts) + 1
    lines = [
        f"# hpcdl: {n} tasks exceed max_array_size {max_size}: submitted as {len(parts)} Slurm "
        f"arrays that are one job (status, logs, cancel, dependencies); shown: part 1",
    ]
    for k, p in enumerate(parts, 1):
        waits = f", after part {p.after + 1} (afterany)" if p.after is not None else ""
        cap = f"%{p.throttle}" if p.throttle else ""
        lines.append(
            f"#   part {k}: tasks {p.offset}-{p.offset + p.count - 1} "
            f"({p.count} tasks, --array=0-{p.count - 1}{cap}){waits}"
        )
    if lanes < len(parts):
        lines.append("#   one part at a time: the throttle is below the number of parts")
    return lines
