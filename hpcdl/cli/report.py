"""``hpcdl report JOB|SWEEP`` and ``hpcdl status --efficiency``: what jobs and sweeps held and
used, from Slurm's accounting (tables at 80 columns, and a PNG figure).

The figures and their meaning: :mod:`hpcdl.scheduler.efficiency` (a job's) and
:mod:`hpcdl.hpo.cost` (a sweep's); the docs page is docs/cost.md. ``hpcdl sweep report`` is the
sweep's *results* (metric per trial, parameters); this is its *cost*, written beside it as
``cost.png`` so that neither overwrites the other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from hpcdl.errors import HpcdlError

WIDTH = 80
_JOB_ID = re.compile(r"^\d+(_\d+)?$")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _size(n: int | None) -> str:
    """Bytes in at most 5 characters: ``1.06G``, ``64M``, ``2T``."""
    if n is None:
        return "-"
    for unit, factor in (("T", 2**40), ("G", 2**30), ("M", 2**20)):
        if n >= factor:
            v = n / factor
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n / 2**10:.0f}K"


def _dur(seconds: float | None) -> str:
    """``m:ss`` under an hour, ``XhYY`` under 100 hours, else days (at most 5 characters)."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 3600:
        return f"{s // 60}:{s % 60:02d}"
    if s < 100 * 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}"
    return f"{s / 86400:.0f}d"


def _hours(h: float | None) -> str:
    """Three significant digits (a toy sweep's trials cost thousandths of a node-hour)."""
    if h is None:
        return "-"
    return f"{h:.3g}" if h < 10 else f"{h:.1f}" if h < 1000 else f"{h:.0f}"


def _cell_hours(h: float) -> str:
    """At most 6 characters, for the usage table's cells."""
    if h == 0:
        return "0"
    if h < 0.001:
        return "<0.001"
    return f"{h:.3f}" if h < 1 else f"{h:.2f}" if h < 10 else f"{h:.1f}" if h < 1000 else f"{h:.0f}"


def usage_table(items: list[Any]) -> Any:
    """One row per allocation: state, queue wait, run time, CPU efficiency, peak memory of the
    request, GPU use, node- and GPU-hours; fits 80 columns up to 12-character task ids."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, collapse_padding=True)
    for col in ("task", "state", "wait", "ran", "CPU", "mem/req", "GPU", "node-h", "GPU-h"):
        table.add_column(col, justify="left" if col in ("task", "state") else "right",
                         no_wrap=True)  # fmt: skip
    for u in items:
        mem = f"{_size(u.mem_peak)}/{_size(u.mem_req)}" if u.mem_req else _size(u.mem_peak)
        # the whole id, never cut: it is what the user types next
        gpu = "-" if u.gpu_util is None else f"{u.gpu_util:.0f}%"
        table.add_row(Text(u.task), Text(u.state[:10]), _dur(u.wait_s), _dur(u.elapsed_s),
                      _pct(u.cpu_eff), mem, gpu, _cell_hours(u.node_hours),
                      _cell_hours(u.gpu_hours) if u.gpus else "-")  # fmt: skip
    return table


def efficiency_rows(handles: list[Any]) -> tuple[list[Any], list[str]]:
    """sacct's usage of these jobs (one call), and a note per job it cannot say anything of."""
    from hpcdl.scheduler.accounting import job_usage

    notes = [f"{h.job_id}: ran on the local profile, no Slurm accounting" for h in handles
             if h.scheduler != "slurm"]  # fmt: skip
    ids = [p for h in handles if h.scheduler == "slurm"
           for p in ([x.job_id for x in h.parts] or [h.job_id])]  # fmt: skip
    return (job_usage(ids) if ids else []), notes


def efficiency_status(console: Any, job_id: str | None, last: int) -> None:
    """``hpcdl status --efficiency [JOB]``: the usage table of one job or the recent ones."""
    from hpcdl.scheduler import find_handle, recent_handles

    handles = [find_handle(job_id)] if job_id else recent_handles(last)
    items, notes = efficiency_rows(handles)
    if items:
        console.print(usage_table(items), markup=False)
    for note in notes:
        console.print(f"note: {note}", markup=False)
    if not items and not notes:
        console.print("no jobs yet (submit one with 'hpcdl submit')")


def job_figure(items: list[Any], title: str, path: Path) -> Path:
    """CPU efficiency and peak memory of the request per allocation, as bars (PNG)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(items) + 3), 4))
    xs = range(len(items))
    ax.bar([x - 0.2 for x in xs], [100 * (u.cpu_eff or 0) for u in items], 0.4, label="CPU")
    ax.bar([x + 0.2 for x in xs], [100 * (u.mem_eff or 0) for u in items], 0.4,
           label="peak memory of request")  # fmt: skip
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [u.task for u in items], rotation=45 if len(items) > 6 else 0)
    ax.set(ylabel="% of what was held", title=title, ylim=(0, 125))
    ax.legend(loc="upper right")
    return _save(fig, path)


def sweep_figure(cost: Any, name: str, path: Path, budget: float | None = None) -> Path:
    """Cost per trial (bars by state) and cumulative cost in end order, the best marked."""
    plt = _pyplot()
    colors = {"complete": "tab:blue", "pruned": "tab:orange", "failed": "tab:red"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    fig.suptitle(f"sweep {name}: what it cost ({cost.unit})")
    from matplotlib.patches import Patch

    for t in cost.trials:
        ax1.bar(t.trial, t.hours, color=colors.get(t.state, "tab:grey"))
    seen = sorted({t.state for t in cost.trials})
    ax1.legend(handles=[Patch(color=colors.get(st, "tab:grey"), label=st) for st in seen])
    ax1.xaxis.get_major_locator().set_params(integer=True)
    ax1.set(xlabel="trial", ylabel=cost.unit, title="cost per trial")
    done = sorted((t for t in cost.trials if t.ended is not None), key=lambda t: t.ended or 0)
    total, xs, ys = 0.0, [], []
    for t in done:
        total += t.hours
        xs.append((t.ended or 0) - (done[0].ended or 0))
        ys.append(total)
        if t.trial == cost.best_trial:
            ax2.plot([xs[-1]], [total], "r*", ms=14, label=f"best: trial {t.trial}")
    ax2.step(xs, ys, where="post", color="tab:blue")
    if budget is not None:
        ax2.axhline(budget, color="tab:red", ls="--", lw=1, label=f"budget {budget:.3g}")
    ax2.set(xlabel="seconds since the first trial ended", ylabel=f"{cost.unit}, cumulative",
            title="spent as trials ended")  # fmt: skip
    if cost.best_trial is not None or budget is not None:
        ax2.legend()
    return _save(fig, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")  # nothing half-written under the real name
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    _pyplot().close(fig)
    return path


def sweep_lines(cost: Any) -> list[str]:
    """The sweep's figures as lines (each under 80 columns)."""
    u = cost.unit
    best = f" (trial {cost.best_trial})" if cost.best_trial is not None else ""
    lines = [
        f"trials: {len(cost.trials)} sampled, {_hours(cost.used)} {u} of trial time",
        f"cost per finished trial: {_hours(cost.per_trial)} {u}",
        f"cost to reach the best{best}: {_hours(cost.to_best)} {u}",
        f"pruning saved (estimate): {_hours(cost.pruning_saved)} {u}",
    ]
    if cost.held is None:
        lines.append("held (sacct): - (no Slurm accounting: local profile)")
    else:
        lines += [f"held by trial jobs (sacct): {_hours(cost.held)} {u}",
                  f"idle slot time: {_hours(cost.idle)} {u}",
                  f"final and follow-up jobs (sacct): {_hours(cost.other)} {u}"]  # fmt: skip
    return lines


def trial_table(cost: Any) -> Any:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("slot", "trial", "state", "value", cost.unit):
        table.add_column(col, justify="left" if col == "state" else "right")
    for t in cost.trials:
        value = "-" if t.value is None else f"{t.value:.4g}"
        table.add_row(str(t.slot), str(t.trial), t.state, value, _hours(t.hours))
    return table


@click.command()
@click.argument("target")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Folder for the figure (default: the job's or sweep's).")  # fmt: skip
@click.option("--no-figure", is_flag=True, help="Only the table.")
def report(target: str, output: Path | None, no_figure: bool) -> None:
    """What JOB (an id) or SWEEP (a name) held and used: CPU efficiency, peak memory of the
    request, GPU use where gathered, queue wait, node- and GPU-hours; for a sweep also cost per
    trial, to reach the best, what pruning saved and idle slot time. Figures from sacct."""
    from rich.console import Console

    console = Console(width=WIDTH)
    if _JOB_ID.match(target):
        _job_report(console, target, output, no_figure)
    else:
        _sweep_report(console, target, output, no_figure)


def _job_report(console: Any, job_id: str, output: Path | None, no_figure: bool) -> None:
    from hpcdl.scheduler import find_handle

    handle = find_handle(job_id)
    items, notes = efficiency_rows([handle])
    if notes:
        raise HpcdlError(notes[0])
    if "_" in job_id:
        items = [u for u in items if u.task == job_id]
    if not items:
        raise HpcdlError(f"sacct knows nothing of job {job_id} yet")
    console.print(f"job {handle.job_id} {handle.name} ({handle.site})", markup=False)
    console.print(usage_table(items), markup=False)
    if not no_figure:
        png = job_figure(items, f"job {job_id} {handle.name}", (output or Path(handle.folder))
                         / f"efficiency-{job_id}.png")  # fmt: skip
        click.echo(f"figure: {png}")


def _sweep_report(console: Any, name: str, output: Path | None, no_figure: bool) -> None:
    from hpcdl.hpo import Sweep
    from hpcdl.hpo.cost import sweep_cost

    sweep = Sweep.load(name)
    cost = sweep_cost(sweep)
    console.print(trial_table(cost), markup=False)
    for line in sweep_lines(cost):
        console.print(line, markup=False)
    if not no_figure:
        b = sweep.spec.budget
        png = sweep_figure(cost, name, (output or sweep.paths.root) / "cost.png",
                           b.hours if b and b.unit == cost.unit else None)  # fmt: skip
        click.echo(f"figure: {png}")


def register(cli: click.Group) -> None:
    cli.add_command(report)
