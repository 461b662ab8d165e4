"""The sweep report's figures, opened: report.png is read back as an image (size, four non-blank
panels of Optuna's plots) and report.html is loaded in headless Chromium (a screenshot with the
figure in it). The study is a sweep's own (folder, journal, slots), filled in-process."""

from __future__ import annotations

import logging
import shutil
import subprocess

import optuna
import pytest
from PIL import Image

from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.folder import Slot
from hpcdl.hpo.report import write_report
from hpcdl.util import atomic_write_text

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _sweep(name: str, trials: int, every: int = 3) -> Sweep:
    """A sweep of ``trials`` trials: every ``every``-th pruned after 2 epochs, the rest complete."""
    spec = SweepSpec.model_validate({
        "name": name, "objective": "tests.helpers.objectives:curve", "trials": trials,
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0},
                  "epochs": {"type": "int", "low": 1, "high": 3}},
        "resources": {"site": "local"},
    })  # fmt: skip
    sweep = Sweep(spec)
    sweep.paths.slots.mkdir(parents=True)
    atomic_write_text(sweep.paths.spec, spec.model_dump_json())
    study = sweep.study()
    for i in range(trials):
        t = study.ask()
        x, epochs = t.suggest_float("x", 0, 1), t.suggest_int("epochs", 1, 3)
        for e in range(1, 4):
            t.report((1 - (x - 0.3) ** 2) * (1 - 0.5**e) + 0.01 * epochs, e)
            if i % every == every - 1 and e == 2:
                break
        pruned = i % every == every - 1
        state = optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE
        value = None if pruned else 1 - (x - 0.3) ** 2
        study.tell(t, value, state=state)
        sweep.paths.write_slot(Slot(slot=i, trial=t.number, params=t.params, run_id=f"r{i}",
                                    state="pruned" if pruned else "complete", value=value))  # fmt: skip
    return sweep


def _busy(image: Image.Image) -> int:
    """Distinct colours in an image (a blank panel has one or two)."""
    return len(image.getcolors(maxcolors=1 << 20) or [])


def test_report_png_holds_four_optuna_panels_and_the_html_loads_in_chromium(tmp_path, caplog):
    sweep = _sweep("reported", 9)
    with caplog.at_level(logging.WARNING, logger="hpcdl"):
        png, page = write_report(sweep, tmp_path / "out")
    assert "left out" not in caplog.text, caplog.text  # all four panels drawn
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (1600, 1000)
    for n in range(4):
        x, y = (n % 2) * 800, (n // 2) * 500
        panel = image.crop((x, y, x + 800, y + 500))
        assert _busy(panel) > 100, f"panel {n} looks blank"
    assert "r0" in page.read_text() and "best: trial" in page.read_text()
    if CHROMIUM is None:
        pytest.skip("no chromium: the HTML was not loaded in a browser")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'c'}",
         "--window-size=1280,900", f"--screenshot={shot}", f"file://{page}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    screen = Image.open(shot).convert("RGB")
    plot_grey = dict((c, n) for n, c in screen.getcolors(1 << 20)).get((229, 229, 229), 0)
    # the figure drawn, not a broken-image icon: Optuna's plots' grey fills a fifth of the page
    assert screen.size == (1280, 900) and plot_grey > 0.2 * 1280 * 900, plot_grey


def test_a_sweep_without_a_completed_trial_still_gets_its_report(tmp_path):
    sweep = _sweep("tiny", 2, every=1)  # every trial pruned: Optuna draws empty panels
    png, page = write_report(sweep, tmp_path / "out")
    assert Image.open(png).size == (1600, 1000)
    assert "no finished trial yet" in page.read_text()
