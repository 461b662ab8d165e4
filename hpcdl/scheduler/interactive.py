"""Interactive allocations (``hpcdl alloc``): ``salloc`` under the site's policy, a shell (or a
command) on the allocation's first node through ``srun``. Slurm commands live in this package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from typing import IO, Any

from hpcdl.errors import HpcdlError
from hpcdl.scheduler._sbatch import slurm_parameters
from hpcdl.scheduler.interface import Request
from hpcdl.site import SiteProfile
from hpcdl.util import get_logger

log = get_logger(__name__)

# submitit's parameter names that are salloc options of the same name (underscores as dashes);
# the rest (setup lines, signal delay, srun_args, export) belong to batch scripts only.
_SALLOC_KEYS = ("job_name", "partition", "nodes", "ntasks_per_node", "cpus_per_task",
                "gpus_per_node", "gres", "mem", "account", "qos", "dependency")  # fmt: skip
# sbatch-only options salloc does not take (a batch script's output files, requeue, export).
_BATCH_ONLY = {"export", "requeue", "signal", "output", "error", "open-mode", "array"}


def salloc_argv(params: dict[str, Any], command: list[str]) -> list[str]:
    """``salloc OPTIONS srun ...`` for submitit parameters ``params`` (the ones a batch job of
    the same request gets, so the site's policy and limits apply alike); ``command`` runs on
    the first node, or a login shell under a pseudo-terminal when it is empty."""
    argv = ["salloc"]
    for key in _SALLOC_KEYS:
        value = params.get(key)
        if value not in (None, ""):
            argv.append(f"--{key.replace('_', '-')}={value}")
    if params.get("time"):
        argv.append(f"--time={params['time']}")  # minutes
    for key, value in sorted((params.get("additional_parameters") or {}).items()):
        key = key.replace("_", "-")
        if key in _BATCH_ONLY or value is False or value is None:
            continue
        argv.append(f"--{key}" if value is True else f"--{key}={value}")
    step = ["srun", "--nodes=1", "--ntasks=1"]
    if not command:  # a shell: a pty so that it is interactive; the user's own login shell
        return [*argv, *step, "--pty", os.environ.get("SHELL") or "/bin/bash", "-l"]
    return [*argv, *step, "--", *command]


def refusal(lines: list[str]) -> str | None:
    """salloc's own reason from its stderr lines (``salloc: error: ...``), the last one: the
    first is often the generic 'Job submit/allocate failed'."""
    errors = [ln.split("error:", 1)[1].strip() for ln in lines if ln.startswith("salloc: error:")]
    return errors[-1] if errors else None


def allocate(request: Request, site: SiteProfile, command: list[str]) -> int:
    """Run ``salloc`` for ``request`` with the terminal's stdin and stdout; salloc's and the
    step's stderr pass through as they come, and a refusal becomes one :class:`HpcdlError`
    line. Returns the command's (or shell's) exit status."""
    if shutil.which("salloc") is None:
        raise HpcdlError(f"site {site.name!r} uses Slurm but 'salloc' is not on PATH")
    argv = salloc_argv(slurm_parameters(request, site), command)
    log.debug("alloc: %s", argv)
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, errors="replace")
    seen: list[str] = []
    relay = threading.Thread(target=_relay, args=(proc.stderr, seen), daemon=True)
    relay.start()
    try:
        status = proc.wait()
    except KeyboardInterrupt:  # salloc got the same SIGINT and releases the allocation
        status = proc.wait(timeout=30)
    relay.join(timeout=5)
    granted = any("Granted job allocation" in ln for ln in seen)
    reason = refusal(seen)
    if status != 0 and not granted and reason:
        raise HpcdlError(f"salloc refused the allocation: {reason}")
    return status


def _relay(stream: IO[str] | None, seen: list[str]) -> None:
    """salloc's stderr line by line to ours (a refusal is shown once, as hpcdl's error)."""
    if stream is None:
        return
    for line in stream:
        granted = any("Granted job allocation" in ln for ln in seen)
        seen.append(line.rstrip("\n"))
        if granted or not line.startswith("salloc: error:"):
            sys.stderr.write(line)
            sys.stderr.flush()
