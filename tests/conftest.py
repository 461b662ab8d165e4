"""Shared fixtures: an isolated job root per test, the dev cluster once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
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
    monkeypatch.setenv("HPCDL_SITE_PATH", str(REPO / "hpcdl/sites"))
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


def one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    """The CLI's answer to bad input: exit status 2 and one ``error: ...`` line on stderr, no
    traceback anywhere; returns that line."""
    out = capsys.readouterr()
    assert rc == 2, out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in out.err + out.out
    return lines[0]


def sacct(job_id: str) -> list[dict[str, str]]:
    """One row per allocation (array tasks included) with start/end times."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State,Start,End,NodeList", "-j", job_id],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    keys = ["id", "state", "start", "end", "nodes"]
    return [dict(zip(keys, line.split("|"), strict=True)) for line in out.splitlines()]


def release_requeued(job_id: str, *extra: str) -> bool:
    """Start a job Slurm requeued (held ~2 minutes: reason ``BeginTime``) in 3 s; ``extra`` are
    more ``scontrol update`` fields. Not "now": a start in the second of the requeue gets a
    credential slurmd still counts as revoked ("Job credential revoked"), and the job fails.
    A start already moved near (less than 10 s away) is left alone, so calling this in a polling
    loop does not push it back. True when it moved the start."""
    out = subprocess.run(["squeue", "-h", "-o", "%r|%S", "-j", job_id], capture_output=True,
                         text=True, timeout=30).stdout.strip()  # fmt: skip
    reason, _, start = out.partition("|")
    if reason != "BeginTime":
        return False
    try:
        wait = datetime.fromisoformat(start).timestamp() - time.time()
    except ValueError:
        wait = float("inf")
    if wait < 10:
        return False
    proc = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3", *extra],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    if "no longer pending" in proc.stderr:  # it started between squeue and scontrol
        return False
    assert proc.returncode == 0, f"scontrol update {job_id}: {proc.stderr}"
    return True


def sacct_finished(job_id: str, count: int, timeout: float = 60) -> list[dict[str, str]]:
    """sacct rows once all ``count`` allocations have an end time (accounting lags a little)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = sacct(job_id)
        if len(rows) >= count and all(r["end"] not in {"Unknown", "None"} for r in rows):
            return rows
        assert time.monotonic() < deadline, f"sacct never showed {count} finished rows: {rows}"
        time.sleep(1)


# -- single-process trainings (world size 1, gloo), shared by the trainer, export and
# preemption test modules -------------------------------------------------------------------
def release_deepspeed_groups() -> None:
    """Forget the process groups DeepSpeed cached (its clone of the world group...): after
    ``dist.destroy_process_group`` they are dead, and the next module's engine would use them
    ("Group ... is not registered"). ``deepspeed.comm.destroy_process_group`` does this too."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups._release_process_group_references()


@pytest.fixture(scope="module")
def world1() -> Iterator[None]:
    """One rank in this process (gloo), as the trainer unit tests have it; DeepSpeed's cached
    groups are released before (another module may have left them) and after."""
    import socket

    import torch
    import torch.distributed as dist

    release_deepspeed_groups()
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("SLURM_", "SUBMITIT_", "PMI", "OMPI_", "PMIX_", "MPI_")):
                mp.delenv(key)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
               "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": "0",
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        for key, value in env.items():
            mp.setenv(key, value)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            if dist.is_initialized():
                dist.destroy_process_group()
            release_deepspeed_groups()


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 learnable 8x8 uint8 samples of 4 classes: 480 train (15 steps of 32), 120 val."""
    from hpcdl.data.sources import SynthSource
    from hpcdl.data.writer import write_shards

    out = tmp_path_factory.mktemp("synth")
    write_shards(SynthSource(600, (1, 8, 8), "uint8", 4), out, val=0.2, chunk_size="1KiB")
    return out
