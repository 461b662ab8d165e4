"""Fail if root submitted cluster jobs since a time: ``make test`` runs this after its root phase.

    python tests/root_jobs.py --since 2026-12-07T02:30:00 [--allow-prefix root-test-]

``make test`` submits every cluster job as the unprivileged hpcdl-alice (its as-user phase runs
pytest as that user, so a job there cannot be root's). Its root phase runs the tests that need no
cluster and those marked ``root`` (the dev cluster's own script, tests that switch users), which
submit as a user through the ``AsUser`` fixture. A test added there that submits as root would go
unseen (the job runs, the test passes): this check lists root's jobs submitted at or after
``--since`` and exits 1 with one line naming them. Jobs whose name starts with
``--allow-prefix`` (``root-test-``) are allowed: a root test that must submit as root names its
jobs so; none does but the check's own test. ``--allow-prefix ''`` allows none.

Both sources are read: ``squeue -t all`` (what the controller holds: the last MinJobAge, 300 s)
and ``sacct`` (every job slurmdbd recorded, which may lag the controller by a moment).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timedelta

ALLOW_PREFIX = "root-test-"
# Every state sacct accounts (22.05). Without -s it selects jobs by their eligible time, and a
# job held and cancelled before it ran (EligibleTime Unknown) was missed (seen here).
STATES = "BF,CA,CD,DL,F,NF,OOM,PD,PR,R,RQ,RS,RV,S,TO"
TIMEOUT_S = 30


def _rows(cmd: list[str]) -> list[list[str]]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise OSError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.strip()}")
    return [line.split("|", 3) for line in proc.stdout.splitlines() if line.strip()]


def root_jobs(since: datetime) -> dict[str, tuple[str, str, str]]:
    """{job id: (name, submit time, state)} of root's jobs submitted at or after ``since``."""
    start = since.strftime("%Y-%m-%dT%H:%M:%S")
    # -E: sacct refuses a start after its end ("now" is, within the second of --since)
    end = (max(since, datetime.now()) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    acct = _rows(["sacct", "-X", "-n", "-P", "-u", "root", "-S", start, "-E", end, "-s", STATES,
                  "-o", "JobID,Submit,State,JobName"])  # fmt: skip
    queue = _rows(["squeue", "-h", "-t", "all", "-u", "root", "-o", "%i|%V|%T|%j"])
    jobs: dict[str, tuple[str, str, str]] = {}
    # the controller's first: right after a job, slurmdbd may still name it "allocation"
    for job_id, submit, state, name in queue + acct:
        try:
            submitted = datetime.fromisoformat(submit)
        except ValueError:  # "Unknown": never submitted
            continue
        # sacct -S selects jobs *running* after START, which includes older ones
        if submitted >= since:
            jobs.setdefault(job_id, (name, submit, state.split()[0]))
    return jobs


def still_roots(job_ids: list[str], settle_s: float = 5.0, rounds: int = 3) -> set[str]:
    """Of ``job_ids``, those Slurm still gives to root after a settle: slurmdbd may record a
    job it has just heard of as root's "allocation" before its real user and name arrive (seen:
    an hpcdl-alice job listed by ``sacct -u root`` as ``allocation`` a second after it ended)."""
    left = set(job_ids)
    for _ in range(rounds):
        if not left:
            break
        time.sleep(settle_s)
        rows = _rows(["sacct", "-X", "-n", "-P", "-j", ",".join(sorted(left)),
                      "-o", "JobID,User,JobName,State"])  # fmt: skip
        users = {row[0]: row[1] for row in rows if len(row) > 1}
        left = {job_id for job_id in left if users.get(job_id, "root") == "root"}
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--since", required=True, type=datetime.fromisoformat,
                        help="local time, YYYY-MM-DDTHH:MM:SS (date +%%Y-%%m-%%dT%%H:%%M:%%S)")  # fmt: skip
    parser.add_argument("--allow-prefix", default=ALLOW_PREFIX,
                        help=f"job names allowed to be root's (default {ALLOW_PREFIX}; '' none)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        jobs = root_jobs(args.since)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"error: root_jobs: cannot list root's jobs (sacct, squeue): {exc}", file=sys.stderr)
        return 2
    stray = {
        job_id: job
        for job_id, job in jobs.items()
        if not (args.allow_prefix and job[0].startswith(args.allow_prefix))
    }
    if stray:
        try:
            confirmed = still_roots(list(stray))
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"error: root_jobs: cannot read the jobs' users (sacct): {exc}", file=sys.stderr)
            return 2
        stray = {job_id: job for job_id, job in stray.items() if job_id in confirmed}
    if not stray:
        return 0
    listed = ", ".join(f"{job_id} {name} ({state})" for job_id, (name, _, state) in stray.items())
    print(
        f"error: root submitted {len(stray)} cluster job(s) since {args.since:%Y-%m-%dT%H:%M:%S}: "
        f"{listed}; every cluster job of make test is submitted by an unprivileged user (mark "
        "the test slurm and not root, and it runs as hpcdl-alice, or submit through the AsUser "
        "fixture)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
