"""A sweep's report (PNG + HTML): Optuna's own plots of the sweep's study (optimization history,
every trial's reported values, pruned ones included, parallel coordinates, parameter
importances), one figure each, tiled into ``report.png``; the HTML adds the trial table."""

from __future__ import annotations

import base64
import html
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcdl.errors import HpcdlError
from hpcdl.hpo.folder import REPORT_HTML, REPORT_PNG
from hpcdl.hpo.sweep import Sweep
from hpcdl.util import atomic_path, atomic_write_text, get_logger

log = get_logger(__name__)


def write_report(sweep: Sweep, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` into the sweep folder (or ``out_dir``)."""
    out_dir = out_dir or sweep.paths.root
    out_dir.mkdir(parents=True, exist_ok=True)
    if sweep.spec.multi:
        png = _pareto_png(sweep, out_dir)
        page = out_dir / REPORT_HTML
        atomic_write_text(page, _html(sweep, png))
        return png, page
    png = out_dir / REPORT_PNG
    with atomic_path(png) as tmp:
        _tiles(sweep).save(tmp, format="PNG")
    page = out_dir / REPORT_HTML
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
    png = out_dir / REPORT_PNG
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def panels() -> list[tuple[str, Callable[..., Any]]]:
    """Optuna's matplotlib plots the report shows, by title."""
    from optuna.visualization import matplotlib as ov

    return [
        ("optimization history", ov.plot_optimization_history),
        ("reported values per epoch (pruned trials too)", ov.plot_intermediate_values),
        ("parallel coordinates", ov.plot_parallel_coordinate),
        ("parameter importances", ov.plot_param_importances),
    ]


def _tiles(sweep: Sweep) -> Any:
    """The panels rendered one by one (each is its own figure in Optuna) and tiled 2 x 2."""
    import matplotlib
    import optuna

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    study, metric = sweep.study(), sweep.spec.metric
    images = []
    with warnings.catch_warnings():  # optuna.visualization.matplotlib is "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # "too few trials": the figure says it
        for title, plot in panels():
            kwargs = {} if plot.__name__ == "plot_intermediate_values" else {"target_name": metric}
            try:
                ax = plot(study, **kwargs)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            except (ValueError, RuntimeError) as exc:  # e.g. importances need 2 completed trials
                log.warning("sweep %s report: %s left out: %s", sweep.spec.name, title, exc)
                fig, ax = plt.subplots()
                ax.text(0.5, 0.5, f"{title}: not available\n({exc})", ha="center", wrap=True)
                ax.set_axis_off()
            fig.set_size_inches(8, 5)
            fig.suptitle(f"{sweep.spec.name}: {title}", fontsize=10)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            plt.close(fig)
            images.append(Image.open(buf).convert("RGB"))
    w, h = max(i.width for i in images), max(i.height for i in images)
    sheet = Image.new("RGB", (2 * w, 2 * h), "white")
    for n, image in enumerate(images):
        sheet.paste(image, ((n % 2) * w, (n // 2) * h))
    return sheet


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
