"""A sweep's alerts on the dev cluster, received by a real HTTP server on loopback: exactly one
``finished`` for a finished sweep (sent by its final job; a watcher's look after it sends
nothing), exactly one ``stuck`` for a sweep whose final job can never run (sent by ``hpcdl sweep
watch``, however often it looks). The rules themselves: tests/unit/hpo/test_alerts.py."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.lifecycle import final_main

pytestmark = pytest.mark.slurm


class Receiver:
    """A webhook receiver on 127.0.0.1 (the dev cluster's nodes are this machine)."""

    def __init__(self) -> None:
        self.got: list[dict] = []
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook/TOKEN"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def events(self, sweep: str) -> list[str]:
        return [m["event"] for m in self.got if m["sweep"] == sweep]


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """The receiver, and the dev cluster's profile with ``notify:`` pointing at it (a command
    hook appending each alert's JSON to hook.jsonl, Slurm mail asked for) first on the path."""
    rec = Receiver()
    data = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
    hook = tmp_path / "hook.jsonl"
    data["notify"] = {"webhook": rec.url, "mail": True, "timeout_s": 5,
                      "command": ["sh", "-c", f"cat >> {hook}; echo >> {hook}"]}  # fmt: skip
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites/devcluster.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("HPCDL_SITE_PATH", f"{tmp_path / 'sites'}:{REPO / 'hpcdl/sites'}")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no user notify.yaml
    yield rec
    rec.server.shutdown()
    rec.server.server_close()


def spec(name: str, **changes) -> SweepSpec:
    base = {
        "name": name,
        "objective": "tests.helpers.objectives:curve",
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random", "seed": 0},
        "trials": 2,
        "parallelism": 2,
        "resources": {"site": "devcluster", "time": "10m"},
    }
    return SweepSpec.model_validate({**base, **changes})


def _squeue(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True,
                          text=True, timeout=30).stdout.strip()  # fmt: skip


def _wait_for(predicate, timeout: float, what: str, sweep: Sweep) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, (
            f"{what} never happened: {sweep.status()}\nevents: {sweep.lifecycle.events(20)}"
        )
        time.sleep(0.5)


def test_finished_and_failed_sweeps_send_one_alert_each(devcluster, receiver, tmp_path):
    """Two sweeps side by side: one finishes; every trial of the other fails (no retries), so
    its final job finds no completed trial. Each final job sends its alert once; a watcher's
    look afterwards sends nothing more."""
    sweep = Sweep(spec("alerted"))
    failing = Sweep(spec("failing", objective="tests.helpers.objectives:flaky", max_retries=0))
    _array, final, follow = sweep.run()
    *_, failing_follow = failing.run()
    assert "#SBATCH --mail-type=END,FAIL" in Path(final.script).read_text()  # site sends mail
    sweep.wait(timeout=300)
    _wait_for(lambda: receiver.events("alerted"), 60, "the finished alert", sweep)
    _wait_for(lambda: receiver.events("failing"), 300, "the failed alert", failing)
    watched = run_cli("sweep", "watch", "alerted", "--once", timeout=120)
    assert watched.returncode == 0, watched.stderr
    assert "alerted: finished (sent before)" in watched.stdout, watched.stdout
    for job, of in ((follow, sweep), (failing_follow, failing)):
        _wait_for(lambda j=job: not _squeue(j.job_id), 120, "the follow-up job ending", of)
    assert receiver.events("alerted") == ["finished"]  # the final job's, once
    assert receiver.events("failing") == ["failed"]
    msg = next(m for m in receiver.got if m["sweep"] == "alerted")
    assert msg["trials"] == msg["trials_finished"] == 2
    assert msg["result"]["test_acc"] > 0.5 and "best trial" in msg["text"]
    failed = next(m for m in receiver.got if m["sweep"] == "failing")
    assert failed["text"] == "sweep failing: no trial completed" and failed["result"] is None
    hooked = [json.loads(ln) for ln in (tmp_path / "hook.jsonl").read_text().splitlines() if ln]
    assert sorted(m["event"] for m in hooked) == ["failed", "finished"]
    claim = json.loads((sweep.paths.alerts / "finished.json").read_text())
    assert claim["delivered"] == {"webhook": None, "command": None}
    assert failing.paths.notified() == {"failed-round1"}


def test_a_sweep_whose_final_job_can_never_run_sends_one_stuck(devcluster, receiver, monkeypatch):
    """The final job waits ``afterok`` on an array that was cancelled (as sweeps made before
    ``afterany`` had), and no follow-up job is left to replace it: only a watcher can tell."""
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "5")  # the array cannot finish before its scancel
    sweep = Sweep(spec("wedged", parallelism=1))
    array, final, follow = sweep.run()
    subprocess.run(["scancel", final.job_id, follow.job_id], check=True, timeout=30)
    life = sweep.lifecycle
    legacy = life._job(name="sweep-wedged-final", function=final_main,
                       args=(str(sweep.paths.root),),
                       dependencies=[f"afterok:{array.job_id}"]).submit(sweep.site)  # fmt: skip
    life._record("final", legacy, [])
    try:
        subprocess.run(["scancel", array.job_id], check=True, timeout=30)
        _wait_for(lambda: "DependencyNeverSatisfied" in _squeue(legacy.job_id), 120,
                  "DependencyNeverSatisfied", sweep)  # fmt: skip
        first = run_cli("sweep", "watch", "wedged", "--once", timeout=120)
        again = run_cli("sweep", "watch", "wedged", "--once", timeout=120)
    finally:
        subprocess.run(["scancel", legacy.job_id], timeout=30)
    assert first.returncode == 0 and "wedged: stuck (sent):" in first.stdout, first
    assert "wedged: stuck (sent before):" in again.stdout, again
    assert receiver.events("wedged") == ["stuck"]
    [msg] = receiver.got
    assert f"final job {legacy.job_id} can never start (DependencyNeverSatisfied)" in msg["text"]
    assert sweep.paths.notified() == {"stuck-round1"}
