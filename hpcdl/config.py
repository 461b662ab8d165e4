"""Loading YAML files and validating them at the edge, with errors that name file and field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ValidationError

from hpcdl.errors import ConfigError
from hpcdl.util import set_dotted

M = TypeVar("M", bound=BaseModel)

_TIME_RE = re.compile(r"^(?:(?P<d>\d+)-)?(?P<rest>\d+(?::\d+){0,2})\Z")
_UNIT_RE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*(?P<u>s|m|min|h|d)\Z", re.IGNORECASE)
_MEM_RE = re.compile(r"^(?P<n>\d+)(?P<u>[KMGT]?)B?\Z", re.IGNORECASE)


def parse_time(value: str | int) -> int | None:
    """Slurm time string → whole minutes (rounded up); ``None`` means unlimited.

    Accepts Slurm's forms ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``,
    plus ``30m``, ``2h``, ``1d``, ``90s`` and ``infinite``/``unlimited``.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid time {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"time must be positive, got {value}")
        return value
    text = str(value).strip()
    if text.lower() in {"infinite", "unlimited"}:
        return None
    unit = _UNIT_RE.match(text)
    if unit:
        n = float(unit["n"])
        factor = {"s": 1 / 60, "m": 1, "min": 1, "h": 60, "d": 1440}[unit["u"].lower()]
        minutes = -(-n * factor // 1)
    else:
        m = _TIME_RE.match(text)
        if not m:
            raise ValueError(
                f"invalid time {text!r} (use MM, HH:MM:SS, D-HH:MM:SS, 30m, 2h or 'infinite')"
            )
        parts = [int(p) for p in m["rest"].split(":")]
        if m["d"] is not None:  # D-HH[:MM[:SS]]
            parts += [0] * (3 - len(parts))
            h, mi, s = parts
            seconds = int(m["d"]) * 86400 + h * 3600 + mi * 60 + s
        elif len(parts) == 1:
            seconds = parts[0] * 60
        elif len(parts) == 2:
            seconds = parts[0] * 60 + parts[1]
        else:
            seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
        minutes = -(-seconds // 60)
    if minutes <= 0:
        raise ValueError(f"time must be positive, got {text!r}")
    return int(minutes)


def format_minutes(minutes: int | None) -> str:
    """Minutes → Slurm's ``D-HH:MM:SS`` (or ``infinite``)."""
    if minutes is None:
        return "infinite"
    d, rem = divmod(minutes, 1440)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h:02d}:{m:02d}:00"


def parse_mem(value: str | int) -> int:
    """Memory string (Slurm units: K, M, G, T; default M) → MiB."""
    if isinstance(value, bool):
        raise ValueError(f"invalid memory {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"memory must be positive, got {value}")
        return value
    m = _MEM_RE.match(str(value).strip())
    if not m or int(m["n"]) <= 0:
        raise ValueError(f"invalid memory {value!r} (use e.g. 500M, 16G, 1T)")
    n, u = int(m["n"]), (m["u"] or "M").upper()
    return max(1, {"K": n // 1024, "M": n, "G": n * 1024, "T": n * 1024 * 1024}[u])


def _slurm_time(value: str) -> str:
    parse_time(value)
    return value


def _finite_time(value: str) -> str:
    if parse_time(value) is None:
        raise ValueError("a job needs a finite time limit")
    return value


def _memory(value: str) -> str:
    parse_mem(value)
    return value


def _minutes_as_text(value: object) -> object:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


SlurmTime = Annotated[str, BeforeValidator(_minutes_as_text), AfterValidator(_slurm_time)]
"""A Slurm time limit (``infinite`` allowed), validated by :func:`parse_time`."""
JobTime = Annotated[str, BeforeValidator(_minutes_as_text), AfterValidator(_finite_time)]
"""A job's time limit: like :data:`SlurmTime` but finite."""
Memory = Annotated[str, AfterValidator(_memory)]
"""A Slurm memory size (``500M``, ``16G``), validated by :func:`parse_mem`."""


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a syntax error or a non-mapping is a ConfigError."""
    if not path.is_file():
        raise ConfigError(str(path), "", "file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(where, "", f"invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "not a text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            str(path), "", f"expected a mapping at top level, got {type(data).__name__}"
        )
    return data


def validate(model: type[M], data: dict[str, Any], where: str) -> M:
    """Validate ``data`` into ``model``; the first problem becomes one ConfigError line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, where) from None


def validation_error(exc: ValidationError, where: str) -> ConfigError:
    """Turn pydantic's error list into one line naming the field and what is allowed."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return ConfigError(where, field, "unknown field")
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
    more = len(exc.errors()) - 1
    tail = f" [+{more} more problem{'s' if more > 1 else ''}]" if more else ""
    return ConfigError(where, field, f"{msg}{shown}{tail}")


def apply_overrides(data: dict[str, Any], overrides: list[str], where: str) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a copy of ``data``."""
    out = _deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(where, item, "override must look like key=value or a.b=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        try:
            set_dotted(out, key, value)
        except ValueError as exc:
            # set_dotted names the dotted prefix ("a.b is not a mapping"); name its last part
            part = str(exc).removesuffix(" is not a mapping").rsplit(".", 1)[-1]
            raise ConfigError(
                where, key, f"'{part}' is not a mapping, cannot set '{key}'"
            ) from None
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data
