"""One rule for every value that reaches a batch script.

sbatch reads a script line by line: ``#SBATCH`` directives until the first line that is not a
comment, then bash runs the rest. A value that carries a newline (or a carriage return, a NUL,
any other control character) into that text can end one directive and start another, or end the
directive block early so that hpcdl's own ``--time``, ``--output`` and ``--signal`` lines are never
read. So every field whose value is written into the script is, before anything is written:

- **one line**: no C0/C1 control character and no Unicode line or paragraph separator (refused,
  naming the field; never silently cleaned up, so what is queued is what was asked for);
- **shape-checked** where Slurm has a shape (account, QoS and partition names, always, not only
  when a profile lists the allowed values);
- **quoted as one sbatch argument** (submitit's ``shlex.quote`` per directive; setup lines are the
  user's own shell code and stay as they are, one line each, never a ``#SBATCH`` directive).

Values that do not reach the script text (a command's arguments, ``env`` values: both travel in the
pickled task) may hold anything, newlines included.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
from typing import Annotated

from pydantic import AfterValidator

# C0 and C1 controls, DEL, and the separators some readers take for line ends (NEL is C1).
_NOT_ONE_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Slurm's account, QoS, partition and reservation names: sacctmgr and slurm.conf allow letters,
# digits and a few marks; nothing a shell or sbatch's option parser would read specially.
_SLURM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,127}")
# sbatch reads a directive wherever a line starts with it, also after a blank or comment line.
_DIRECTIVE = re.compile(r"\s*#\s*SBATCH", re.IGNORECASE)


def check_one_line(value: str) -> str:
    """``value`` if it is one line, else ValueError saying which character is where."""
    bad = _NOT_ONE_LINE.search(value)
    if bad:
        raise ValueError(
            f"must be one line: {bad.group()!r} at position {bad.start()} "
            "(no newline or other control character)"
        )
    return value


def check_slurm_name(value: str) -> str:
    """``value`` if it is a Slurm name (account, QoS, partition): letters, digits, ``_.+-``."""
    check_one_line(value)
    if not _SLURM_NAME.fullmatch(value):
        raise ValueError(
            "not a Slurm name (letters, digits, '_', '.', '+', '-'; "
            "at most 128 characters, not starting with a mark)"
        )
    return value


def check_setup_line(value: str) -> str:
    """A setup line: one line of shell that sbatch cannot take for a directive."""
    check_one_line(value)
    if _DIRECTIVE.match(value):
        raise ValueError(
            "must not be an #SBATCH directive (sbatch would read it as one): "
            "use the job's fields or --sbatch KEY=VALUE"
        )
    if re.search(r"(?<!\\)(\\\\)*\\\Z", value):
        raise ValueError("must not end in a backslash (it would join the next line of the script)")
    if not _complete_shell(value):
        raise ValueError("is not a complete line of shell (an unclosed quote or bracket?)")
    return value


@functools.lru_cache(maxsize=1024)
def _complete_shell(line: str) -> bool:
    """Whether bash reads ``line`` alone as complete, valid shell: an unclosed quote would
    swallow the lines after it (the task's own srun line among them), a stray ``)`` or an
    unfinished ``if`` would stop the script before the tasks start. bash itself decides (no
    reimplementation of its grammar); without bash, shlex's quote check stands in."""
    if not shutil.which("bash"):
        try:
            shlex.split(line, comments=True)
            return True
        except ValueError:
            return False
    proc = subprocess.run(["bash", "-n"], input=line.encode() + b"\n", capture_output=True,
                          timeout=10)  # fmt: skip
    return proc.returncode == 0


OneLine = Annotated[str, AfterValidator(check_one_line)]
"""A string written into the batch script: one line."""
SlurmName = Annotated[str, AfterValidator(check_slurm_name)]
"""An account, QoS or partition name."""
SetupLine = Annotated[str, AfterValidator(check_setup_line)]
"""One line of shell run before the tasks (job, site, or sweep setup)."""


def chain_local_setup(lines: list[str]) -> list[str]:
    """Setup lines for submitit's local executor, which joins them with `` && `` into one shell
    command: each line as a ``{ ...; }`` group ending in a newline, so that a trailing ``# note``
    comments out only its own line, not the rest of the chain (and the program itself)."""
    return [f"{{ {line}\n}}" for line in lines if not line.lstrip().startswith("#")]
