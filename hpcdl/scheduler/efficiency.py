"""What a finished allocation used of what it held, from sacct's fields (pure: no command runs
here; :func:`hpcdl.scheduler.accounting.job_usage` asks sacct and hands the text over).

sacct gives one row per allocation (a job, or a task of an array: ``123`` or ``123_4``) and one
per step (``123.batch``, ``123_4.0``, ``123.extern``). The allocation row holds what was held
(AllocCPUS, AllocTRES, NNodes), the times and TotalCPU (the steps' CPU summed); the step rows hold
what was gathered (MaxRSS, TRESUsageInTot/Max). So an allocation's figures come from its row
and the rows of its steps:

- CPU efficiency = TotalCPU / (ElapsedRaw x AllocCPUS). TotalCPU is the rusage of the step's
  processes at their end, so it holds for jobs shorter than the gathering period too.
- Peak memory = the largest ``mem`` of a step's TRESUsageInTot (the sum over the step's tasks of
  each task's peak; MaxRSS when TRES usage is missing), against the ``mem`` of AllocTRES. The
  gathering plugin samples /proc every JobAcctGatherFrequency seconds: a step that ends before
  its first sample has no memory figure (``None``, shown as "-"), never a guessed one.
- GPU use: ``gres/gpuutil`` of TRESUsageInAve/Max where the site gathers it (NVML); None else.
- Queue wait = Start - Submit; node-hours = ElapsedRaw x NNodes; GPU-hours = ElapsedRaw x the
  ``gres/gpu`` count of AllocTRES.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

# The sacct fields parse_usage reads, in this order (``sacct -P -o`` joins them with '|').
USAGE_FIELDS = ("JobID", "State", "Submit", "Start", "End", "ElapsedRaw", "TotalCPU", "AllocCPUS",
                "NNodes", "MaxRSS", "AllocTRES", "TRESUsageInTot", "TRESUsageInMax")  # fmt: skip

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGTP]?)$")
_DURATION = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)$")


def parse_size(text: str) -> int | None:
    """sacct's memory figure in bytes: ``4572K``, ``2G``, ``1.50M``, ``0`` (K=1024 bytes); None
    for an empty field (nothing gathered)."""
    m = _SIZE.match(text.strip().upper())
    return round(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def parse_duration(text: str) -> float | None:
    """sacct's ``[D-][HH:]MM:SS[.mmm]`` (TotalCPU, Elapsed, a TRES ``cpu=`` figure) in seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        return None
    days, hours, minutes, seconds = m.groups()
    return int(days or 0) * 86400 + int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)


def parse_tres(text: str) -> dict[str, str]:
    """``cpu=2,mem=2G,node=1,gres/gpu=2`` as ``{name: value}`` (values left as text: a TRES is a
    count, a size or a duration depending on its name and field)."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if sep and name:
            out[name.strip()] = value.strip()
    return out


def _when(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # "Unknown", "None": not started or not ended yet
        return None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


@dataclass(frozen=True)
class SacctRow:
    """One row of ``sacct -P -o USAGE_FIELDS``: an allocation (``step`` empty) or one step."""

    alloc: str
    step: str
    state: str
    submit: datetime | None
    start: datetime | None
    end: datetime | None
    elapsed_s: int
    total_cpu_s: float | None
    cpus: int
    nodes: int
    max_rss: int | None
    alloc_tres: dict[str, str]
    usage_tot: dict[str, str]
    usage_max: dict[str, str]


def parse_rows(text: str) -> list[SacctRow]:
    """sacct's ``-P`` output (no header) as rows; lines of another shape are skipped."""
    rows = []
    for line in text.splitlines():
        f = line.split("|")
        if len(f) != len(USAGE_FIELDS):
            continue
        alloc, _, step = f[0].partition(".")
        rows.append(SacctRow(alloc, step, f[1].split()[0] if f[1] else "", _when(f[2]),
                             _when(f[3]), _when(f[4]), _int(f[5]), parse_duration(f[6]),
                             _int(f[7]), _int(f[8]), parse_size(f[9]), parse_tres(f[10]),
                             parse_tres(f[11]), parse_tres(f[12])))  # fmt: skip
    return rows


@dataclass(frozen=True)
class Usage:
    """What one allocation held and used (see the module's docstring for each figure)."""

    task: str
    state: str
    wait_s: float | None
    elapsed_s: int
    cpus: int
    nodes: int
    gpus: int
    cpu_s: float | None
    mem_req: int | None
    mem_peak: int | None
    gpu_util: float | None = None  # percent, where gathered

    @property
    def cpu_eff(self) -> float | None:
        if self.cpu_s is None or self.elapsed_s <= 0 or self.cpus <= 0:
            return None
        return self.cpu_s / (self.elapsed_s * self.cpus)

    @property
    def mem_eff(self) -> float | None:
        if self.mem_peak is None or not self.mem_req:
            return None
        return self.mem_peak / self.mem_req

    @property
    def node_hours(self) -> float:
        return self.elapsed_s * self.nodes / 3600

    @property
    def gpu_hours(self) -> float:
        return self.elapsed_s * self.gpus / 3600


def usages(rows: list[SacctRow]) -> list[Usage]:
    """One :class:`Usage` per allocation, in sacct's order, its steps folded in. A requeued
    task's runs (``--duplicates``) share one id: sacct lists each run's steps right after it,
    so a step belongs to the last allocation row of its id (keyed by id alone, every run had
    got the steps of all, and the peak memory of another run)."""
    out: list[tuple[SacctRow, list[SacctRow]]] = []
    latest: dict[str, list[SacctRow]] = {}
    for row in rows:
        if not row.step:
            latest[row.alloc] = []  # this run's steps follow
            out.append((row, latest[row.alloc]))
        elif row.alloc in latest:
            latest[row.alloc].append(row)
    return [_usage(alloc, steps) for alloc, steps in out]


def _usage(alloc: SacctRow, steps: list[SacctRow]) -> Usage:
    # A running allocation's TotalCPU reads 0 until its steps end (slurmdbd hears of usage at a
    # step's end): None, not a 0 % efficiency.
    wait = (alloc.start - alloc.submit).total_seconds() if alloc.start and alloc.submit else None
    peaks = [p for s in steps if (p := _step_peak(s)) is not None]
    cpu = alloc.total_cpu_s
    if not cpu and steps:  # some sacct versions leave the allocation's TotalCPU empty
        cpu = sum(s.total_cpu_s or 0.0 for s in steps) or cpu
    utils = [float(u) for s in steps if (u := s.usage_max.get("gres/gpuutil", "")).isdigit()]
    return Usage(alloc.alloc, alloc.state, wait, alloc.elapsed_s, alloc.cpus, alloc.nodes,
                 _int(alloc.alloc_tres.get("gres/gpu", "0")), cpu if alloc.end else None,
                 parse_size(alloc.alloc_tres.get("mem", "")), max(peaks) if peaks else None,
                 max(utils) if utils else None)  # fmt: skip


def _step_peak(step: SacctRow) -> int | None:
    tot = parse_size(step.usage_tot.get("mem", ""))
    return tot if tot is not None else step.max_rss


def totals(items: list[Usage]) -> dict[str, float]:
    """Node- and GPU-hours, CPU and memory use summed over allocations (a sweep's rounds)."""
    held = sum(u.elapsed_s * u.cpus for u in items if u.cpu_s is not None)
    used = sum(u.cpu_s or 0.0 for u in items)
    return {
        "node_hours": sum(u.node_hours for u in items),
        "gpu_hours": sum(u.gpu_hours for u in items),
        "cpu_eff": used / held if held else float("nan"),
        "wait_s": max((u.wait_s or 0.0 for u in items), default=0.0),
    }
