"""``hpcdl sweep dashboard NAME``'s server loaded in a real browser: headless Chromium renders
optuna-dashboard's JavaScript app (``--dump-dom`` after a virtual-time budget) and the test reads
the trial count the app wrote into the page, before and after the study grows. The study is a
sweep's own (its folder and journal, as ``sweep run`` makes them); no job is needed to serve it."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.dashboard import serve
from hpcdl.util import atomic_write_text

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make cluster installs it)")


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


def _sweep_with_trials(name: str, trials: int, done: int) -> Sweep:
    """A sweep's folder and journal as ``sweep run`` makes them, ``done`` trials in its study
    (no job is needed to serve it)."""
    spec = SweepSpec.model_validate({
        "name": name, "objective": "tests.helpers.objectives:curve", "trials": trials,
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "resources": {"site": "local"},
    })  # fmt: skip
    sweep = Sweep(spec)
    sweep.paths.slots.mkdir(parents=True)
    atomic_write_text(sweep.paths.spec, spec.model_dump_json())
    sweep.study().optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=done)
    return sweep


def test_dashboard_shows_the_sweeps_trials_in_a_browser(tmp_path):
    sweep = _sweep_with_trials("shown", trials=9, done=5)

    with serve(sweep) as served:  # what 'hpcdl sweep dashboard' runs (its lines: unit test)
        # the sweep's journal holds one study, id 0; the page names it
        trials = f"http://127.0.0.1:{served.port}/dashboard/studies/0/trials?token={served.token}"
        page = rendered_text(trials, tmp_path / "chromium")
        assert "| shown (id=0) |" in page and "| 5 Trials |" in page, page[:2000]
        sweep.study().optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)  # it runs on
        time.sleep(2.1)  # optuna-dashboard keeps a study's trials 2 s (under 100 trials)
        assert "| 7 Trials |" in rendered_text(trials, tmp_path / "chromium")


def test_the_dashboard_hpcdl_serve_starts_answers_only_with_its_token(tmp_path, job_root):
    """What ``hpcdl serve dashboard SWEEP`` runs on the compute node (``hpcdl.cli.serve_task``),
    here on this machine: every interface listens (the login node's ``ssh -L`` reaches the node
    by name), so the token is what keeps the cluster's other users off a dashboard that can
    change the study (it served anyone before)."""
    import json
    import os
    import sys
    import urllib.error
    import urllib.request

    _sweep_with_trials("served", trials=3, done=2)
    info = tmp_path / "info.json"
    proc = subprocess.Popen([sys.executable, "-m", "hpcdl.cli.serve_task", "dashboard", str(info),
                             "served", "0"], env={**os.environ})  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not info.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no info file"
            time.sleep(0.1)
        where = json.loads(info.read_text())
        assert len(where["token"]) >= 20 and oct(info.stat().st_mode & 0o777) == "0o600"
        base = f"http://127.0.0.1:{where['port']}"

        def status(path: str) -> int:
            opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,), {"redirect_request": lambda *a, **k: None}))  # fmt: skip
            while True:
                try:
                    return opener.open(base + path, timeout=5).status
                except urllib.error.HTTPError as exc:
                    return exc.code
                except urllib.error.URLError:  # not listening yet
                    assert time.monotonic() < deadline, "the dashboard never answered"
                    time.sleep(0.2)

        assert status("/api/studies") == 403
        assert status(f"/api/studies?token={'x' * len(where['token'])}") == 403
        assert status(f"/dashboard/?token={where['token']}") == 303  # then a cookie
    finally:
        proc.kill()
        proc.wait(timeout=30)
