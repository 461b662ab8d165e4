"""``hpcdl.hpo.dashboard.serve`` in-process: optuna-dashboard's JSON API over a sweep's journal on
loopback, and a taken port as one line. The real browser load: tests/cluster/test_sweep_dashboard.py."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request

import pytest

from hpcdl.errors import HpcdlError
from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.dashboard import serve, tunnel_line
from hpcdl.util import atomic_write_text


def _sweep(name: str, trials: int) -> Sweep:
    spec = SweepSpec.model_validate({
        "name": name, "objective": "tests.helpers.objectives:curve", "trials": 9,
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "resources": {"site": "local"},
    })  # fmt: skip
    sweep = Sweep(spec)
    sweep.paths.slots.mkdir(parents=True)
    atomic_write_text(sweep.paths.spec, spec.model_dump_json())
    sweep.study().optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=trials)
    return sweep


def test_serves_the_sweeps_study_on_loopback_only_and_behind_its_token():
    sweep = _sweep("served", 3)
    with serve(sweep) as served:
        base = f"http://127.0.0.1:{served.port}"
        for path in ("/api/studies", "/dashboard/", "/api/studies?token=wrong"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + path, timeout=10)
            assert refused.value.code == 403, path
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with browser.open(base + served.path, timeout=10) as r:  # 303 + cookie, then the page
            assert r.url == f"{base}/dashboard/" and b"Optuna Dashboard" in r.read()
        with browser.open(f"{base}/api/studies", timeout=10) as r:  # the cookie alone
            studies = json.load(r)["study_summaries"]
        with browser.open(f"{base}/api/studies/0", timeout=10) as r:
            trials = json.load(r)["trials"]
        address = socket.gethostbyname(socket.gethostname())
        if not address.startswith("127."):  # bound to 127.0.0.1, not to every address
            with socket.socket() as s:
                assert s.connect_ex((address, served.port)) != 0
    assert [s["study_name"] for s in studies] == ["served"] and len(trials) == 3
    assert tunnel_line(served.port).startswith(f"ssh -N -L {served.port}:localhost:{served.port} ")


def test_a_taken_port_is_one_line():
    sweep = _sweep("busy", 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(HpcdlError) as exc, serve(sweep, port):
            pass
    assert (
        str(exc.value)
        == f"--port {port}: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_the_command_prints_the_url_and_the_tunnel_then_stops_at_ctrl_c(monkeypatch, capsys):
    import time

    from hpcdl.cli import main

    _sweep("typed", 1)

    def interrupt(_seconds: float) -> None:  # Ctrl-C while it serves
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupt)
    assert main(["sweep", "dashboard", "typed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    url, port, token = re.fullmatch(
        r"dashboard of sweep typed: (http://127\.0\.0\.1:(\d+)/dashboard/\?token=(\S+))", lines[0]
    ).groups()  # fmt: skip
    assert re.fullmatch(rf"from your machine: ssh -N -L {port}:localhost:{port} \S+@\S+", lines[1])
    assert lines[2:] == [f"  then open http://localhost:{port}/dashboard/?token={token}",
                         "dashboard stopped"]  # fmt: skip
    with pytest.raises(urllib.error.URLError):  # the server is gone with the command
        urllib.request.urlopen(url, timeout=5)
