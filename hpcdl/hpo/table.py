"""``hpcdl sweep status`` as plain text that fits the terminal without cutting a cell.

Parameters get short headers (the last part of their dotted path, ``wd`` for ``weight_decay``)
with a legend; when the columns do not fit the width, the table continues below in blocks that
repeat the ``slot`` column. ``wide`` shows full names, node, W&B run and the last error.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hpcdl.hpo.budget import budget_line

if TYPE_CHECKING:
    from hpcdl.hpo.lifecycle import SweepJob
    from hpcdl.hpo.sweep import Sweep

GAP = "  "


def short_names(keys: list[str]) -> dict[str, str]:
    """``optimizer.weight_decay`` → ``wd``, ``model.dropout`` → ``dropout``: unique, readable."""
    out: dict[str, str] = {}
    for key in keys:
        last = key.rsplit(".", 1)[-1]
        parts = [p for p in last.split("_") if p]
        short = "".join(p[0] for p in parts) if len(last) > 10 and len(parts) > 1 else last[:10]
        base, n = short, 2
        while short in out.values():
            short, n = f"{base}{n}", n + 1
        out[key] = short
    return out


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def grid(headers: list[str], rows: list[list[str]], width: int, keep: int = 1) -> list[str]:
    """Aligned columns; the columns after the first ``keep`` are split into blocks that each
    fit ``width`` (a lone column wider than that is shown whole, never cut)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fixed = sum(widths[:keep]) + len(GAP) * keep
    blocks: list[list[int]] = [[]]
    used = fixed
    for i in range(keep, len(headers)):
        if blocks[-1] and used + widths[i] > width:
            blocks.append([])
            used = fixed
        blocks[-1].append(i)
        used += widths[i] + len(GAP)
    lines: list[str] = []
    for b, block in enumerate(blocks):
        cols = list(range(keep)) + block
        if b:
            lines.append("")
        for row in [headers, *rows]:
            cells = [row[i].ljust(widths[i]) if i < len(row) else "" for i in cols]
            lines.append(GAP.join(cells).rstrip())
    return lines


def ended_tasks(jobs: list[SweepJob]) -> dict[str, str]:
    """``{task: state}`` of the sweep's tasks that have ended, by Slurm task id and, for local
    workers, by process id (what a slot's ``job`` holds)."""
    from hpcdl.scheduler import FINISHED

    out: dict[str, str] = {}
    for j in jobs:
        local = j.handle.local_ids or []
        for i, (task, status) in enumerate(j.tasks.items()):
            if status.state in FINISHED:
                out[task] = status.state
                if i < len(local):
                    out[str(local[i])] = status.state
    return out


def shown_rows(sweep: Sweep, jobs: list[SweepJob]) -> list[dict[str, Any]]:
    """``sweep.status()`` with a "running" slot whose task has ended (``sweep cancel``, a killed
    worker) shown as ``cancelled`` or ``stopped``: it runs again on ``sweep resume``."""
    ended = ended_tasks(jobs)
    rows = sweep.status()
    for r in rows:
        task = (r.get("job") or "").split("+")[0]  # a packed lane's claim: TASK+LANE
        if r["state"] == "running" and task in ended:
            r["state"] = "cancelled" if ended[task] == "CANCELLED" else "stopped"
    return rows


def trial_table(
    sweep: Sweep, width: int, wide: bool, rows_in: list[dict[str, Any]] | None = None
) -> list[str]:
    spec = sweep.spec
    keys = list(spec.space)
    names = {k: k for k in keys} if wide else short_names(keys)
    recorded = [*spec.metrics, *spec.constraints]  # objectives, then constraints (<= 0)
    headers = ["slot", "trial", "state", *recorded, "epochs", "tries"]
    headers += [names[k] for k in keys]
    if wide:
        headers += ["node", "W&B run", "error"]
    rows = []
    for r in sweep.status() if rows_in is None else rows_in:
        row = [str(r["slot"]), fmt(r["trial"]), r["state"], *(fmt(r.get(m), 4) for m in recorded)]
        row += [str(r["epochs"]), str(r["attempts"])]
        row += [fmt(r["params"].get(k)) for k in keys]
        if wide:
            row += [r["node"] or "-", r["wandb_run"] or "-", r["error"] or "-"]
        rows.append(row)
    lines = grid(headers, rows, width)
    legend = [f"{names[k]} = {k}" for k in keys if names[k] != k]
    return lines + pack("parameters:", legend, width)


def pack(title: str, items: list[str], width: int) -> list[str]:
    """``title item, item, ...`` over as many lines as needed, never splitting an item."""
    if not items:
        return []
    lines, line = [], title
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if len(line) + 1 + len(piece) > width and line.strip():
            lines.append(line)
            line = "  " + piece
        else:
            line = f"{line} {piece}"
    return [*lines, line]


def job_lines(jobs: list[SweepJob], width: int) -> list[str]:
    """One line per job: kind, id, state (array tasks counted per state), pending reasons."""
    lines = []
    for j in jobs:
        counts: dict[str, int] = {}
        for status in j.tasks.values():
            counts[status.state] = counts.get(status.state, 0) + 1
        if j.handle.array:
            state = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        else:
            state = j.state
        if j.reasons:
            state += f" (reason: {', '.join(j.reasons)})"
        lines += wrap(f"{j.kind:<7} {j.handle.job_id:<9} {state}", width, indent=18)
    return lines


def wrap(text: str, width: int, indent: int = 2) -> list[str]:
    if width <= 0 or len(text) <= width:
        return [text]
    return textwrap.wrap(
        text, width, subsequent_indent=" " * indent, break_long_words=False, break_on_hyphens=False
    )


def status_text(sweep: Sweep, width: int, wide: bool, color: Callable[[str], str]) -> list[str]:
    """The whole ``sweep status`` page; ``color`` styles a trial state word (after padding)."""
    with sweep.paths.one_read():  # the slot files read once for the whole page
        return _status_text(sweep, width, wide, color)


def _status_text(sweep: Sweep, width: int, wide: bool, color: Callable[[str], str]) -> list[str]:
    spec = sweep.spec
    width = 10**6 if wide else width
    goals = ", ".join(f"{m} ({d})" for m, d in zip(spec.metrics, spec.directions, strict=True))
    limits = "".join(f", {c} <= 0" for c in spec.constraints)
    lines = wrap(
        f"sweep {spec.name} ({sweep.site.name}): {spec.trials} trials, {spec.parallelism} at a "
        f"time, {goals}{limits}",
        width,
    )
    jobs = sweep.jobs()
    rows = shown_rows(sweep, jobs)
    lines += ["", *trial_table(sweep, width, wide, rows)]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines += ["", ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))]
    if spec.multi:
        lines += wrap(_front_line(sweep), width)
    spending = budget_line(sweep.paths, spec)
    lines += wrap(spending, width) if spending else []
    if jobs:
        lines += ["", "jobs:", *job_lines(jobs, width)]
    stuck = sweep.lifecycle.diagnose(jobs)
    for problem in stuck:
        lines += wrap(f"stuck: {problem}", width)
    if not stuck and sweep.finished():
        lines.append("finished")
    events = sweep.lifecycle.events(3)
    if events:
        lines += ["", "last decisions:"]
        for e in events:
            lines += wrap(f"  {e['who']} ({e['job'] or '-'}): {e['text']}", width, indent=4)
    return [_colored(line, color) for line in lines]


def _front_line(sweep: Sweep) -> str:
    from hpcdl.errors import HpcdlError

    try:
        front = sweep.best()["pareto"]
    except HpcdlError:
        return "Pareto front: no trial complete yet"
    return "Pareto front: trial " + ", ".join(str(t["trial"]) for t in front)


def _colored(line: str, color: Callable[[str], str]) -> str:
    for state in ("complete", "running", "pruned", "failed", "retry", "pending", "cancelled",
                  "stopped"):  # fmt: skip
        token = f"{GAP}{state}{GAP}"
        if token in line:
            return line.replace(token, f"{GAP}{color(state)}{GAP}", 1)
    return line
