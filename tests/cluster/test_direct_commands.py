"""Command jobs run straight from their batch script (hpcdl.scheduler.direct): hostile values
reach the program verbatim through bash, a task starts no srun step, and a failing task reads
back as on the Python path (state, exit status, log line, outcome record)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPORT, WEIRD, run_cli, sacct_finished
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcdl import Job
from hpcdl.scheduler.direct import why_not_direct
from hpcdl.site import load_site

ONE_LINE = [v for v in WEIRD if "\n" not in v] + ["a\\b", "\\", "'", "${HOME}", "é日本", ""]
# the program: its argv, one variable and its working directory, as JSON
ECHO = "import json,os,sys; json.dump([sys.argv[1:], os.environ.get('V'), os.getcwd()], open(sys.argv[1], 'w'))"  # fmt: skip


def _run_script_here(job: Job, folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The rendered script run by bash on this machine, as the batch step would (its
    ``#SBATCH`` lines are comments to bash)."""
    script = folder / "script.sh"
    script.write_text(job.render(load_site("devcluster"), folder))
    return subprocess.run(["bash", str(script)], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=30)  # fmt: skip


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(values=st.lists(st.one_of(st.sampled_from(ONE_LINE), st.text(max_size=8)), min_size=1,
                       max_size=3))  # fmt: skip
def test_values_reach_the_program_verbatim_through_bash(values: list[str]) -> None:
    """Generated argv and env values: a direct job's script, run by bash, gives the program
    exactly these values, or the job keeps the Python path (a control character)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder, cwd = Path(tmp), Path(tmp) / "it's $(cwd)"
        cwd.mkdir()
        out = folder / "seen.json"
        job = Job(site="devcluster", command=[sys.executable, "-S", "-c", ECHO, str(out), *values],
                  env={"V": values[0]}, cwd=str(cwd), time="5m")  # fmt: skip
        if why_not_direct(job, load_site("devcluster")) is not None:
            assert any(not v.isprintable() for v in values), values
            return
        proc = _run_script_here(job, folder, {"SLURM_JOB_ID": "77"})
        assert proc.returncode == 0, proc.stderr
        assert json.loads(out.read_text()) == [[str(out), *values], values[0], str(cwd)]
        record = json.loads((folder / "77_0_outcome.json").read_text())
        assert record == {"outcome": "success", "job_id": "77", "task": 0}


def test_a_failing_command_leaves_its_status_and_an_error_record(tmp_path: Path) -> None:
    job = Job(site="devcluster", command=["sh", "-c", "exit 3"], array=4, time="5m")
    env = {"SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "2"}
    proc = _run_script_here(job, tmp_path, env)
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines()[-1] == "hpcdl: command 'sh' exited with status 3"
    record = json.loads((tmp_path / "9_2_0_outcome.json").read_text())
    assert record == {"outcome": "error", "job_id": "9_2", "task": 0}
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def _steps(job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-P", "-o", "JobID", "-j", job_id], capture_output=True,
                         text=True, timeout=30, check=True).stdout  # fmt: skip
    return sorted(line.split(".", 1)[1] for line in out.split() if "." in line)


@pytest.mark.slurm
def test_hostile_values_on_the_cluster_and_no_srun_step(devcluster: str, tmp_path: Path) -> None:
    """A one-task command job with quotes, ``$()``, backticks and backslashes in its argv, env
    and name runs from its script: the values arrive verbatim, nothing they spell runs, and the
    job has the batch step only (the Python path starts step 0 with srun)."""
    marker = Path("/tmp/pwned-hpcdl")
    marker.unlink(missing_ok=True)
    env = {f"V{i}": v for i, v in enumerate(ONE_LINE)}
    out = tmp_path / "inj"
    job = Job(site=devcluster, name="weird $(name) `x` 'q' a\\b", env=env, time="5m",
              command=[sys.executable, REPORT, str(out), ",".join([*env, "HPCDL_JOB_NAME"]), *ONE_LINE])  # fmt: skip
    handle = job.submit()
    script = Path(handle.script or "").read_text()
    assert "submitit.core._submit" not in script and "srun" not in script.split("# command")[1]
    assert handle.wait(timeout=120) == "COMPLETED", handle.log_paths()[1].read_text()
    got = json.loads(Path(f"{out}.0.json").read_text())
    assert got["argv"] == ONE_LINE
    assert got["env"] == {**env, "HPCDL_JOB_NAME": job.name}
    assert not marker.exists()
    sacct_finished(handle.job_id, 1)
    assert _steps(handle.job_id) in (["batch"], ["batch", "extern"]), _steps(handle.job_id)


@pytest.mark.slurm
def test_a_direct_array_reads_back_as_the_python_paths(devcluster: str, tmp_path: Path) -> None:
    """States (with the command's exit status in sacct), logs and the outcome records of an
    array whose tasks fail or succeed by their index."""
    cmd = 'echo "task $HPCDL_ARRAY_TASK_ID of $HPCDL_JOB_NAME"; exit $HPCDL_ARRAY_TASK_ID'
    handle = Job(site=devcluster, name="direct-array", command=["sh", "-c", cmd], array=3,
                 time="5m").submit()  # fmt: skip
    assert handle.wait(timeout=120) == "FAILED"
    assert handle.states() == {f"{handle.job_id}_0": "COMPLETED", f"{handle.job_id}_1": "FAILED",
                               f"{handle.job_id}_2": "FAILED"}  # fmt: skip
    assert sorted(r["id"] for r in sacct_finished(handle.job_id, 3)) == sorted(handle.states())
    rows = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,ExitCode", "-j", handle.job_id],
                          capture_output=True, text=True, timeout=30, check=True).stdout.split()  # fmt: skip
    assert sorted(rows) == [f"{handle.job_id}_{i}|{i}:0" for i in range(3)]  # the command's own
    log = run_cli("logs", f"{handle.job_id}_2")
    assert log.stdout == "task 2 of direct-array\n", log
    err = run_cli("logs", "--err", f"{handle.job_id}_2")
    assert err.stdout.strip() == "hpcdl: command 'sh' exited with status 2", err
    folder = Path(handle.folder)
    outcomes: dict[str, Any] = {
        p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*_outcome.json"))
    }
    assert [o["outcome"] for o in outcomes.values()] == ["success", "error", "error"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in folder.iterdir() if not p.is_symlink())
