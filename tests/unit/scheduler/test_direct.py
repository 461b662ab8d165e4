"""Which command jobs run straight from their batch script (hpcdl.scheduler.direct), and what
that script says: decision tables and the rendered text (no process: bash runs the scripts in
tests/cluster/test_direct_commands.py)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from hpcdl import Job
from hpcdl.scheduler.arrays import PartPlan
from hpcdl.scheduler.direct import OPT_OUT, command_body, part_parameters, why_not_direct
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


def _body(job: Job, offset: int | None = None, array: bool = False) -> list[str]:
    return command_body(job.task(SITE), Path("/jobs/it's here"), offset, array).splitlines()


@pytest.mark.parametrize("value", HOSTILE)
def test_every_value_is_one_quoted_word(value: str) -> None:
    """argv, env values and the working directory read back, through shell quoting, as given."""
    job = Job(**{**PLAIN, "command": ["printf", "%s\\n", value, value],
                 "env": {"V": value}, "cwd": f"/tmp/{value}"})  # fmt: skip
    lines = _body(job)
    run = next(ln for ln in lines if ln.startswith("cd -- "))
    words = shlex.split(run)
    assert words[:3] == ["cd", "--", f"/tmp/{value}"] and words[3] == "&&"
    assert words[4:] == ["printf", "%s\\n", value, value]
    exports = dict(shlex.split(ln)[1].split("=", 1) for ln in lines if ln.startswith("export "))
    assert exports == {"V": value, "HPCDL_JOB_NAME": "hpcdl-job", "HPCDL_SITE": "devcluster"}
    assert all("\n" not in ln for ln in lines)


def test_the_body_sets_the_runners_variables_and_records_the_outcome() -> None:
    job = Job(**{**PLAIN, "env": {"A": "1", "HPCDL_SITE": "mine"}, "name": "n"})
    lines = _body(job, offset=834, array=True)
    # the runner's order: launcher preset, the job's env, then hpcdl's own names win
    assert lines[1:4] == ["export A=1", "export HPCDL_SITE=devcluster", "export HPCDL_JOB_NAME=n"]
    assert "export HPCDL_ARRAY_TASK_ID=$((834 + SLURM_ARRAY_TASK_ID))" in lines
    assert "hpcdl_id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" in lines
    assert lines[-1] == "exit $hpcdl_rc"
    assert "'/jobs/it'\"'\"'s here'/\"${hpcdl_id}_0_outcome.json\"" in lines[-2]
    single = _body(job, offset=None)
    assert "hpcdl_id=${SLURM_JOB_ID}" in single
    assert not any("HPCDL_ARRAY_TASK_ID" in ln for ln in single)
    one_task_part = _body(job, offset=2, array=False)  # a one-task part is a plain job
    assert "export HPCDL_ARRAY_TASK_ID=2" in one_task_part and "hpcdl_id=${SLURM_JOB_ID}" in one_task_part  # fmt: skip


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
    text = command_body(Job(**PLAIN).task(SITE), Path("/j"), plan.offset, True)
    assert "export HPCDL_ARRAY_TASK_ID=$((1001 + SLURM_ARRAY_TASK_ID))" in text


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
