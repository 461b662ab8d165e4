"""The same Job API on the embedded `local` profile: real processes through submitit's local executor."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import REPORT, WEIRD, run_cli

from hpcdl import Job
from hpcdl.scheduler import find_handle


def test_command_job_completes_and_status_from_fresh_process(tmp_path):
    handle = Job(name="echo", command=["echo", "hello hpcdl"], time="5m").submit()
    assert handle.wait(timeout=60) == "COMPLETED"
    out, _ = handle.log_paths()
    assert "hello hpcdl" in out.read_text()
    proc = run_cli("status", handle.job_id)
    assert proc.returncode == 0, proc.stderr
    assert "COMPLETED" in proc.stdout


def test_values_reach_the_job_intact(tmp_path, monkeypatch):
    marker = Path("/tmp/pwned-hpcdl")
    marker.unlink(missing_ok=True)
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-value-xyz")
    env = {f"V{i}": v for i, v in enumerate(WEIRD)}
    out = tmp_path / "report"
    job = Job(
        name="weird $(name) `x`",
        command=[sys.executable, REPORT, str(out), ",".join([*env, "HPCDL_JOB_NAME"]), *WEIRD],
        env=env,
        time="5m",
    )
    handle = job.submit()
    assert handle.wait(timeout=60) == "COMPLETED", handle.log_paths()[1].read_text()
    got = json.loads(Path(f"{out}.0.json").read_text())
    assert got["argv"] == WEIRD
    assert got["env"] == {**env, "HPCDL_JOB_NAME": job.name}
    assert got["secret_sha256"] == hashlib.sha256(b"s3cr3t-value-xyz").hexdigest()
    assert not marker.exists()
    folder = Path(handle.folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.rglob("*"):
        assert b"s3cr3t-value-xyz" not in path.read_bytes(), path


def test_failing_command_is_failed():
    handle = Job(command=["false"], time="5m").submit()
    assert handle.wait(timeout=60) == "FAILED"
    assert "exited with status 1" in handle.log_paths()[1].read_text()


def test_cancel_local_job():
    handle = Job(command=["sleep", "120"], time="5m").submit()
    assert handle.state() == "RUNNING"
    proc = run_cli("cancel", handle.job_id)
    assert proc.returncode == 0, proc.stderr
    assert handle.wait(timeout=30) == "CANCELLED"


def _wait_for_file(path: Path, handle, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and handle.state() == "RUNNING", (
            handle.state(),
            handle.log_paths()[1].read_text() if handle.log_paths()[1].exists() else "",
        )
        time.sleep(0.1)


def _gone(pid: str) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_cancel_returns_once_the_jobs_processes_are_gone(tmp_path):
    """A local job's process still busy after SIGINT (a sweep worker unwinding its trial) is
    gone when ``hpcdl cancel`` returns. The state says CANCELLED from the moment the marker is
    written, and a worker still writing after cancel returned raced the next command (CI:
    ``sweep resume`` on PostgreSQL asked a 13th trial; ``sweep move-storage`` saw the journal
    change)."""
    from tests.helpers.slow_stop import run_until_stopped

    handle = Job(function=run_until_stopped, args=(str(tmp_path),), time="5m").submit()
    _wait_for_file(tmp_path / "pid", handle)
    proc = run_cli("cancel", handle.job_id)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "stopping").exists()  # it got the signal and was busy stopping
    assert _gone((tmp_path / "pid").read_text())
    assert handle.state() == "CANCELLED"


def test_cancel_stops_a_job_submitted_by_a_process_that_ignores_sigint(tmp_path):
    """``hpcdl sweep run ... &`` in a script (and ``make test``) ignores SIGINT, and an ignored
    signal stays ignored in every process started below: the local job never saw the cancel's
    SIGINT and ran on (a cancelled test sweep ran to its end; the resumed one raced it). Its
    processes now get SIGINT's default disposition, so the job unwinds as it would from a
    terminal."""
    submit = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "from hpcdl import Job\n"
        "from tests.helpers.slow_stop import run_until_interrupted\n"
        f"h = Job(function=run_until_interrupted, args=({str(tmp_path)!r},), time='5m').submit()\n"
        f"open({str(tmp_path / 'id')!r}, 'w').write(h.job_id)\n"
    )
    # no pipe: the job's processes would hold it open, and run() would wait for them
    subprocess.run([sys.executable, "-c", submit], stdout=subprocess.DEVNULL, timeout=120,
                   check=True, cwd=Path(__file__).parents[2])  # fmt: skip
    _cancel_and_expect_unwound(find_handle((tmp_path / "id").read_text()), tmp_path)


def test_cancel_gives_a_slow_unwinding_job_its_grace_time(tmp_path):
    """submitit's local controller SIGKILLs its tasks 1 s after its own SIGINT: a job that needs
    longer to unwind (seen under load in run 23) was killed although the cancel gives 10 s. The
    controller now gets its SIGINT only once the job is gone."""
    from tests.helpers.slow_stop import run_until_interrupted

    handle = Job(function=run_until_interrupted, args=(str(tmp_path), 3.0), time="5m").submit()
    _cancel_and_expect_unwound(handle, tmp_path)


def _cancel_and_expect_unwound(handle: Any, folder: Path) -> None:
    """``hpcdl cancel`` of a running ``run_until_interrupted`` job: it returns once the job is
    gone, the job unwound (it was not killed) and its state is CANCELLED."""
    _wait_for_file(folder / "pid", handle)
    proc = run_cli("cancel", handle.job_id)
    assert proc.returncode == 0, proc.stderr
    assert _gone((folder / "pid").read_text())
    assert (folder / "interrupted").exists(), "the job was killed, not interrupted"
    assert handle.state() == "CANCELLED"


def test_python_callable_job(tmp_path):
    target = tmp_path / "called.txt"
    handle = Job(function=Path.write_text, args=(target, "from a callable"), time="5m").submit()
    assert handle.wait(timeout=60) == "COMPLETED"
    assert target.read_text() == "from a callable"


def test_array_on_local_gives_each_task_its_id(tmp_path):
    out = tmp_path / "arr"
    cmd = [sys.executable, "-c",
           f"import os; open('{out}' + os.environ['HPCDL_ARRAY_TASK_ID'], 'w').write('x')"]  # fmt: skip
    handle = Job(command=cmd, array=4, time="5m").submit()
    assert handle.wait(timeout=60) == "COMPLETED"
    assert sorted(p.name for p in tmp_path.glob("arr*")) == ["arr0", "arr1", "arr2", "arr3"]
    assert len(handle.states()) == 4


def test_clean_removes_finished_jobs(job_root):
    handle = Job(command=["true"], time="5m").submit()
    assert handle.wait(timeout=60) == "COMPLETED"
    running = Job(command=["sleep", "60"], time="5m").submit()
    proc = run_cli("clean", "--older-than", "0")
    assert proc.returncode == 0, proc.stderr
    assert f"removed {handle.job_id}" in proc.stdout
    assert not Path(handle.folder).exists()
    assert Path(running.folder).exists()
    assert find_handle(running.job_id).job_id == running.job_id
    running.cancel()


def test_logs_of_a_task_and_follow_until_the_end():
    cmd = [
        sys.executable,
        "-c",
        "import time\nfor i in range(3):\n    print('tick', i, flush=True); time.sleep(1)",
    ]
    handle = Job(command=cmd, tasks_per_node=2, time="5m").submit()
    proc = run_cli("logs", handle.job_id, "--task", "1", "--follow", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("tick")] == [
        "tick 0",
        "tick 1",
        "tick 2",
    ]
    assert handle.state() == "COMPLETED"
    assert run_cli("logs", handle.job_id, "--err").returncode == 0
    bad = run_cli("logs", handle.job_id, "--task", "2")
    assert bad.returncode == 2 and "has tasks 0..1" in bad.stderr
