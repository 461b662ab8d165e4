"""Arrays over the site's MaxArraySize, split into parts: on the dev cluster."""

from __future__ import annotations

import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import run_cli, sacct, sacct_finished

from hpcdl import Job
from hpcdl.errors import HpcdlError
from hpcdl.scheduler import JobHandle, load_handles
from hpcdl.scheduler.states import FINISHED


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _peak(spans: list[tuple[float, float]]) -> int:
    """The most ``(start, end)`` spans open at one time."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, delta in events:  # an end sorts before a start at the same instant
        running += delta
        peak = max(peak, running)
    return peak


def _marks(out: Path) -> list[tuple[float, float]]:
    """Each task's own start and end (``date +%s.%N``: sub-second, unlike sacct's Start/End,
    whose one-second resolution made every span of a quick task empty and the peak 0). A task's
    marks lie inside its allocation, so their peak is at most the allocations' peak."""
    spans = []
    for path in sorted(out.iterdir()):
        start, end = (float(x) for x in path.read_text().split())
        assert start < end, (path.name, start, end)
        spans.append((start, end))
    return spans


def _run_split_array(
    n: int, out: Path, throttle: int | None, site: str, hold_s: float = 0
) -> JobHandle:
    """``n`` tasks, each writing its start and end marks to ``out/t-INDEX.JOBID`` and holding its
    slot ``hold_s`` seconds in between (long enough for tasks let through by a broken throttle
    to be seen side by side)."""
    out.mkdir()
    mark = f"{out}/t-$HPCDL_ARRAY_TASK_ID.$SLURM_JOB_ID"
    cmd = (f'echo "task $HPCDL_ARRAY_TASK_ID"; date +%s.%N > {mark}; sleep {hold_s}; '
           f"date +%s.%N >> {mark}")  # fmt: skip
    return Job(site=site, name="split", command=["sh", "-c", cmd], array=n, throttle=throttle,
               time="5m").submit()  # fmt: skip


def _check_every_task_ran_once(handle: JobHandle, out: Path, n: int) -> list[dict[str, str]]:
    ids = ",".join(p.job_id for p in handle.parts)
    rows = sacct_finished(ids, n, timeout=60)
    assert len(rows) == n and {r["state"] for r in rows} == {"COMPLETED"}, rows
    assert {r["id"].split("_")[0] for r in rows} == {p.job_id for p in handle.parts}
    ran = sorted(int(p.name[2:].split(".")[0]) for p in out.iterdir())
    assert ran == list(range(n))  # one file per global index: every task exactly once
    return rows


@pytest.fixture
def scale_selected(request: pytest.FixtureRequest) -> None:
    expr = request.config.getoption("markexpr") or ""
    if "scale" not in expr or "not scale" in expr:
        pytest.skip("the 2,500-task array runs only with -m scale ('make test-scale', ~35 min)")


@pytest.mark.slurm
def test_split_array_runs_once_each_and_is_one_job(devcluster, split_site, tmp_path):
    handle = _run_split_array(10, tmp_path / "out", 3, split_site, hold_s=1)
    after = Job(site=split_site, name="after", command=["true"], time="5m",
                dependencies=[f"afterany:{handle.job_id}"]).submit()  # fmt: skip
    assert [p.count for p in handle.parts] == [4, 3, 3] and handle.parts[0].job_id == handle.job_id
    every_part = "afterany:" + ":".join(p.job_id for p in handle.parts)
    assert f"#SBATCH --dependency={every_part}\n" in Path(after.script or "").read_text()
    assert after.wait(timeout=120) == "COMPLETED"
    assert handle.state() == "COMPLETED" and len(handle.states()) == 10
    rows = _check_every_task_ran_once(handle, tmp_path / "out", 10)
    assert 1 <= _peak(_marks(tmp_path / "out")) <= 3  # the throttle bounds all parts together
    (dep,) = sacct_finished(after.job_id, 1)
    assert _ts(dep["start"]) >= max(_ts(r["end"]) for r in rows)  # after every part
    listing = run_cli("status", env={"COLUMNS": "200"})
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.count("split") == 1 and "10 completed" in listing.stdout
    second = handle.parts[1]  # global task 5 is the 2nd part's task 1
    for ref in (f"{handle.job_id}_5", f"{second.job_id}_1"):
        log = run_cli("logs", ref)
        assert log.returncode == 0 and "task 5" in log.stdout.splitlines(), log.stdout + log.stderr


@pytest.mark.slurm
def test_cancel_of_a_split_array_cancels_every_part(devcluster, split_site, tmp_path):
    proc = run_cli("submit", "--site", split_site, "-J", "long", "--array", "6", "-t", "5m",
                   "--", "sleep", "300")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (handle,) = load_handles()
    assert len(handle.parts) == 2 and "as 2 Slurm arrays" in proc.stdout
    with pytest.raises(HpcdlError, match="at least 2"):  # 2 parts side by side need 1 each
        handle.backend.throttle(handle, 1)
    handle.backend.throttle(handle, 3)  # shared as 2 + 1
    for part, share in zip(handle.parts, [2, 1], strict=True):
        shown = subprocess.run(["scontrol", "show", "job", part.job_id], capture_output=True,
                               text=True, timeout=30).stdout  # fmt: skip
        assert f"ArrayTaskThrottle={share}" in shown, shown
    proc = run_cli("cancel", handle.job_id)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 60
    while handle.state() not in FINISHED:
        assert time.monotonic() < deadline, handle.states()
        time.sleep(1)
    ids = ",".join(p.job_id for p in handle.parts)
    deadline = time.monotonic() + 30
    # accounting lags a little behind the cancel: until sacct lists every task, a task it does
    # not list yet takes its state from the job folder (the runner recorded its killed command
    # as an error: FAILED, seen once); both are polled until they say CANCELLED
    while True:
        rows, states = sacct(ids), handle.states()
        if (
            {r["id"].split("_")[0] for r in rows} == {p.job_id for p in handle.parts}
            and all(r["state"].startswith("CANCELLED") for r in rows)
            and set(states.values()) == {"CANCELLED"}
        ):
            break
        assert time.monotonic() < deadline, (rows, states)
        time.sleep(1)
    assert len(states) == 6


@pytest.mark.slurm
@pytest.mark.scale
def test_2500_task_array_over_max_array_size_1001(scale_selected, devcluster, tmp_path):
    """The issue's acceptance: MaxArraySize=1001 (the dev cluster's and its profile's). Throttled
    to 8 (3 + 3 + 2 side by side) so that the shared cluster keeps half its CPUs."""
    start = time.monotonic()
    handle = _run_split_array(2500, tmp_path / "out", 8, devcluster)
    assert [(p.count, p.throttle) for p in handle.parts] == [(834, 3), (833, 3), (833, 2)]
    assert handle.wait(timeout=3000, poll=15) == "COMPLETED"
    _check_every_task_ran_once(handle, tmp_path / "out", 2500)
    peak = _peak(_marks(tmp_path / "out"))
    assert peak <= 8
    listing = run_cli("status", env={"COLUMNS": "200"})
    assert listing.stdout.count("split") == 1 and "2500 completed" in listing.stdout
    print(
        f"2,500 tasks as {len(handle.parts)} arrays: {time.monotonic() - start:.0f}s, peak {peak}"
    )
