"""The same Job API on the embedded `local` profile: real processes through submitit's local executor."""

from __future__ import annotations

import hashlib
import json
import stat
import sys
from pathlib import Path

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
