"""A sweep's report: metric per trial, best-so-far curve, parallel coordinates (PNG + HTML)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from hpcdl.errors import HpcdlError
from hpcdl.hpo.sweep import Sweep
from hpcdl.util import atomic_write_text

_COLORS = {"complete": "tab:blue", "pruned": "tab:orange", "failed": "tab:red"}


def write_report(sweep: Sweep, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` into the sweep folder (or ``out_dir``)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = out_dir or sweep.paths.root
    out_dir.mkdir(parents=True, exist_ok=True)
    if sweep.spec.multi:
        png = _pareto_png(sweep, out_dir)
        page = out_dir / "report.html"
        atomic_write_text(page, _html(sweep, png))
        return png, page
    metric, maximize = sweep.spec.metric, sweep.spec.direction == "maximize"
    slots = sorted((s for s in sweep.slots() if s.state in _COLORS), key=lambda s: s.trial)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8))
    fig.suptitle(f"sweep {sweep.spec.name}: {len(slots)} trials, {metric} ({sweep.spec.direction})")

    trials = sweep.study().trials  # one replay of the journal, not one per slot
    for state, color in _COLORS.items():
        pts = [(s.trial, _last_value(trials[s.trial], s)) for s in slots if s.state == state]
        pts = [(t, v) for t, v in pts if v is not None]
        if pts:
            ax1.scatter(*zip(*pts, strict=True), c=color, label=state, s=28)
    ax1.set(xlabel="trial", ylabel=metric, title=f"{metric} per trial (last reported)")
    ax1.legend()

    done = [(s.trial, s.value) for s in slots if s.state == "complete" and s.value is not None]
    if done:
        best, curve = None, []
        for trial, value in done:
            best = value if best is None or (value > best if maximize else value < best) else best
            curve.append((trial, best))
        ax2.step(*zip(*curve, strict=True), where="post", color="tab:green")
        ax2.scatter(*zip(*done, strict=True), s=12, c="lightgray")
    ax2.set(xlabel="trial", ylabel=metric, title="best so far")

    _parallel_coordinates(
        ax3, sweep, [s for s in slots if s.state == "complete" and s.value is not None]
    )
    fig.tight_layout()
    png = out_dir / "report.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    page = out_dir / "report.html"
    atomic_write_text(page, _html(sweep, png))
    return png, page


def _pareto_png(sweep: Sweep, out_dir: Path) -> Path:
    """Optuna's Pareto-front plot (matplotlib backend) of the first two or three objectives;
    infeasible trials greyed out by Optuna, warm-started ones included as measured."""
    import warnings

    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    spec = sweep.spec
    shown = min(len(spec.metrics), 3)
    directions = [d for d in spec.directions[:shown]]
    with warnings.catch_warnings():  # the plot is "experimental": no warning on every report
        warnings.simplefilter("ignore")
        ax = ovm.plot_pareto_front(
            sweep.study(),
            targets=(lambda t: tuple(t.values[:shown])) if len(spec.metrics) > shown else None,
            target_names=[f"{m} ({d})" for m, d in zip(spec.metrics, directions, strict=False)],
        )
    fig = ax.figure
    assert isinstance(fig, plt.Figure)
    fig.suptitle(f"sweep {spec.name}: Pareto front")
    png = out_dir / "report.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _last_value(trial: Any, slot: Any) -> float | None:
    if slot.value is not None:
        return slot.value
    values = trial.intermediate_values
    return values[max(values)] if values else None


def _parallel_coordinates(ax: Any, sweep: Sweep, slots: list[Any]) -> None:
    import matplotlib.pyplot as plt

    keys = list(sweep.spec.space)
    ax.set_title("parameters (color: metric)")
    if not slots:
        return
    columns = []
    for key in keys:
        raw = [s.params.get(key) for s in slots]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
            log = getattr(sweep.spec.space[key], "type", "") == "loguniform"
            vals = [math.log10(v) if log else float(v) for v in raw]
            label = f"log10 {key}" if log else key
        else:
            cats = sorted({str(v) for v in raw})
            vals = [float(cats.index(str(v))) for v in raw]
            label = f"{key} ({'/'.join(cats)})"
        lo, hi = min(vals), max(vals)
        columns.append(([(v - lo) / (hi - lo) if hi > lo else 0.5 for v in vals], label))
    values = [s.value for s in slots]
    vmin, vmax = min(values), max(values)
    cmap = plt.get_cmap("viridis")
    for i, value in enumerate(values):
        shade = (value - vmin) / (vmax - vmin) if vmax > vmin else 1.0
        ax.plot(range(len(columns)), [c[0][i] for c in columns], color=cmap(shade), alpha=0.8)
    ax.set_xticks(range(len(columns)), [c[1] for c in columns], rotation=20, fontsize=8)
    ax.set_yticks([0, 1], ["min", "max"])
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(vmin, vmax))
    plt.colorbar(sm, ax=ax, label=sweep.spec.metric)


def _html(sweep: Sweep, png: Path) -> str:
    img = base64.b64encode(png.read_bytes()).decode()
    rows = sweep.status()
    head = [
        "slot",
        "trial",
        "state",
        *sweep.spec.metrics,
        *sweep.spec.constraints,
        "epochs",
        "attempts",
        "node",
        "wandb_run",
        "params",
    ]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(k, '')))}</td>" for k in head[:-1])
        + f"<td>{html.escape(', '.join(f'{k}={_fmt(v)}' for k, v in r['params'].items()))}</td></tr>"
        for r in rows
    )  # fmt: skip
    best = _best_line(sweep)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {html.escape(sweep.spec.name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>"
        f"</head><body><h1>sweep {html.escape(sweep.spec.name)}</h1>{best}"
        f"<img src='data:image/png;base64,{img}' style='max-width:100%'>"
        f"<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{body}</table></body></html>"
    )


def _best_line(sweep: Sweep) -> str:
    try:
        b = sweep.best()
    except HpcdlError:
        return "<p>no finished trial yet</p>"
    if "pareto" in b:
        front = ", ".join(str(t["trial"]) for t in b["pareto"])
        return f"<p>{html.escape(f'Pareto front: trial {front}')}</p>"
    metric = sweep.spec.metric
    text = f"best: trial {b['trial']}, {metric}={_fmt(b[metric])}, " + ", ".join(
        f"{k}={_fmt(v)}" for k, v in b["params"].items()
    )
    if "final" in b:
        text += "; final: " + ", ".join(
            f"{k}={_fmt(v)}" for k, v in b["final"].items() if k.startswith("test")
        )
    return f"<p>{html.escape(text)}</p>"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
