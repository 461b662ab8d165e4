"""Command jobs run straight from their batch script, without a Python process on the node.

A task of the Python path costs an srun step, submitit's runner (``python -m
submitit.core._submit``: imports, the pickle) and hpcdl's task runner before the command starts:
3-4 s on the dev cluster, against ~0.5 s for the whole of a raw ``sbatch --wrap`` task (issue
21). A one-task command job needs none of it: what the runner does for it is a few lines of
shell. So such a job's script sets the same variables (the site's launcher preset, the job's
``env``, ``HPCDL_JOB_NAME``, ``HPCDL_SITE``, ``HPCDL_ARRAY_TASK_ID`` as a global index), enters
the same working directory, runs the command in the batch step, writes the same outcome record
(``<id>_0_outcome.json``, what ``status`` reads when sacct has forgotten the job) and leaves with
the command's status. Logs keep submitit's names (the ``#SBATCH --output/--error`` lines are
submitit's own, rendered by the same call), so ``status``, ``logs``, ``cancel``, ``wait`` and the
registry cannot tell the two paths apart.

Which jobs qualify is :func:`why_not_direct` (pure); everything else keeps the Python path.

No user value enters the script: Slurm keeps batch scripts (slurmctld's state, ``scontrol write
batch_script``, the accounting database with ``AccountingStoreFlags=job_script``), so a token in
``env`` would be stored by Slurm and shown to its admins. The body holds fixed shell, the job
folder's path (which the ``#SBATCH --output`` lines hold anyway) and numbers hpcdl computes (a
part's offset). argv, ``env`` and the working directory go into :data:`COMMAND_FILE` in the
private job folder (0600, created exclusively at submission: :func:`write_command_file`; a split
array's parts share it), as one ``shlex.quote`` word each. The script reads it once through one
descriptor and runs it only if it is this user's own 0600 regular file, not a symlink: a file
someone planted in a shared job root is refused with one line, nothing run. Values must be one
line (:func:`hpcdl.script_values.check_one_line`); one with a newline or another control
character is no reason to refuse a job: it takes the Python path, in the pickle, as before.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from hpcdl.scheduler._sbatch import sbatch_quoting
from hpcdl.scheduler.arrays import PartPlan
from hpcdl.scheduler.interface import Request
from hpcdl.script_values import check_one_line
from hpcdl.site import SiteProfile
from hpcdl.task_runner import Task

#: ``HPCDL_DIRECT_COMMANDS=0`` in the submitting environment keeps every command job on the
#: Python path (``hpcdl bench array`` measures both; a way back if a program needs the srun step).
OPT_OUT = "HPCDL_DIRECT_COMMANDS"


def why_not_direct(request: Request, site: SiteProfile, env: dict[str, str] | None = None) -> str | None:  # fmt: skip
    """``None`` when ``request`` runs straight from its script on ``site``, else why not (for
    the tests and readers of the code). ``env``: the submitting environment (default: this one)."""
    opt_out = (os.environ if env is None else env).get(OPT_OUT, "1")
    if opt_out.strip().lower() in {"0", "no", "false", "off"}:
        return f"{OPT_OUT}={opt_out}"
    if request.command is None:
        return "a Python callable (its runner unpickles it)"
    if request.launcher != "srun":  # torchrun's rendezvous (PET_*) is computed per node
        return f"launcher {request.launcher}"
    if request.nodes * request.launched_tasks_per_node != 1:  # ranks need torch's variables
        return "more than one task (each rank gets torch.distributed's variables)"
    if request.image(site) is not None:
        return "a container image (its runtime wraps the command)"
    part = site.partition(request.partition)
    if part is not None and part.preempt_mode == "REQUEUE":
        # the runner's signal handling decides what a preempted task does (hpcdl.task_runner)
        return f"partition {part.name!r} preempts by requeueing"
    task = request.task(site)
    values = [*(task.argv or []), *task.env.values(), task.cwd or ""]
    if not all(_one_line(v) for v in values):
        return "a value holds a newline or another control character (kept in the pickle)"
    return None


def _one_line(value: str) -> bool:
    try:
        check_one_line(value)
        value.encode()  # a lone surrogate cannot be written into the command file
    except (ValueError, UnicodeError):
        return False
    return True


#: The job folder's file of a direct job's values (argv, ``env``, working directory).
COMMAND_FILE = "direct_command.sh"
#: The one line a task whose :data:`COMMAND_FILE` is refused writes to stderr (``%s``: its path).
REFUSED = "hpcdl: %s: missing, or not this user's own 0600 regular file: nothing run"


def command_file(task: Task) -> str:
    """The text of :data:`COMMAND_FILE`: assignments only, every value one ``shlex.quote`` word
    (one line each: :func:`why_not_direct`). The runner's order: the launcher's preset, the
    job's ``env``, hpcdl's own names (all in ``task.env``)."""
    assert task.argv is not None
    q = shlex.quote
    lines = ["# hpcdl: the values of a command job run from its batch script (hpcdl.scheduler.direct)"]  # fmt: skip
    lines += [f"export {key}={q(value)}" for key, value in task.env.items()]
    lines += [
        f"hpcdl_what={q(repr(task.argv[0]))}",  # the failure line names the program
        f"hpcdl_cwd={q(task.cwd or '.')}",
        f"hpcdl_argv=({' '.join(q(a) for a in task.argv)})",
    ]
    return "\n".join(lines) + "\n"


def write_command_file(task: Task, folder: Path) -> Path:
    """Write :data:`COMMAND_FILE` into the new job folder before anything is queued: created
    exclusively without following a symlink at its name, 0600 whatever the umask (a group-shared
    job folder included: it holds tokens), complete before sbatch runs."""
    path = folder / COMMAND_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    with open(fd, "w") as f:
        f.write(command_file(task))
    return path


def command_body(folder: Path, offset: int | None, array: bool) -> str:
    """The shell that replaces submitit's ``srun ... python -m submitit.core._submit`` line: no
    user value, only ``folder`` and ``offset``, the global index of the part's task 0 (``None``
    for a job that is no array); ``array``: the part is a Slurm array (a one-task part is a plain
    job, as submitit submits it)."""
    q = shlex.quote
    refused = q(REFUSED + "\\n")  # printf's format: the path is its argument
    # the outcome record's id: submitit's job id for this task (ARRAY_TASK, or the job)
    own_id = "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" if array else "${SLURM_JOB_ID}"
    record = f'{q(str(folder))}/"${{hpcdl_id}}_0_outcome.json"'
    lines = [
        "# hpcdl: the command runs in the batch step, no Python runner (hpcdl.scheduler.direct);",
        f"# its values are in {COMMAND_FILE}, not here: Slurm keeps this script",
        f"hpcdl_id={own_id}",
        f"hpcdl_file={q(str(folder))}/{COMMAND_FILE}",
        "hpcdl_values=",
        # read once through one descriptor and checked on it: a file swapped after the checks is
        # not the one read; -f first: opening a planted FIFO would block
        'if [ -f "$hpcdl_file" ] && [ ! -L "$hpcdl_file" ]; then',
        '  { [ -f /dev/fd/9 ] && [ -O /dev/fd/9 ] && [ "$(stat -L -c %a /dev/fd/9)" = 600 ] &&'
        " IFS= read -r -d '' hpcdl_values <&9; } 2>/dev/null 9<\"$hpcdl_file\"",
        "fi",
        'if [ -z "$hpcdl_values" ]; then',
        f'  hpcdl_rc=1; printf {refused} "$hpcdl_file" >&2',
        "else",
        '  eval "$hpcdl_values"',
    ]
    if offset is not None:  # after the job's env, as the runner: hpcdl's index wins
        index = f"$(({offset} + SLURM_ARRAY_TASK_ID))" if array else str(offset)
        lines.append(f"  export HPCDL_ARRAY_TASK_ID={index}")
    lines += [
        '  cd -- "$hpcdl_cwd" && "${hpcdl_argv[@]}"',
        "  hpcdl_rc=$?",
        # quoted: the job's env may set IFS
        '  [ "$hpcdl_rc" -eq 0 ] ||'
        ' printf \'hpcdl: command %s exited with status %s\\n\' "$hpcdl_what" "$hpcdl_rc" >&2',
        "fi",
        'if [ "$hpcdl_rc" -eq 0 ]; then hpcdl_outcome=success; else hpcdl_outcome=error; fi',
        # atomic, as record_outcome: a reader sees no record or a whole one
        'printf \'{"outcome": "%s", "job_id": "%s", "task": 0}\\n\' "$hpcdl_outcome" '
        f'"$hpcdl_id" > {record}.tmp && mv -f -- {record}.tmp {record}',
        'exit "$hpcdl_rc"',
    ]
    return "\n".join(lines)


def part_parameters(params: dict[str, Any], count: int | None, throttle: int | None,
                    dependency: str | None) -> dict[str, Any]:  # fmt: skip
    """submitit's sbatch parameters for one Slurm job or array of a direct submission: what
    submitit's own array submission sets (``map_count``; a one-task part is a plain job)."""
    out = {**params, "use_srun": False}  # a None in params means something (wckey: none)
    out.pop("srun_args", None)  # no step is started
    out.pop("dependency", None)
    if dependency:
        out["dependency"] = dependency
    if count is not None and count > 1:
        out["map_count"] = count
    if throttle:
        out["array_parallelism"] = throttle
    return out


def direct_script(
    request: Request, site: SiteProfile, folder: Path, params: dict[str, Any],
    plan: PartPlan | None, dependency: str | None = None,
) -> str:  # fmt: skip
    """The whole batch script of one Slurm job or array (``plan``: a part of an array) of a
    direct request: submitit's own header (``params``: the back end's sbatch parameters), the
    setup lines, then :func:`command_body` (which reads :data:`COMMAND_FILE`, written by
    :func:`write_command_file` at submission: rendering writes nothing)."""
    from submitit.slurm.slurm import _make_sbatch_string

    count, array = (plan.count, plan.count > 1) if plan else (None, False)
    throttle, offset = (plan.throttle, plan.offset) if plan else (None, None)
    params = part_parameters(params, count, throttle, dependency or params.get("dependency"))
    body = command_body(folder, offset, array)
    return sbatch_quoting(_make_sbatch_string(command=body, folder=folder, **params))
