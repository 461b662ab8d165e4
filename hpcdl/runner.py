"""What runs inside each task of a job: the pickled payload submitit executes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class CommandFailed(RuntimeError):
    """The job's command exited with a non-zero status."""


@dataclass
class Task:
    """Runs a command (argv, no shell) or a Python callable with extra environment variables.

    Values travel inside the pickle, never through a shell, so spaces, quotes, ``$(...)``,
    backticks and newlines arrive intact and execute nothing.
    """

    argv: list[str] | None = None
    function: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    array_task_id: int | None = None

    def __call__(self) -> Any:
        os.environ.update(self.env)
        task_id = self.array_task_id
        if task_id is None and "SLURM_ARRAY_TASK_ID" in os.environ:
            task_id = int(os.environ["SLURM_ARRAY_TASK_ID"])
        if task_id is not None:
            os.environ["HPCDL_ARRAY_TASK_ID"] = str(task_id)
        if self.function is not None:
            return self.function(*self.args, **self.kwargs)
        assert self.argv is not None
        sys.stdout.flush()
        try:
            rc = subprocess.run(self.argv, cwd=self.cwd, check=False).returncode
        except FileNotFoundError:
            raise CommandFailed(f"program not found: {self.argv[0]!r}") from None
        if rc != 0:
            raise CommandFailed(f"command {self.argv[0]!r} exited with status {rc}")
        return rc
