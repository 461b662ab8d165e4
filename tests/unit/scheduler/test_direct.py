"""Which command jobs run straight from their batch script (hpcdl.scheduler.direct), and what
that script says: decision tables and the rendered text (no process: bash runs the scripts in
tests/cluster/test_direct_commands.py)."""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path
from typing import Any

import pytest

from hpcdl import Job
from hpcdl.scheduler.arrays import PartPlan
from hpcdl.scheduler.direct import (
    COMMAND_FILE,
    OPT_OUT,
    command_body,
    command_file,
    part_parameters,
    why_not_direct,
    write_command_file,
)
from hpcdl.site import load_site

SITE = load_site("devcluster")
PLAIN: dict[str, Any] = {"site": "devcluster", "command": ["echo", "hi"], "time": "5m"}
# Hostile but one-line values: each must reach the program as one word, verbatim.
HOSTILE = ["two words", "it's \"quoted\"", "$(touch /tmp/pwned-hpcdl)", "`id`", "a\\b", "\\",
           "'", "*", ";ls", "${HOME}", "#SBATCH --partition=high", "-- --", "é日本", ""]  # fmt: skip


def _why(**fields: Any) -> str | None:
    return why_not_direct(Job(**{**PLAIN, **fields}), SITE, env={})


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({}, None),
        ({"array": 500, "throttle": 16}, None),
        ({"array": 2500}, None),  # split over max_array_size: each part is direct
        ({"dependencies": ["123"], "requeue": True}, None),
        ({"env": {"A": "x"}, "cwd": "/tmp", "name": "n $(x)"}, None),
        ({"command": None, "function": print}, "a Python callable (its runner unpickles it)"),
        ({"command": ["python3", "x.py"], "launcher": "torchrun"}, "launcher torchrun"),
        ({"nodes": 2}, "more than one task (each rank gets torch.distributed's variables)"),
        ({"tasks_per_node": 2}, "more than one task (each rank gets torch.distributed's variables)"),
        ({"gpus_per_node": 2, "partition": "gpu"},
         "more than one task (each rank gets torch.distributed's variables)"),
        ({"container": "/images/x.sqsh"}, "a container image (its runtime wraps the command)"),
        ({"partition": "low"}, "partition 'low' preempts by requeueing"),
        ({"env": {"A": "line1\nline2"}}, "a value holds a newline or another control character (kept in the pickle)"),
        ({"command": ["echo", "a\rb"]}, "a value holds a newline or another control character (kept in the pickle)"),
        ({"command": ["echo", "a\x00b"]}, "a value holds a newline or another control character (kept in the pickle)"),
        ({"command": ["echo", "\ud800"]}, "a value holds a newline or another control character (kept in the pickle)"),
    ],
)  # fmt: skip
def test_which_jobs_run_straight_from_the_script(fields: dict[str, Any], why: str | None) -> None:
    assert _why(**fields) == why


@pytest.mark.parametrize("value", ["0", "no", "false", "OFF"])
def test_the_opt_out_keeps_the_python_path(value: str) -> None:
    assert why_not_direct(Job(**PLAIN), SITE, env={OPT_OUT: value}) == f"{OPT_OUT}={value}"
    assert why_not_direct(Job(**PLAIN), SITE, env={OPT_OUT: "1"}) is None


FOLDER = Path("/jobs/it's here")


def _body(offset: int | None = None, array: bool = False) -> list[str]:
    return command_body(FOLDER, offset, array).splitlines()


def _values(text: str) -> dict[str, Any]:
    """The command file's assignments as bash reads them (shlex: POSIX quoting); the argv's
    words from inside its parentheses."""
    out: dict[str, Any] = {}
    for line in text.splitlines()[1:]:
        name, value = line.removeprefix("export ").split("=", 1)
        if value.startswith("(") and value.endswith(")"):
            out[name] = shlex.split(value[1:-1])
        else:
            [out[name]] = shlex.split(value)
    return out


@pytest.mark.parametrize("value", HOSTILE)
def test_the_script_holds_no_value_and_the_file_holds_each_quoted(value: str) -> None:
    """Slurm keeps the batch script (scontrol write batch_script, the accounting database):
    argv, env values, the name and the working directory go into the command file only, each
    one word that reads back as given (bash reads it: tests/cluster/test_direct_commands.py)."""
    secret = f"tok-{value}"
    job = Job(**{**PLAIN, "command": ["printf", "%s\\n", secret, value], "name": f"n-{secret}",
                 "env": {"MY_API_TOKEN": secret, "V": value}, "cwd": f"/tmp/{secret}"})  # fmt: skip
    script = job.render(SITE, FOLDER)
    assert "tok-" not in script.split("# command\n", 1)[1]  # the name is a directive: sbatch's
    values = _values(command_file(job.task(SITE)))
    assert values == {
        "MY_API_TOKEN": secret, "V": value, "HPCDL_JOB_NAME": f"n-{secret}", "HPCDL_SITE": "devcluster",
        "hpcdl_what": repr("printf"), "hpcdl_cwd": f"/tmp/{secret}",
        "hpcdl_argv": ["printf", "%s\\n", secret, value],
    }  # fmt: skip
    assert len(command_file(job.task(SITE)).splitlines()) == len(values) + 1  # one line each


def test_the_body_sets_the_runners_variables_and_records_the_outcome() -> None:
    job = Job(**{**PLAIN, "env": {"A": "1", "HPCDL_SITE": "mine"}, "name": "n"})
    # the runner's order: launcher preset, the job's env, then hpcdl's own names win
    assert command_file(job.task(SITE)).splitlines()[1:4] == [
        "export A=1", "export HPCDL_SITE=devcluster", "export HPCDL_JOB_NAME=n"]  # fmt: skip
    lines = _body(offset=834, array=True)
    assert "hpcdl_file='/jobs/it'\"'\"'s here'/direct_command.sh" in lines
    # the index after the job's env (read from the file), before the command
    run = lines.index('  cd -- "$hpcdl_cwd" && "${hpcdl_argv[@]}"')
    assert lines[run - 2 : run] == ['  eval "$hpcdl_values"',
                                    "  export HPCDL_ARRAY_TASK_ID=$((834 + SLURM_ARRAY_TASK_ID))"]  # fmt: skip
    assert "hpcdl_id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" in lines
    assert lines[-1] == 'exit "$hpcdl_rc"'
    assert "'/jobs/it'\"'\"'s here'/\"${hpcdl_id}_0_outcome.json\"" in lines[-2]
    single = _body(offset=None)
    assert "hpcdl_id=${SLURM_JOB_ID}" in single
    assert not any("HPCDL_ARRAY_TASK_ID" in ln for ln in single)
    one_task_part = _body(offset=2, array=False)  # a one-task part is a plain job
    assert "  export HPCDL_ARRAY_TASK_ID=2" in one_task_part and "hpcdl_id=${SLURM_JOB_ID}" in one_task_part  # fmt: skip


def test_the_file_is_private_exclusive_and_rendering_writes_nothing(tmp_path: Path) -> None:
    """0600 whatever the umask (a group-shared job folder too); a name someone took, a symlink
    included, fails the submission instead of being followed or overwritten."""
    job = Job(**{**PLAIN, "env": {"MY_API_TOKEN": "tok"}})
    assert job.render(SITE, tmp_path) and list(tmp_path.iterdir()) == []
    assert "<job-folder>'/direct_command.sh" in job.render(SITE)
    old = os.umask(0o022)
    try:
        path = write_command_file(job.task(SITE), tmp_path)
    finally:
        os.umask(old)
    assert path == tmp_path / COMMAND_FILE and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == command_file(job.task(SITE))
    other = tmp_path / "other"
    other.mkdir()
    (other / "target").write_text("theirs")
    (other / COMMAND_FILE).symlink_to(other / "target")
    with pytest.raises(FileExistsError):
        write_command_file(job.task(SITE), other)
    assert (other / "target").read_text() == "theirs"


def test_part_parameters_keep_submitits_meaning() -> None:
    params = {"wckey": None, "srun_args": ["--mpi=pmi2"], "dependency": "afterok:1", "time": 5}
    assert part_parameters(params, None, None, None) == {"wckey": None, "time": 5, "use_srun": False}  # fmt: skip
    assert part_parameters(params, 1, 3, "afterany:7") == {
        "wckey": None, "time": 5, "use_srun": False, "dependency": "afterany:7", "array_parallelism": 3,
    }  # fmt: skip
    assert part_parameters(params, 500, 16, None)["map_count"] == 500


def _directives(script: str) -> list[str]:
    return [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]


@pytest.mark.parametrize("fields", [{}, {"array": 500, "throttle": 16}, {"array": 2500, "throttle": 8},
                                    {"dependencies": ["afterany:42"], "comment": "a\\b 'c'"}])  # fmt: skip
def test_the_directives_are_the_python_paths(fields: dict[str, Any], monkeypatch) -> None:
    """Same #SBATCH lines on both paths (logs, signal, limits, quoting): only the body differs."""
    job = Job(**{**PLAIN, **fields})
    direct = job.render(SITE)
    monkeypatch.setenv(OPT_OUT, "0")
    python = job.render(SITE)
    assert _directives(direct) == _directives(python)
    assert "submitit.core._submit" in python and "submitit.core._submit" not in direct
    assert "srun" not in direct.split("# command", 1)[1]
    # the first line of commands precedes every user value: sbatch reads no directive after it
    body = direct.split("# command\n", 1)[1].splitlines()
    assert body[0] == "export SUBMITIT_EXECUTOR=slurm"


def test_a_split_arrays_parts_wait_as_on_the_python_path() -> None:
    plan = PartPlan(offset=1001, count=1000, lane=1, throttle=3, after=None)
    assert plan.count > 1  # the part is a Slurm array: its tasks index from the part's offset
    text = command_body(Path("/j"), plan.offset, True)
    assert "  export HPCDL_ARRAY_TASK_ID=$((1001 + SLURM_ARRAY_TASK_ID))" in text


def test_a_task_sacct_does_not_list_yet_reads_its_record_not_the_arrays_row(tmp_path) -> None:
    """Right after an array's quick tasks end, sacct listed only the array's own row (``4324``,
    its last task's FAILED) for a moment: the other tasks read FAILED from it, one that had
    succeeded included (seen on the dev cluster). A task with an outcome record reads that."""
    import json

    from hpcdl.scheduler import JobHandle, TaskStatus
    from hpcdl.scheduler.slurm import _expand

    (tmp_path / "100_0_0_outcome.json").write_text(json.dumps({"outcome": "success"}))
    handle = JobHandle(job_id="100", name="a", site="devcluster", scheduler="slurm",
                       folder=str(tmp_path), array=3, submitted_at=0)  # fmt: skip
    live = {"100": TaskStatus("FAILED"), "100_1": TaskStatus("FAILED")}
    got = {k: s.state for k, s in _expand(handle, live).items()}
    assert got == {"100_0": "COMPLETED", "100_1": "FAILED", "100_2": "FAILED"}
    pending = {"100": TaskStatus("PENDING", "Priority")}  # a pending array's one row
    assert {s.state for s in _expand(handle, pending).values()} == {"PENDING"}
