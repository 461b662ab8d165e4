"""Container runtimes: how a site profile's ``container`` section wraps each task.

Three runtimes besides ``none``:

- ``apptainer``: a command becomes ``apptainer exec --bind SRC ... IMAGE CMD``; a Python callable
  is unpickled by ``apptainer exec ... IMAGE PYTHON``.
- ``pyxis`` (enroot through Slurm's SPANK plugin): ``srun --container-image=IMAGE
  --container-mounts=SRC:DST,...`` runs the whole task inside, commands and callables alike, so
  the image's ``python`` needs hpcdl (the task is a pickle that hpcdl's runner executes).
- ``charliecloud``: ``ch-run --bind=SRC[:DST] ... --cd=CWD IMAGE_DIR -- CMD`` for a command,
  ``ch-run ... IMAGE_DIR -- PYTHON`` for a callable. ``ch-run`` is unprivileged and runs a
  directory as the image (``env/container/build-image.sh`` builds one with debootstrap). It
  passes the environment through unchanged, so hpcdl's exported variables, the site's ``env``
  and the job's ``env`` arrive intact (values travel through ``execve``, never a shell); it only
  needs ``$USER``, which batch steps do not always have (:func:`setup_lines` sets it).

Everything here is rendering: nothing runs a container at submission time.

Slurm commands inside the image: a task that runs ``scontrol`` or ``sbatch`` needs the Slurm
client, its configuration and the munge socket in the image, which most images lack. The trainer
requeues itself after a preemption or time-limit checkpoint (``scontrol requeue``) and a sweep's
follow-up job submits the next round (``sbatch``), both from the Python that runs inside the
image: the decision (requeues left, which array task, the next round's job) is made there, and
pyxis runs the whole task inside. So instead of moving the commands out, the profile says whether
the image has the client (``slurm_client``, false by default) and :func:`check_slurm_client`
refuses, at submission, a job that would need one it lacks.
"""

from __future__ import annotations

import os
import shlex
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from hpcdl.errors import ConfigError

Runtime = Literal["none", "apptainer", "pyxis", "charliecloud"]
RUNTIMES: tuple[str, ...] = Runtime.__args__  # type: ignore[attr-defined]


class Container(BaseModel):
    """How jobs run inside a container, if at all. ``binds`` are ``SRC`` or ``SRC:DST`` (apptainer
    also takes ``SRC:DST:OPTS``); ``python`` is the interpreter inside the image that runs Python
    callables (``python3``; a site that binds its Python environment at the same path names that
    environment's ``bin/python``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtime: Runtime = "none"
    image: str | None = None
    binds: list[str] = []
    python: str = "python3"
    slurm_client: bool = False  # the image has sbatch/scontrol, /etc/slurm and the munge socket

    @model_validator(mode="after")
    def _consistent(self) -> Container:
        if self.runtime != "none" and not self.image:
            raise ValueError(f"runtime '{self.runtime}' needs an image")
        if self.runtime == "charliecloud" and self.image:
            _check_image_dir(self.image)
        for bind in self.binds:
            problem = bind_problem(self.runtime, bind)
            if problem:
                raise ValueError(f"bind {bind!r}: {problem}")
        if not self.python.strip() or (os.sep in self.python and not self.python.startswith("/")):
            raise ValueError(f"python {self.python!r}: give a command name or an absolute path")
        return self


def _check_image_dir(image: str) -> None:
    if not image.startswith("/"):
        raise ValueError(
            f"charliecloud image {image!r} must be an absolute path to an image directory"
        )


def bind_problem(runtime: str, bind: str) -> str | None:
    """What is wrong with one ``binds`` entry for ``runtime`` (``None`` when it is fine)."""
    parts = bind.split(":")
    most = 3 if runtime in {"apptainer", "none"} else 2
    if not bind or len(parts) > most or not all(parts):
        form = "SRC, SRC:DST or SRC:DST:OPTS" if most == 3 else "SRC or SRC:DST"
        return f"use {form}"
    if not all(p.startswith("/") for p in parts[:2]):
        return "paths must be absolute"
    if runtime == "pyxis" and "," in bind:
        return "pyxis joins binds with ',': a path must not contain one"
    return None


def check_job_image(runtime: str, image: str | None, where: str) -> None:
    """A job's own ``container`` must suit the site's runtime (one-line ConfigError)."""
    if image is None:
        return
    if runtime == "none":
        raise ConfigError(where, "container", "this site has no container runtime")
    if runtime == "charliecloud":
        try:
            _check_image_dir(image)
        except ValueError as exc:
            raise ConfigError(where, "container", str(exc)) from None


def check_slurm_client(
    container: Container, image: str | None, commands: str | None, where: str, instead: str = ""
) -> None:
    """Refuse (one-line ConfigError) a job whose tasks run the Slurm ``commands`` inside an
    image the profile does not declare ``slurm_client: true``; nothing to check outside one."""
    if not commands or container.runtime == "none" or not image or container.slurm_client:
        return
    raise ConfigError(
        where,
        "container.slurm_client",
        f"{commands} inside the {container.runtime} image {image}, which has no Slurm client "
        "(slurm_client: false in the site profile's container section): an admin who binds the "
        "Slurm client, /etc/slurm and the munge socket into the image sets slurm_client: true"
        + (f"; or {instead}" if instead else ""),
    )


def wrap_command(container: Container, image: str | None, argv: list[str], cwd: str) -> list[str]:
    """The command line each task of a command job runs (``argv`` unchanged outside containers
    and on pyxis, where srun itself enters the container)."""
    if not image:
        return argv
    if container.runtime == "apptainer":
        binds = [a for b in container.binds for a in ("--bind", b)]
        return ["apptainer", "exec", *binds, image, *argv]
    if container.runtime == "charliecloud":
        return [*_ch_run(container, image, cwd), *argv]
    return argv


def _ch_run(container: Container, image: str, cwd: str) -> list[str]:
    # ch-run starts in / unless told: --cd keeps the submission directory, as outside.
    binds = [f"--bind={b}" for b in container.binds]
    return ["ch-run", *binds, f"--cd={cwd}", image, "--"]


def interpreter(container: Container, image: str | None, cwd: str) -> str | None:
    """The interpreter line that unpickles a task inside the container (``None``: outside,
    by the submitting interpreter)."""
    if not image:
        return None
    if container.runtime == "apptainer":
        binds = [a for b in container.binds for a in ("--bind", b)]
        return shlex.join(["apptainer", "exec", *binds, image, container.python])
    if container.runtime == "charliecloud":
        return shlex.join([*_ch_run(container, image, cwd), container.python])
    if container.runtime == "pyxis":
        return shlex.quote(container.python)
    return None


def srun_args(container: Container, image: str | None) -> list[str]:
    """pyxis's srun options: every task (command or callable) starts inside the image."""
    if container.runtime != "pyxis" or not image:
        return []
    mounts = [f"--container-mounts={','.join(container.binds)}"] if container.binds else []
    return [f"--container-image={image}", *mounts]


def setup_lines(container: Container) -> list[str]:
    """Batch-script lines a runtime needs before the tasks start: ch-run refuses to run
    without ``$USER``, which Slurm does not set in every batch environment."""
    if container.runtime == "charliecloud":
        return ['export USER="${USER:-$(id -un)}"']
    return []


def annotate(script: str, container: Container, image: str | None, task_line: str) -> str:
    """The batch script with each task's command line in a comment under its first line, so
    ``render`` shows what runs inside the container (a command sits in the pickle, and pyxis
    takes the image as srun options). ``task_line``: the command, or the interpreter that
    unpickles a callable. Unchanged without a container."""
    if container.runtime == "none" or not image:
        return script
    if container.runtime == "pyxis":
        task_line = shlex.join(["srun", *srun_args(container, image), "..."]) + " " + task_line
    first, _, rest = script.partition("\n")
    comment = f"# hpcdl: each task runs ({container.runtime}): {task_line}".replace("\n", "\\n")
    has = container.slurm_client
    slurm = (
        f"# hpcdl: the image has {'the' if has else 'no'} Slurm client (container.slurm_client: "
        f"{str(has).lower()}): trainings that requeue (scontrol) and sweeps (sbatch) "
        + ("run them inside" if has else "are refused at submission")
    )
    return f"{first}\n{comment}\n{slurm}\n{rest}"
