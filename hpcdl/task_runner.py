"""What runs inside each task of a job: the pickled payload submitit executes. A command job's
tasks get torch.distributed's variables by :mod:`hpcdl.rendezvous`, the rule
``hpcdl.launch.discover`` uses too, so a command job and ``init_distributed`` agree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpcdl.preemption import PreemptCheckpoint, checkpoint_on_preemption, slurm_task
from hpcdl.rendezvous import (
    in_slurm_step,
    local_layout,
    slurm_layout,
    torch_env,
    torchrun_rendezvous,
)

LAUNCHERS = ("srun", "torchrun")
# What every task of a multi-task command job sees (torchrun's names and meanings).
TORCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?\Z")


class CommandFailed(RuntimeError):
    """The job's command exited with a non-zero status."""


def launcher_env(launcher: str, env: Mapping[str, str]) -> dict[str, str]:
    """What a command task gets on top of its environment: torch.distributed's variables for
    ``srun`` when the step has several tasks (nothing for one task), torchrun's rendezvous for
    ``torchrun``; nothing outside a scheduler's task."""
    if "SUBMITIT_LOCAL_GLOBALID" in env:
        layout = local_layout(env)
    elif in_slurm_step(env):
        layout = slurm_layout(env)
    else:
        return {}
    if launcher == "torchrun":
        return torchrun_rendezvous(layout)
    return torch_env(layout) if layout.world_size > 1 else {}


def torchrun_argv(command: list[str], nnodes: int, nproc_per_node: int) -> list[str] | None:
    """``python SCRIPT ARGS`` or ``python -m MODULE ARGS`` as one torchrun per node (the same
    interpreter, ``python -m torch.distributed.run``); ``None`` for any other command."""
    if len(command) < 2 or not _PYTHON.match(Path(command[0]).name):
        return None
    if command[1] == "-m":
        if len(command) < 3 or not command[2] or command[2].startswith("-"):
            return None
        target = command[1:3]
        rest = command[3:]
    elif command[1].startswith("-"):
        return None
    else:
        target, rest = command[1:2], command[2:]
    return [
        command[0],
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        *target,
        *rest,
    ]


def _pmi_fds() -> tuple[int, ...]:
    """srun --mpi=pmi2 hands each task its PMI socket as ``PMI_FD``; keep it open in the command."""
    fd = os.environ.get("PMI_FD", "")
    if not fd.isdigit():
        return ()
    try:
        os.fstat(int(fd))
    except OSError:
        return ()
    return (int(fd),)


@dataclass
class Task:
    """Runs a command (argv, no shell) or a Python callable with extra environment variables.

    Values travel inside the pickle, never through a shell, so spaces, quotes, ``$(...)``,
    backticks and newlines arrive intact and execute nothing. A command with a ``launcher``
    also gets :func:`launcher_env`, except variables set in ``env``, which win.
    """

    argv: list[str] | None = None
    function: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    array_task_id: int | None = None
    launcher: str | None = None
    preempt: PreemptCheckpoint | None = None  # a Checkpointable callable in a REQUEUE partition
    # Records "success"/"error" for `hpcdl status` (the scheduler's record_outcome: JSON, so
    # status never loads submitit's result pickle).
    outcome: Callable[[str], None] | None = None

    @property
    def checkpoint(self) -> Callable[..., Any]:
        """submitit's ``checkpoint()`` protocol, present only when the wrapped callable has it:
        submitit's preemption handler checks ``hasattr(function, "checkpoint")``, and a wrapper
        that always had one would turn every other callable's requeue into a failure."""
        if self.function is None or not hasattr(self.function, "checkpoint"):
            raise AttributeError("checkpoint")
        return self._checkpoint

    def _checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Delegate (to ``__submitit_checkpoint__`` first, as submitit does) and wrap the returned
        ``DelayedSubmission`` again, so the requeued task keeps this task's environment."""
        fn: Any = self.function  # a Checkpointable: this method is bound only for those
        hook = getattr(fn, "__submitit_checkpoint__", None) or fn.checkpoint
        delayed = hook(*self.args, **self.kwargs)  # submitit passes this task's (empty) args
        if delayed is None:
            return None
        task = replace(
            self, function=delayed.function, args=tuple(delayed.args), kwargs=dict(delayed.kwargs)
        )
        return type(delayed)(task)  # submitit's DelayedSubmission, without importing it here

    def __call__(self) -> Any:
        record = self.outcome or (lambda outcome: None)
        try:
            result = self._run()
        except Exception:  # what submitit records as an error (a SystemExit is a requeue)
            record("error")
            raise
        record("success")
        return result

    def _run(self) -> Any:
        os.environ.update(self.env)
        task_id = self.array_task_id
        if task_id is None and (slurm := slurm_task()) is not None:
            task_id = slurm.array_task
        if task_id is not None:
            os.environ["HPCDL_ARRAY_TASK_ID"] = str(task_id)
        if self.function is not None:
            if self.preempt is not None and hasattr(self.function, "checkpoint"):
                checkpoint_on_preemption(self.preempt)
            return self.function(*self.args, **self.kwargs)
        assert self.argv is not None
        if self.launcher is not None:
            extra = launcher_env(self.launcher, os.environ)
            os.environ.update({k: v for k, v in extra.items() if k not in self.env})
        sys.stdout.flush()
        try:
            rc = subprocess.run(
                self.argv, cwd=self.cwd, check=False, pass_fds=_pmi_fds()
            ).returncode
        except FileNotFoundError:
            raise CommandFailed(f"program not found: {self.argv[0]!r}") from None
        if rc != 0:
            raise CommandFailed(f"command {self.argv[0]!r} exited with status {rc}")
        return rc
