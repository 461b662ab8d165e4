"""A sweep's alerts: ``finished``, ``failed`` and ``stuck``, each sent exactly once.

Who sends what, and why:

- ``finished`` and ``failed`` are sent by the sweep's own jobs, the moment they know: the final
  job once it wrote the result (or found no completed trial), the follow-up job when it gives up
  or finds every trial finished with no final model asked for. Nobody has to keep watching.
- ``stuck`` cannot come from the sweep's jobs: a job that can never run sends nothing, and a job
  that runs is not stuck. It comes from a watcher on the login node, ``hpcdl sweep watch NAME``
  (in a terminal, or ``--once`` from cron or scrontab), which also sends ``finished`` when the
  jobs could not (their claim makes a second one impossible).

Exactly once: an alert is claimed under a key (:func:`hpcdl.hpo.decide.alert_key`) by an
exclusive hard link in ``SWEEP/alerts`` (:meth:`SweepPaths.claim_alert`) before it is delivered;
the one claimer delivers, every other caller sees the claim and does nothing. A delivery that
fails (receiver down, timeout) is logged and written into the claim, never retried (a timed-out
POST may well have arrived) and never fails the job that sends it.

Where alerts go: the site profile's ``notify:`` with the user's
``$XDG_CONFIG_HOME/hpcdl/notify.yaml`` (default ``~/.config``) over it (:class:`hpcdl.config.Notify`):
a webhook (JSON POST), a command (argv, the JSON on stdin) and, for the final job, Slurm mail.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from hpcdl.config import parse_time, read_yaml, validate
from hpcdl.hpo.decide import AlertEvent, alert, alert_key, to_send
from hpcdl.hpo.folder import SweepPaths, read_round
from hpcdl.hpo.spec import SweepSpec
from hpcdl.site import SiteProfile
from hpcdl.slurm_options import Notify
from hpcdl.util import get_logger

log = get_logger(__name__)


def user_config() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "hpcdl" / "notify.yaml"


def effective_notify(site: SiteProfile) -> Notify:
    """The site's ``notify`` with the user's file over it (the fields the user sets win)."""
    path = user_config()
    if not path.is_file():
        return site.notify
    mine = validate(Notify, read_yaml(path), str(path))
    return site.notify.model_copy(update={k: getattr(mine, k) for k in mine.model_fields_set})


def mail_fields(site: SiteProfile) -> dict[str, str]:
    """The final job's Slurm mail options where the site delivers mail (else none)."""
    notify = effective_notify(site)
    if not notify.mail:
        return {}
    return {
        "mail_type": "END,FAIL",
        **({"mail_user": notify.mail_user} if notify.mail_user else {}),
    }


def shown_url(url: str) -> str:
    """A webhook URL as logs show it: scheme and host only (the path often is the secret)."""
    scheme, _, rest = url.partition("://")
    host = re.split(r"[/?#]", rest, maxsplit=1)[0].rsplit("@", 1)[-1]  # nor user:password@
    return f"{scheme}://{host}/…"


def post_json(url: str, payload: dict[str, Any], timeout: float) -> str | None:
    """POST ``payload`` as JSON; None when the receiver answered 2xx, else what went wrong."""
    body = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}"
    except Exception as exc:  # an alert never fails its sender
        # e.g. http.client.InvalidURL, whose message quotes the URL (its secret): the type only
        return type(exc).__name__


def run_command(argv: list[str], payload: dict[str, Any], timeout: float) -> str | None:
    """Run the command hook; None when it exited 0, else what went wrong."""
    env = {**os.environ, "HPCDL_ALERT_EVENT": payload["event"],
           "HPCDL_ALERT_SWEEP": payload["sweep"], "HPCDL_ALERT_TEXT": payload["text"]}  # fmt: skip
    try:
        proc = subprocess.run(argv, input=json.dumps(payload), env=env, text=True,
                              capture_output=True, timeout=timeout)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if proc.returncode == 0 else f"exit status {proc.returncode}"


def has_destination(notify: Notify) -> bool:
    """Whether alerts go anywhere hpcdl sends them (Slurm's mail is Slurm's)."""
    return bool(notify.webhook or notify.command)


def deliver(notify: Notify, payload: dict[str, Any]) -> dict[str, str | None]:
    """Send ``payload`` by webhook and command (those configured): each one's error or None."""
    out: dict[str, str | None] = {}
    if notify.webhook:
        out["webhook"] = post_json(notify.webhook, payload, notify.timeout_s)
        where = shown_url(notify.webhook)
        if out["webhook"]:
            log.warning("alert %s of sweep %s: webhook %s: %s", payload["event"],
                        payload["sweep"], where, out["webhook"])  # fmt: skip
    if notify.command:
        out["command"] = run_command(notify.command, payload, notify.timeout_s)
        if out["command"]:
            log.warning("alert %s of sweep %s: command %s: %s", payload["event"],
                        payload["sweep"], notify.command[0], out["command"])  # fmt: skip
    return out


def payload(event: AlertEvent, spec: SweepSpec, paths: SweepPaths, text: str) -> dict[str, Any]:
    slots = paths.all_slots()
    return {
        "event": event,
        "sweep": spec.name,
        "text": text,
        "time": time.time(),
        "host": socket.gethostname(),
        "folder": str(paths.root),
        "trials": spec.trials,
        "trials_finished": sum(s.state in ("complete", "pruned", "failed") for s in slots),
        "result": paths.read_final_result() if event == "finished" else None,
    }


def send(event: AlertEvent, spec: SweepSpec, paths: SweepPaths, site: SiteProfile, text: str,
         notify: Notify | None = None) -> bool:  # fmt: skip
    """Claim and deliver one alert; False when it was claimed already (or is superseded), or
    when no webhook or command is configured: nothing is claimed then, so a watcher whose
    ``notify.yaml`` names one can still send it."""
    key = alert_key(event, read_round(paths.root))
    if not to_send(event, key, paths.notified()):
        return False
    notify = notify or effective_notify(site)
    if not has_destination(notify):
        return False
    record = {"event": event, "text": text, "time": time.time(), "host": socket.gethostname()}
    if not paths.claim_alert(key, record):
        return False  # another job or watcher claimed it first
    results = deliver(notify, payload(event, spec, paths, text))
    paths.update_alert(key, {**record, "delivered": results})
    return True


def send_from_job(event: AlertEvent, paths: SweepPaths, text: str) -> None:
    """:func:`send` from a sweep's job: whatever goes wrong is logged, never raised (an alert
    never fails the job that sends it)."""
    try:
        from hpcdl.site import load_site

        spec = paths.load_spec()
        send(event, spec, paths, load_site(spec.resources.site), text)
    except Exception as exc:
        log.warning("alert %s not sent: %s: %s", event, type(exc).__name__, exc)


def idle_seconds(paths: SweepPaths, now: float) -> float | None:
    """Seconds since the sweep last recorded progress, None before its first record. Progress:
    a slot written (a trial claimed or ended), a worker's journal, an event, or a file in a
    running trial's folder (its epochs' metrics): a long trial that reports is not idle."""
    slots = paths.all_slots()
    files = [*paths.slots.glob("*.json"), *paths.workers.glob("*.jsonl"), paths.events]
    for slot in (s for s in slots if s.state == "running"):
        folder = paths.trial_dir(slot)
        files += [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
    times = [p.stat().st_mtime for p in files if p.exists()]
    return now - max(times) if times else None


def check(
    sweep: Any, stuck_after: str | None = None, now: float | None = None
) -> tuple[str | None, bool, str]:
    """One look at ``sweep`` (an :class:`hpcdl.hpo.Sweep`) from the login node: which alert its
    state calls for, whether this call sent it, and why."""
    spec, paths, life = sweep.spec, sweep.paths, sweep.lifecycle
    notify = effective_notify(sweep.site)
    limit = stuck_after or notify.stuck_after
    limit_s = None if limit is None else (parse_time(limit) or 0) * 60
    jobs = life.jobs()
    finished = paths.finished(spec)
    blocked = [] if finished else life.diagnose(jobs)
    live = any(j.live for j in jobs)
    idle = idle_seconds(paths, now or time.time())
    event = alert(finished, False, blocked, live, idle, limit_s)
    if event is None:
        return None, False, "nothing to report"
    if event == "finished":
        text = f"sweep {spec.name} finished"
    elif blocked:
        text = "; ".join(blocked)
    else:
        text = (f"no progress for {idle:.0f} s (stuck_after {limit}) while its jobs are queued "
                "or running: no trial claimed or ended, no epoch reported")  # fmt: skip
    return event, send(event, spec, paths, sweep.site, text, notify), text
