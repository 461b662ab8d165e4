"""A sweep's budget (node- or GPU-hours) and what its trials have spent of it.

Spending is counted on the workers' own clock, in the sweep folder: each ended attempt's claim
and end times (the ``trial`` lines of ``workers/TASK.jsonl``) and, for a slot still running,
the time since its claim (``Slot.claimed_at``), times the trial's nodes (or GPUs). Not sacct:
the decision is taken by a worker about to claim its next trial, under the sweep's lock, and it
cannot wait for accounting that reaches slurmdbd only at a step's end (a warm worker's step ends
after its last trial), nor count on sacct answering from a compute node, nor on sacct at all
(the local profile). What sacct says a sweep held, start-up and idle slots included, is in
``hpcdl report SWEEP`` (:mod:`hpcdl.hpo.cost`).

Once spent, no new trial is sampled: trials already running finish, and a sampled trial that
is retried or requeued still runs (stopping it would waste what it cost). The sweep then counts
as finished when those have; a note ``budget-spent.json`` in the sweep folder says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcdl.hpo.folder import Slot, SweepPaths
from hpcdl.hpo.spec import SweepSpec
from hpcdl.util import atomic_write_text, get_logger, read_jsonl

log = get_logger(__name__)


@dataclass(frozen=True)
class Span:
    """One attempt of a trial on the workers' clock (``ended`` None: still running)."""

    slot: int
    trial: int
    state: str
    claimed: float
    ended: float | None


def spans(journals: dict[str, list[dict[str, Any]]], slots: list[Slot]) -> list[Span]:
    """Every attempt of every trial: the ended ones from the workers' journals, plus the one
    each running slot holds now (its journal line comes at its end)."""
    out = [
        Span(int(e["slot"]), int(e.get("trial", -1)), str(e.get("state", "")),
             float(e["claimed"]), float(e["ended"]))
        for lines in journals.values() for e in lines
        if e.get("event") == "trial" and "claimed" in e and "ended" in e
    ]  # fmt: skip
    out += [
        Span(s.slot, s.trial, "running", s.claimed_at, None)
        for s in slots
        if s.state == "running" and s.claimed_at is not None
    ]
    return out


def span_seconds(span: Span, now: float, limit_s: float) -> float:
    """How long an attempt ran; a running one up to now, but never past the job's time limit:
    a slot left 'running' by a worker that died keeps no node busy."""
    end = span.ended if span.ended is not None else min(now, span.claimed + limit_s)
    return max(0.0, end - span.claimed)


def per_trial(spec: SweepSpec, unit: str) -> int:
    """Nodes (or GPUs) one trial holds."""
    nodes = spec.resources.nodes
    return nodes * spec.resources.gpus_per_node if unit == "GPU-hours" else nodes


def spent_hours(all_spans: list[Span], held: int, now: float, limit_s: float) -> float:
    """Node- (or GPU-) hours of these attempts, each holding ``held`` nodes (or GPUs)."""
    return sum(span_seconds(s, now, limit_s) for s in all_spans) * held / 3600


def read_journals(paths: SweepPaths) -> dict[str, list[dict[str, Any]]]:
    """``{task: journal lines}`` (the workers' module reads them too; it imports this one)."""
    if not paths.workers.is_dir():
        return {}
    return {p.stem: read_jsonl(p) for p in sorted(paths.workers.glob("*.jsonl"))}


def spent(paths: SweepPaths, spec: SweepSpec, unit: str, now: float | None = None) -> float:
    """What the sweep's trials have spent so far, in ``unit``."""
    from hpcdl.config import parse_time

    now = time.time() if now is None else now
    minutes = parse_time(spec.resources.time)
    limit = float("inf") if minutes is None else minutes * 60.0
    held = per_trial(spec, unit)
    return spent_hours(spans(read_journals(paths), paths.all_slots()), held, now, limit)


def refuse_new_trial(paths: SweepPaths, spec: SweepSpec) -> bool:
    """Under the sweep's lock, before a new trial is sampled: True when the budget is spent
    (and the note written once, so the sweep counts as finished without the unsampled slots)."""
    if spec.budget is None:
        return False
    used = spent(paths, spec, spec.budget.unit)
    if used < spec.budget.hours:
        return False
    if not paths.budget_spent.exists():
        note = {"spent": used, "budget": spec.budget.hours, "unit": spec.budget.unit,
                "time": time.time()}  # fmt: skip
        atomic_write_text(paths.budget_spent, json.dumps(note))
        log.info("budget spent (%.3f of %g %s): no new trial", used, spec.budget.hours,
                 spec.budget.unit)  # fmt: skip
    return True


def budget_line(paths: SweepPaths, spec: SweepSpec) -> str | None:
    """``sweep status``'s line: spent and left (None without a budget)."""
    if spec.budget is None:
        return None
    b = spec.budget
    used = spent(paths, spec, b.unit)
    stop = "; sampling stopped" if Path(paths.budget_spent).exists() else ""
    return (f"budget: {used:.3g} of {b.hours:g} {b.unit} spent, "
            f"{max(0.0, b.hours - used):.3g} left{stop}")  # fmt: skip
