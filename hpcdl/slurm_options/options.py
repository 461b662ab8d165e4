"""Extra sbatch options a job asks for, and the per-partition policy a site sets on them.

A job (``hpcdl.Job``, a training config's ``job:``, a sweep's ``resources:``) names the common
options as fields (``constraint``, ``exclusive``, ...) and anything else in the ``sbatch`` map;
options hpcdl sets itself (``array``, ``output``, ``time``, ...) are refused there with the field
to use instead. A site profile's partition says, in ``policy``, which options are added when the
job does not set them (``defaults``), must be present (``required``) or are refused (``denied``).
Everything is keyed by sbatch's long option name (``gpus-per-task``); ``_`` is accepted for ``-``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from hpcdl.config import JobTime, Memory, format_minutes, parse_time
from hpcdl.script_values import check_one_line

OptionValue = bool | int | str
"""A value in the generic ``sbatch`` map: ``true`` is a bare flag, ``false`` leaves it out."""

# sbatch's long option name -> the job field that sets it (and its CLI flag).
NAMED: dict[str, str] = {
    "constraint": "constraint (--constraint/-C)",
    "exclusive": "exclusive (--exclusive)",
    "reservation": "reservation (--reservation)",
    "gpus-per-task": "gpus_per_task (--gpus-per-task)",
    "gpu-bind": "gpu_bind (--gpu-bind)",
    "mem-per-gpu": "mem_per_gpu (--mem-per-gpu)",
    "exclude": "exclude (--exclude/-x)",
    "time-min": "time_min (--time-min)",
    "nodelist": "nodelist (--nodelist/-w)",
    "mail-type": "mail_type (--mail-type)",
    "mail-user": "mail_user (--mail-user)",
    "begin": "begin (--begin)",
    "comment": "comment (--comment)",
}
_LOGS = "nothing: hpcdl writes the logs into the job folder ('hpcdl logs')"
# Options hpcdl renders itself: a second value would contradict (or silently override) it.
RESERVED: dict[str, str] = {
    "array": "array (--array) and throttle (--throttle)",
    "job-name": "name (--name/-J)",
    "nodes": "nodes (--nodes/-N)",
    "ntasks": "tasks_per_node (--tasks-per-node/-n)",
    "ntasks-per-node": "tasks_per_node (--tasks-per-node/-n)",
    "time": "time (--time/-t)",
    "partition": "partition (--partition/-p)",
    "account": "account (--account/-A)",
    "qos": "qos (--qos/-q)",
    "cpus-per-task": "cpus_per_task (--cpus-per-task/-c)",
    "mem": "mem (--mem)",
    "gpus-per-node": "gpus_per_node (--gpus-per-node/-G)",
    "gpus": "gpus_per_node (--gpus-per-node/-G)",
    "gres": "gpus_per_node (--gpus-per-node/-G; the site profile names the GRES)",
    "dependency": "dependencies (--after)",
    "requeue": "requeue (--requeue)",
    "no-requeue": "requeue (--no-requeue)",
    "signal": "the site profile's preemption.signal",
    "export": "env (--env)",
    "chdir": "cwd",
    "output": _LOGS,
    "error": _LOGS,
    "open-mode": _LOGS,
    "wrap": "the command after --",
    "parsable": "hpcdl submit --parsable",
    "test-only": "hpcdl submit --test-only",
    "wait": "nothing: hpcdl submit returns at once (wait on the handle instead)",
}
_KEY = re.compile(r"^[a-z][a-z0-9-]+\Z")
_FEATURES = re.compile(r"^[A-Za-z0-9_.:&|,\[\]()*!-]+\Z")
_OPERATORS = re.compile(r"[&|,\[\]()!]+")
_HOSTLIST = re.compile(r"^[A-Za-z0-9_.\-\[\],]+\Z")
_NAMES = re.compile(r"^[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*\Z")
_GPU_BIND = re.compile(
    r"^(verbose,)?(closest|none|single:\d+|per_task:\d+|map_gpu:[0-9,*x]+|mask_gpu:[0-9a-fA-Fx,*]+)$"
)
_GPUS = re.compile(r"^(?:[A-Za-z0-9_.-]+:)?([1-9]\d*)\Z")
_MAIL_TYPES = (  # noqa: SIM905 (sbatch's list, as its man page prints it)
    "NONE BEGIN END FAIL REQUEUE ALL INVALID_DEPEND STAGE_OUT TIME_LIMIT TIME_LIMIT_90 "
    "TIME_LIMIT_80 TIME_LIMIT_50 ARRAY_TASKS"
).split()
_MAIL_USER = re.compile(r"^[A-Za-z0-9_.+\-]+(@[A-Za-z0-9.\-]+)?\Z")
_BEGIN_WORDS = {"now", "today", "tomorrow", "midnight", "noon", "elevenses", "fika", "teatime"}
_BEGIN_NOW = re.compile(r"^now\+\d+(?:(?:second|minute|hour|day|week)s?)?\Z", re.IGNORECASE)
_BEGIN_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%H:%M", "%H:%M:%S")


def option_key(key: str) -> str:
    """sbatch's long option name for ``key`` (``gpus_per_task``, ``--gpus-per-task``)."""
    name = str(key).strip().removeprefix("--").replace("_", "-").lower()
    if not _KEY.match(name):
        raise ValueError(
            f"{key!r} is not an sbatch long option name (use e.g. mem-bind or cpus-per-gpu)"
        )
    return name


def generic_key(key: str) -> str:
    """A key allowed in the generic map: not one hpcdl sets, not one with its own field."""
    name = option_key(key)
    if name in RESERVED:
        raise ValueError(f"{name!r} is set by hpcdl: use {RESERVED[name]}")
    if name in NAMED:
        raise ValueError(f"{name!r} has its own field: use {NAMED[name]}")
    return name


def _one_line(value: OptionValue) -> OptionValue:
    if isinstance(value, str):
        try:
            if not value.strip():
                raise ValueError("it is empty")
            check_one_line(value)
        except ValueError as exc:
            raise ValueError(f"value {value!r} must be one non-empty line ({exc})") from None
    return value


def constraint_features(expr: str) -> set[str]:
    """The feature names in a constraint expression (``intel&ib``, ``[a100*2|h100*2]``)."""
    tokens = (tok.split("*")[0].strip() for tok in _OPERATORS.split(expr))  # a100*2: count 2
    return {tok for tok in tokens if tok}


def _begin(value: str) -> str:
    text = check_one_line(value).strip()
    if text.lower() in _BEGIN_WORDS or _BEGIN_NOW.match(text):
        return text
    for fmt in _BEGIN_FORMATS:
        try:
            datetime.strptime(text, fmt)
            return text
        except ValueError:
            continue
    raise ValueError(
        "use YYYY-MM-DD[THH:MM[:SS]], HH:MM[:SS], now+N[minutes|hours|days|weeks], "
        "midnight, noon, teatime, today or tomorrow"
    )


class SbatchOptions(BaseModel):
    """The sbatch options a job may add (named for the common ones, ``sbatch`` for any other)."""

    model_config = ConfigDict(extra="forbid")

    constraint: str | None = None
    exclusive: bool | str | None = None  # true, or Slurm's user, mcs, topo
    reservation: str | None = None
    gpus_per_task: int | str | None = None
    gpu_bind: str | None = None
    mem_per_gpu: Memory | None = None
    # the least time the job may be given (Slurm then starts it in a shorter backfill window)
    time_min: JobTime | None = None
    exclude: str | None = None
    nodelist: str | None = None
    mail_type: str | None = None
    mail_user: str | None = None
    begin: str | None = None
    comment: str | None = None
    sbatch: dict[str, OptionValue] = {}

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, v: str | None) -> str | None:
        if v is not None and (not _FEATURES.match(v) or not constraint_features(v)):
            raise ValueError(
                "must be node features joined by & | , with optional [ ] ( ) and *COUNT "
                "(e.g. a100, intel&ib, [rack1|rack2])"
            )
        return v

    @field_validator("exclusive", mode="before")
    @classmethod
    def _exclusive(cls, v: Any) -> Any:
        text = str(v).lower()
        if v is None or isinstance(v, bool) or text in {"user", "mcs", "topo"}:
            return v if v is None or isinstance(v, bool) else text
        if text in {"true", "yes", "false", "no"}:
            return text in {"true", "yes"}
        raise ValueError("must be true, false, user, mcs or topo")

    @field_validator("reservation")
    @classmethod
    def _reservation(cls, v: str | None) -> str | None:
        if v is not None and not _NAMES.match(v):
            raise ValueError(
                "must be reservation names (letters, digits, '_', '.', '-'), comma-separated"
            )
        return v

    @field_validator("gpus_per_task", mode="before")
    @classmethod
    def _gpus_per_task(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not _GPUS.match(str(v)):
            raise ValueError("must be a GPU count >= 1 or TYPE:COUNT (e.g. 1 or a100:1)")
        return int(v) if str(v).isdigit() else str(v)

    @field_validator("gpu_bind")
    @classmethod
    def _gpu_bind(cls, v: str | None) -> str | None:
        if v is not None and not _GPU_BIND.match(v):
            raise ValueError(
                "must be closest, none, single:N, per_task:N, map_gpu:LIST or mask_gpu:LIST "
                "(optionally after 'verbose,')"
            )
        return v

    @field_validator("exclude", "nodelist", mode="before")
    @classmethod
    def _hostlist(cls, v: Any) -> Any:
        if isinstance(v, list):
            v = ",".join(str(x) for x in v)
        if v is not None and not _HOSTLIST.match(str(v)):
            raise ValueError("must be a Slurm host list such as node[1-3],gpu7")
        return v

    @field_validator("mail_type", mode="before")
    @classmethod
    def _mail_type(cls, v: Any) -> Any:
        if v is None:
            return v
        items = v if isinstance(v, list) else str(v).split(",")
        types = [str(t).strip().upper() for t in items]
        bad = [t for t in types if t not in _MAIL_TYPES]
        if bad or not types:
            raise ValueError(f"must be mail types from {', '.join(_MAIL_TYPES)}, comma-separated")
        return ",".join(types)

    @field_validator("mail_user")
    @classmethod
    def _mail_user(cls, v: str | None) -> str | None:
        if v is not None and not _MAIL_USER.match(v):
            raise ValueError("must be a user name or an e-mail address")
        return v

    @field_validator("begin", mode="before")
    @classmethod
    def _begin_time(cls, v: Any) -> Any:
        return None if v is None else _begin(str(v))

    @field_validator("comment")
    @classmethod
    def _comment(cls, v: str | None) -> str | None:
        if v is not None and len(check_one_line(v)) > 1000:
            raise ValueError("must be one line of at most 1000 characters")
        return v

    @field_validator("time_min")
    @classmethod
    def _time_min(cls, v: str | None) -> str | None:
        # as Slurm reads it: hpcdl's "30m" or "2h" are not sbatch time formats
        return None if v is None else format_minutes(parse_time(v))

    @field_validator("sbatch", mode="before")
    @classmethod
    def _generic(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for key, value in v.items():
            if value is None or isinstance(value, dict | list | float):
                raise ValueError(f"{key!r}: value must be a string, an integer or true/false")
            out[generic_key(key)] = _one_line(value)
        return out

    @model_validator(mode="after")
    def _consistent(self) -> SbatchOptions:
        # Slurm refuses --mem together with --mem-per-gpu/--mem-per-cpu at sbatch time
        given = self.sbatch_options()
        per = [k for k in ("mem-per-cpu", "mem-per-gpu") if given.get(k) not in (None, False)]
        if per and getattr(self, "mem", None):
            raise ValueError(f"mem and {per[0]} exclude each other: give one of them")
        if not hasattr(self, "gpus_per_node"):  # a policy's defaults: no resources to compare
            return self
        gpus = getattr(self, "gpus_per_node", 0) or self.gpus_per_task
        for key in ("mem_per_gpu", "gpu_bind"):
            if getattr(self, key) and not gpus:
                raise ValueError(f"{key} needs GPUs (gpus_per_node or gpus_per_task)")
        return self

    def sbatch_options(self) -> dict[str, OptionValue]:
        """Every option this job sets, by sbatch's long name; ``False`` renders nothing but
        overrides a site default (``exclusive: false`` on a partition that defaults to it)."""
        named = {key: getattr(self, key.replace("-", "_")) for key in NAMED}
        return {**{k: v for k, v in named.items() if v is not None}, **self.sbatch}

    @property
    def gpus_per_task_count(self) -> int:
        """GPUs each task asks for through ``gpus_per_task`` (0 without)."""
        return 0 if self.gpus_per_task is None else int(str(self.gpus_per_task).split(":")[-1])
