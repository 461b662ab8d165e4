"""``hpcdl sweep dashboard NAME`` loaded in a real browser: headless Chromium renders
optuna-dashboard's JavaScript app (``--dump-dom`` after a virtual-time budget) and the test reads
the trial count the app wrote into the page, before and after the study grows. The study is a
sweep's own (its folder and journal, as ``sweep run`` makes them); no job is needed to serve it."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import HPCDL

from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.util import atomic_write_text

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make install installs it)")


def rendered_text(url: str, profile: Path) -> str:
    """The page's visible text once the app has rendered (10 s of virtual time: timers and
    fetches run, the DOM is dumped), tags as ' | '."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = re.sub(r"(?s)<(script|style)[^>]*>.*?</\1>", " ", proc.stdout)
    return re.sub(r"(\s*\|\s*)+", " | ", html.unescape(re.sub(r"<[^>]+>", " | ", page)))


def test_dashboard_shows_the_sweeps_trials_in_a_browser(tmp_path):
    spec = SweepSpec.model_validate({
        "name": "shown", "objective": "tests.helpers.objectives:curve", "trials": 9,
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "resources": {"site": "local"},
    })  # fmt: skip
    sweep = Sweep(spec)
    sweep.paths.slots.mkdir(parents=True)
    atomic_write_text(sweep.paths.spec, spec.model_dump_json())
    sweep.study().optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=5)

    proc = subprocess.Popen([HPCDL, "sweep", "dashboard", "shown"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ)  # fmt: skip
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        match = re.fullmatch(
            r"dashboard of sweep shown: (http://127\.0\.0\.1:(\d+)/)dashboard/\?token=(\S+)\n",
            lines[0],
        )
        assert match, (lines, proc.stderr.read() if proc.poll() is not None else "")
        url, port, token = match.groups()
        assert re.fullmatch(rf"from your machine: ssh -N -L {port}:localhost:{port} \S+@\S+\n",
                            lines[1]), lines  # fmt: skip
        assert lines[2] == f"  then open http://localhost:{port}/dashboard/?token={token}\n"
        # the sweep's journal holds one study, id 0; the page names it
        trials = f"{url}dashboard/studies/0/trials?token={token}"
        page = rendered_text(trials, tmp_path / "chromium")
        assert "| shown (id=0) |" in page and "| 5 Trials |" in page, page[:2000]
        sweep.study().optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)  # it runs on
        time.sleep(2.1)  # optuna-dashboard keeps a study's trials 2 s (under 100 trials)
        assert "| 7 Trials |" in rendered_text(trials, tmp_path / "chromium")
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "dashboard stopped" in out, (out, err)
