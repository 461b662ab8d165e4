"""Site secrets (API keys, tokens): where their values come from, and the check that keeps them
out of everything hpcdl writes.

A site profile lists its secrets by name (``secrets: [WANDB_API_KEY]``: the value comes from the
environment, the submitting shell's through Slurm's ``--export=ALL``) or by name and file
(``{name: HF_TOKEN, file: ~/.config/hpcdl/hf_token}``: the job reads the file on the compute
node when it starts). A value never passes through hpcdl: the job script names the file, not its
content. At submission the values are read once, only to refuse a job that carries one in its
``env``, ``setup``, command or name (those are written to the script, the job folder, run
configs and, for local jobs, command lines).
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import stat
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, field_validator

from hpcdl.errors import ConfigError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Shorter values are not looked for: a 3-character "secret" would match ordinary words, paths
# and numbers in every job. Real API keys and tokens are 20-100 characters.
MIN_CHECKED_LENGTH = 8
MAX_SECRET_BYTES = 64 * 1024


class Secret(BaseModel):
    """One secret: an environment variable ``name`` the job gets, from the environment or from
    ``file`` (``~`` and ``$VARS`` expanded where hpcdl submits; the job reads the same path)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    file: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _ENV_NAME.match(v):
            raise ValueError(f"invalid environment variable name {v!r}")
        return v

    @field_validator("file")
    @classmethod
    def _file(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(c in v for c in "\n\r\0")):
            raise ValueError("must be a path on one line")
        return v

    @property
    def path(self) -> Path | None:
        if self.file is None:
            return None
        return Path(os.path.expandvars(os.path.expanduser(self.file))).absolute()

    def __str__(self) -> str:
        return self.name if self.file is None else f"{self.name} (file {self.file})"

    def shell_line(self) -> str | None:
        """The job script's line that sets the variable from the file at run time (on the node,
        so the value is in no file hpcdl writes and on no command line); None for environment
        secrets, which Slurm's ``--export=ALL`` carries."""
        if self.path is None:
            return None
        return f'{self.name}="$(cat -- {shlex.quote(str(self.path))})" && export {self.name}'


def _as_secret(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


SecretEntry = Annotated[Secret, BeforeValidator(_as_secret)]
"""A ``secrets:`` entry: ``NAME`` or ``{name: NAME, file: PATH}``."""


def read_secret_file(secret: Secret, where: str, field: str | None = None) -> str:
    """The content of a secret's file (one trailing newline dropped), refused unless it is a
    regular file owned by this user and private to them (no group or other permission bits):
    a key others can read is no longer a secret, and one they own could be swapped. Errors
    name ``field`` (default ``secrets.NAME``)."""
    path, field = secret.path, field or f"secrets.{secret.name}"
    assert path is not None
    try:  # O_NOFOLLOW: the checks below are about the file opened, not a link's target
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(where, field, f"file {path} not found") from None
    except OSError as exc:
        reason = (
            "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror})"
        )
        raise ConfigError(where, field, f"file {path} {reason}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(where, field, f"{path} is not a regular file")
        if info.st_uid != os.getuid():
            raise ConfigError(
                where,
                field,
                f"file {path} is owned by uid {info.st_uid}, not by you ({os.getuid()})",
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise ConfigError(
                where,
                field,
                f"file {path} has mode {mode:04o}: others may read it (chmod 600 {path})",
            )
        data = f.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise ConfigError(where, field, f"file {path} is larger than 64 KiB")
    return data.decode(errors="replace").removesuffix("\n")


def secret_values(secrets: list[Secret], where: str) -> dict[str, str]:
    """Each secret's value as a job submitted now would get it (files checked and read; the
    environment's for the others; secrets without a value left out)."""
    values = {}
    for secret in secrets:
        value = read_secret_file(secret, where) if secret.file else os.environ.get(secret.name)
        if value:
            values[secret.name] = value
    return values


def check_no_secrets(
    secrets: list[Secret], fields: dict[str, str], where: str, profile: str
) -> None:
    """Refuse when a field (``env.X``, ``setup``, ``command``, ``name``: text hpcdl writes)
    holds a secret's name as a variable or its value anywhere in it. The value is never shown."""
    for secret in secrets:
        field = f"env.{secret.name}"
        if field in fields:
            how = f"the job reads it from {secret.file}" if secret.file else "export it in your shell instead"  # fmt: skip
            raise ConfigError(where, field, f"is a secret on this site: {how}")
    values = secret_values(secrets, f"site profile {profile!r}")
    for field, text in fields.items():
        for name, value in values.items():
            if len(value) >= MIN_CHECKED_LENGTH and value in text:
                raise ConfigError(
                    where,
                    field,
                    f"holds the value of secret {name} (not shown): the job gets {name} from "
                    "the site's secrets, never from env, setup lines or its command",
                )
