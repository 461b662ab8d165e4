"""A sweep's alerts: which one a state calls for and whether it was sent already (tables), the
exactly-once claim, and the webhook against a real HTTP receiver on loopback (a thread, no
process). The wiring on the dev cluster: tests/cluster/test_sweep_alerts.py."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from hpcdl.config import validate
from hpcdl.errors import ConfigError
from hpcdl.hpo import alerts
from hpcdl.hpo.decide import alert, alert_key, to_send
from hpcdl.hpo.folder import SweepPaths
from hpcdl.site import SiteProfile, load_site
from hpcdl.slurm_options import Notify

H = 3600.0
NEVER = ["final job 12 can never start (DependencyNeverSatisfied): 'hpcdl sweep resume s'"]
ALERTS = [
    # (situation, finished, failed, blocked, live, idle_s, stuck_after_s, expected)
    ("running, recent progress", False, False, [], True, 60, H, None),
    ("running, no stuck_after asked", False, False, [], True, 10 * H, None, None),
    ("running, idle past stuck_after", False, False, [], True, 2 * H, H, "stuck"),
    ("idle exactly stuck_after", False, False, [], True, H, H, "stuck"),
    ("idle but nothing queued: diagnose decides", False, False, [], False, 2 * H, H, None),
    ("no record yet (idle unknown)", False, False, [], True, None, H, None),
    ("final job can never start", False, False, NEVER, True, 5, H, "stuck"),
    ("trials missing, no job will run them", False, False, ["2 trial(s) not finished"], False, 5, None, "stuck"),
    ("finished", True, False, [], False, 9 * H, H, "finished"),
    ("finished wins over a stale diagnosis", True, False, NEVER, True, 9 * H, H, "finished"),
    ("gave up (retries used up)", False, True, ["3 trial(s) not finished"], False, 5, H, "failed"),
]  # fmt: skip


@pytest.mark.parametrize("row", ALERTS, ids=[r[0] for r in ALERTS])
def test_alert(row):
    _, finished, failed, blocked, live, idle, after, expected = row
    assert alert(finished, failed, blocked, live, idle, after) == expected


SENDS = [
    # (situation, event, round, notified, send?)
    ("first finished", "finished", 1, set(), True),
    ("finished again (the final job, then the watcher)", "finished", 1, {"finished"}, False),
    ("finished after a stuck of round 1", "finished", 2, {"stuck-round1"}, True),
    ("first stuck of round 1", "stuck", 1, set(), True),
    ("stuck again in round 1", "stuck", 1, {"stuck-round1"}, False),
    ("stuck after a resume (round 2)", "stuck", 2, {"stuck-round1"}, True),
    ("stuck after the same round's failed", "stuck", 1, {"failed-round1"}, False),
    ("stuck in round 2 after round 1 failed", "stuck", 2, {"failed-round1"}, True),
    ("stuck once finished (a late look)", "stuck", 3, {"finished"}, False),
    ("failed once finished", "failed", 1, {"finished"}, False),
    ("failed after a stuck of the same round", "failed", 1, {"stuck-round1"}, True),
]  # fmt: skip


@pytest.mark.parametrize("row", SENDS, ids=[r[0] for r in SENDS])
def test_to_send(row):
    _, event, round_no, notified, expected = row
    assert to_send(event, alert_key(event, round_no), notified) is expected


def test_an_extended_sweep_can_say_finished_again(tmp_path: Path):
    """`sweep extend` archives the `finished` claim: it silenced every later alert of the
    sweep (found in review), the old claim is kept beside the others."""
    paths = SweepPaths(tmp_path)
    assert paths.claim_alert("finished", {"by": 0})
    paths.archive_finished_alert(8)
    assert paths.notified() == set() and (paths.alerts / "finished-8-trials.sent").is_file()
    assert to_send("finished", "finished", paths.notified())
    assert paths.claim_alert("finished", {"by": 1}) and not paths.claim_alert("finished", {})


def test_a_claim_is_won_once_among_racing_claimers(tmp_path: Path):
    paths = SweepPaths(tmp_path)
    wins: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def claimer(i: int) -> None:
        start.wait()
        try:
            if paths.claim_alert("finished", {"by": i}):
                wins.append(i)
        except BaseException as exc:  # every claimer must get an answer, not an exception
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(wins) == 1
    record = json.loads((tmp_path / "alerts/finished.json").read_text())
    assert record == {"by": wins[0]}  # the winner's record, whole
    assert paths.notified() == {"finished"}
    assert [p.name for p in (tmp_path / "alerts").iterdir()] == ["finished.json"]  # no temp left


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T000/B000/SECRETTOKEN", "https://hooks.slack.com/…"),
        ("http://user:pw@example.org:8080/hook?token=x", "http://example.org:8080/…"),
        ("http://127.0.0.1:9/", "http://127.0.0.1:9/…"),
        ("https://example.org?token=SECRET", "https://example.org/…"),
        ("https://example.org#SECRET", "https://example.org/…"),
    ],
)
def test_logs_show_a_webhook_without_its_path_or_credentials(url, shown):
    assert alerts.shown_url(url) == shown


@pytest.mark.parametrize(
    ("notify", "field"),
    [
        ({"webhook": "ftp://example.org/x"}, "notify.webhook"),
        ({"webhook": "http://example.org/a b"}, "notify.webhook"),
        ({"webhook": "https://bot:SECRET@hooks.example.org/x"}, "notify.webhook"),
        ({"timeout_s": 0}, "notify.timeout_s"),
        ({"stuck_after": "soon"}, "notify.stuck_after"),
        ({"command": ["echo", "a\nb"]}, "notify.command.1"),
        ({"webhok": "http://x/"}, "notify.webhok"),
    ],
)
def test_a_bad_notify_section_is_one_line_naming_the_field(notify, field):
    data = {**load_site("local").model_dump(mode="json"), "notify": notify}
    with pytest.raises(ConfigError) as exc:
        validate(SiteProfile, data, "site.yaml")
    assert str(exc.value).startswith(f"site.yaml: {field}: ") and "\n" not in str(exc.value)


def test_the_users_file_overrides_the_sites_fields_it_sets(tmp_path, monkeypatch):
    site = load_site("local").model_copy(
        update={"notify": Notify(mail=True, webhook="http://site.example/h", timeout_s=3)}
    )
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert alerts.effective_notify(site) == site.notify  # no user file
    (tmp_path / "hpcdl").mkdir()
    (tmp_path / "hpcdl/notify.yaml").write_text(
        "webhook: http://mine.example/h\nmail_user: a@b.c\n"
    )
    mine = alerts.effective_notify(site)
    assert (mine.webhook, mine.mail_user, mine.mail, mine.timeout_s) == (
        "http://mine.example/h", "a@b.c", True, 3)  # fmt: skip
    assert alerts.mail_fields(site) == {"mail_type": "END,FAIL", "mail_user": "a@b.c"}
    (tmp_path / "hpcdl/notify.yaml").write_text("webhook: nope\n")
    with pytest.raises(ConfigError, match=r"notify\.yaml: webhook: must be an http"):
        alerts.effective_notify(site)


def test_no_mail_options_where_the_site_sends_no_mail(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert alerts.mail_fields(load_site("devcluster")) == {}


class _Receiver(BaseHTTPRequestHandler):
    got: ClassVar[list[dict]] = []
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).got.append({"path": self.path, "type": self.headers["Content-Type"],
                               "body": json.loads(body)})  # fmt: skip
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Receiver", (_Receiver,), {"got": [], "status": 200})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", handler
    server.shutdown()
    server.server_close()


def test_webhook_posts_json_and_reports_failures_without_raising(receiver, caplog):
    url, handler = receiver
    payload = {"event": "finished", "sweep": "s", "text": "done"}
    assert alerts.post_json(f"{url}/hook/SECRET", payload, 5) is None
    assert handler.got == [{"path": "/hook/SECRET", "type": "application/json", "body": payload}]
    handler.status = 500
    notify = Notify(webhook=f"{url}/hook/SECRET", timeout_s=5)
    with caplog.at_level(logging.WARNING, logger="hpcdl"):
        assert alerts.deliver(notify, payload) == {"webhook": "HTTP 500"}
    assert "HTTP 500" in caplog.text and "SECRET" not in caplog.text


def test_a_url_urllib_cannot_open_is_an_error_without_the_url():
    """urllib fails on user:password@ with http.client.InvalidURL, whose message quotes the
    password; it escaped post_json (neither OSError nor URLError): a traceback with the secret."""
    got = alerts.post_json("https://bot:SECRET@hooks.example.org/x", {}, 2)
    assert got is not None and "SECRET" not in got


def test_webhook_to_a_closed_port_or_a_silent_server_is_an_error_not_a_raise():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert "ConnectionRefusedError" in (
        alerts.post_json(f"http://127.0.0.1:{closed}/", {}, 2) or ""
    )
    with socket.socket() as silent:  # accepts (the backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        err = alerts.post_json(f"http://127.0.0.1:{silent.getsockname()[1]}/", {}, 0.5)
    assert err is not None and "timed out" in err


def test_watch_without_a_destination_is_one_line(tmp_path, monkeypatch, capsys):
    from hpcdl.cli import main
    from hpcdl.hpo import Sweep, SweepSpec
    from hpcdl.util import atomic_write_text

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    spec = SweepSpec.model_validate({
        "name": "quiet", "objective": "tests.helpers.objectives:curve", "trials": 1,
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "resources": {"site": "local"},
    })  # fmt: skip
    sweep = Sweep(spec)
    sweep.paths.slots.mkdir(parents=True)
    atomic_write_text(sweep.paths.spec, spec.model_dump_json())
    assert main(["sweep", "watch", "quiet", "--once"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: no alert destination for sweep quiet: set notify.webhook or "
                   f"notify.command in {tmp_path}/hpcdl/notify.yaml (or the site profile "
                   "'local')\n")  # fmt: skip
    assert not sweep.paths.alerts.exists()  # nothing claimed


def test_an_alert_from_a_job_never_raises(tmp_path, monkeypatch, caplog):
    """The final job's alert to a receiver that is down, or with a broken notify.yaml: logged,
    recorded in the claim, never raised (the job's work stands)."""
    import socket

    from hpcdl.hpo import Sweep, SweepSpec
    from hpcdl.util import atomic_write_text

    spec = SweepSpec.model_validate({
        "name": "down", "objective": "tests.helpers.objectives:curve", "trials": 1,
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "resources": {"site": "local"},
    })  # fmt: skip
    paths = Sweep(spec).paths
    paths.slots.mkdir(parents=True)
    atomic_write_text(paths.spec, spec.model_dump_json())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "hpcdl").mkdir()
    (tmp_path / "hpcdl/notify.yaml").write_text(f"webhook: http://127.0.0.1:{closed}/x/TOKEN\n")
    with caplog.at_level(logging.WARNING, logger="hpcdl"):
        alerts.send_from_job("finished", paths, "sweep down finished")
    claim = json.loads((paths.alerts / "finished.json").read_text())
    assert "ConnectionRefusedError" in claim["delivered"]["webhook"]
    assert "TOKEN" not in caplog.text and "ConnectionRefusedError" in caplog.text
    (paths.alerts / "finished.json").unlink()  # as if it had not been sent
    (tmp_path / "hpcdl/notify.yaml").write_text("webhook: [not, a, url]\n")
    with caplog.at_level(logging.WARNING, logger="hpcdl"):
        alerts.send_from_job("failed", paths, "x")
    assert "alert failed not sent: ConfigError" in caplog.text


def test_idle_counts_a_running_trials_files_as_progress(tmp_path):
    import os

    from hpcdl.hpo.folder import Slot

    paths = SweepPaths(tmp_path)
    assert alerts.idle_seconds(paths, 1000.0) is None  # no record yet
    paths.slots.mkdir()
    slot = Slot(slot=0, trial=0, params={}, run_id="r0")
    paths.write_slot(slot)
    os.utime(paths.slot_file(0), (100, 100))
    assert alerts.idle_seconds(paths, 1000.0) == 900.0
    paths.trial_dir(slot).mkdir(parents=True)
    (paths.trial_dir(slot) / "metrics.jsonl").write_text("{}\n")  # an epoch reported
    os.utime(paths.trial_dir(slot) / "metrics.jsonl", (700, 700))
    assert alerts.idle_seconds(paths, 1000.0) == 300.0
    paths.write_slot(slot.model_copy(update={"state": "complete"}))  # ended: its folder no longer
    os.utime(paths.slot_file(0), (100, 100))
    assert alerts.idle_seconds(paths, 1000.0) == 900.0
