"""Shared fixtures: an isolated job root per test, the dev cluster once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HPCDL = str(Path(sys.executable).parent / "hpcdl")
sys.path.insert(0, str(REPO))  # `tests.helpers` importable here and (via PYTHONPATH) in jobs
REPORT = str(REPO / "tests/helpers/report.py")
# Values that would execute or split if they ever went through a shell.
WEIRD = [
    "two words",
    'it\'s "quoted"',
    "$(touch /tmp/pwned-hpcdl)",
    "`id`",
    "line1\nline2",
    "*",
    ";ls",
]


@pytest.fixture(autouse=True)
def job_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own job root and registry, and sees only the repo's site profiles."""
    root = tmp_path / "jobs"
    monkeypatch.setenv("HPCDL_JOB_ROOT", str(root))
    monkeypatch.setenv("HPCDL_SITE_PATH", str(REPO / "site"))
    monkeypatch.delenv("HPCDL_SITE", raising=False)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    return root


@pytest.fixture(scope="session")
def devcluster() -> str:
    """Start (idempotently) the project's Slurm cluster; fail with the script's output if it can't."""
    if not os.environ.get("HPCDL_CLUSTER_STARTED"):
        proc = subprocess.run(
            [str(REPO / "slurm/devcluster/devcluster.sh"), "up"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            pytest.fail(f"devcluster up failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return "devcluster"


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
):
    """Run ``hpcdl ARGS`` in a fresh process."""
    return subprocess.run(
        [HPCDL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def sacct(job_id: str) -> list[dict[str, str]]:
    """One row per allocation (array tasks included) with start/end times."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State,Start,End,NodeList", "-j", job_id],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    keys = ["id", "state", "start", "end", "nodes"]
    return [dict(zip(keys, line.split("|"), strict=True)) for line in out.splitlines()]


def sacct_finished(job_id: str, count: int, timeout: float = 60) -> list[dict[str, str]]:
    """sacct rows once all ``count`` allocations have an end time (accounting lags a little)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = sacct(job_id)
        if len(rows) >= count and all(r["end"] not in {"Unknown", "None"} for r in rows):
            return rows
        assert time.monotonic() < deadline, f"sacct never showed {count} finished rows: {rows}"
        time.sleep(1)
