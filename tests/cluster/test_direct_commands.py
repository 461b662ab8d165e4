"""Command jobs run straight from their batch script (hpcdl.scheduler.direct): hostile values
reach the program verbatim through bash from the job folder's command file while the script Slurm
keeps holds none of them, a planted or replaced command file runs nothing, a task starts no srun
step, and a failing task reads back as on the Python path (state, exit status, log line, outcome
record)."""

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
from hpcdl.scheduler.direct import COMMAND_FILE, REFUSED, why_not_direct, write_command_file
from hpcdl.site import load_site

ONE_LINE = [v for v in WEIRD if "\n" not in v] + ["a\\b", "\\", "'", "${HOME}", "é日本", ""]
# the program: its argv, one variable and its working directory, as JSON
ECHO = "import json,os,sys; json.dump([sys.argv[1:], os.environ.get('V'), os.getcwd()], open(sys.argv[1], 'w'))"  # fmt: skip


def _run_script_here(
    job: Job, folder: Path, env: dict[str, str], command_file: bool = True
) -> subprocess.CompletedProcess:
    """The rendered script run by bash on this machine, as the batch step would (its
    ``#SBATCH`` lines are comments to bash), with the command file a submission writes
    (``command_file=False``: the folder's own, left as the caller made it)."""
    site = load_site("devcluster")
    script = folder / "script.sh"
    script.write_text(job.render(site, folder))
    if command_file:
        write_command_file(job.task(site), folder)
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


def _planted(folder: Path, how: str, marker: Path) -> None:
    """Leave ``folder``'s command file as a planted or replaced one would be: one that runs
    ``touch MARKER`` if the script reads it."""
    path = folder / COMMAND_FILE
    text = f"hpcdl_what=x\nhpcdl_cwd=/\nhpcdl_argv=(touch {marker})\n"
    path.unlink(missing_ok=True)
    if how == "missing":
        return
    if how == "fifo":
        os.mkfifo(path, 0o600)
        return
    target = marker.with_name("elsewhere") if how == "symlink" else path
    target.write_text(text)
    target.chmod({"mode 0644": 0o644, "mode 0640": 0o640, "mode 0700": 0o700}.get(how, 0o600))
    if how == "symlink":  # this user's own 0600 file, reached through a link: still refused
        path.symlink_to(target)


@pytest.mark.parametrize(
    "how", ["missing", "mode 0644", "mode 0640", "mode 0700", "symlink", "fifo"]
)
def test_a_planted_or_replaced_command_file_runs_nothing(tmp_path: Path, how: str) -> None:
    """The task fails with one line on stderr and an error record; nothing the file says runs."""
    folder, marker = tmp_path / "job", tmp_path / "ran"
    folder.mkdir()
    job = Job(site="devcluster", command=["touch", str(marker)], array=2, time="5m")
    write_command_file(job.task(load_site("devcluster")), folder)
    _planted(folder, how, marker)
    env = {"SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "1"}
    proc = _run_script_here(job, folder, env, command_file=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [REFUSED % (folder / COMMAND_FILE)]
    assert not marker.exists()
    record = json.loads((folder / "5_1_0_outcome.json").read_text())
    assert record == {"outcome": "error", "job_id": "5_1", "task": 0}


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


@pytest.mark.slurm
def test_values_reach_the_program_but_not_the_script_slurm_keeps(devcluster: str, tmp_path: Path) -> None:  # fmt: skip
    """A token in ``env`` and in argv reaches the program verbatim, and neither is in the batch
    script Slurm stores (``scontrol write batch_script``, what the accounting database and
    ``sacct --batch-script`` would hold) nor in the job folder's copy of it."""
    token = "tok-5f2b9c1e-" + os.urandom(8).hex()
    out = tmp_path / "rep"
    env = {"MY_API_TOKEN": token, "ODD": f"{token} $(id) 'q' a\\b"}
    job = Job(site=devcluster, name="no-values-in-script", env=env, time="5m",
              command=[sys.executable, REPORT, str(out), ",".join(env), f"--token={token}"])  # fmt: skip
    handle = job.submit()
    try:
        assert handle.wait(timeout=120) == "COMPLETED", handle.log_paths()[1].read_text()
        got = json.loads(Path(f"{out}.0.json").read_text())
        assert got["argv"] == [f"--token={token}"] and got["env"] == env
        kept = subprocess.run(["scontrol", "write", "batch_script", handle.job_id, "-"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert kept.returncode == 0 and "#SBATCH" in kept.stdout, kept.stderr
        assert token not in kept.stdout and COMMAND_FILE in kept.stdout
        assert token not in Path(handle.script or "").read_text()
        command_file = Path(handle.folder) / COMMAND_FILE
        assert command_file.stat().st_mode & 0o777 == 0o600 and token in command_file.read_text()
    finally:
        subprocess.run(["scancel", handle.job_id], timeout=30)


@pytest.mark.slurm
def test_a_command_file_replaced_before_the_job_starts_runs_nothing(devcluster: str, tmp_path: Path) -> None:  # fmt: skip
    """A queued job whose command file is replaced by a link (to a file of this user's, 0600,
    that would run something else) fails at its start with the one line and an error record."""
    marker = tmp_path / "ran"
    blocker = Job(site=devcluster, name="blocker", command=["sleep", "300"], time="10m").submit()
    handle = None
    try:
        handle = Job(site=devcluster, name="replaced", command=["true"], time="5m",
                     dependencies=[f"afterany:{blocker.job_id}"]).submit()  # fmt: skip
        assert handle.state() == "PENDING"
        _planted(Path(handle.folder), "symlink", marker)
        subprocess.run(["scancel", blocker.job_id], timeout=30, check=True)
        assert handle.wait(timeout=120) == "FAILED"
        err = handle.log_paths()[1].read_text()
        assert err.splitlines() == [REFUSED % (Path(handle.folder) / COMMAND_FILE)], err
        assert not marker.exists()
        [record] = Path(handle.folder).glob("*_outcome.json")
        assert json.loads(record.read_text())["outcome"] == "error"
    finally:
        subprocess.run(
            ["scancel", blocker.job_id, *([handle.job_id] if handle else [])], timeout=30
        )
