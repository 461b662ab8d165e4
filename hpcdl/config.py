"""Loading YAML files and validating them at the edge, with errors that name file and field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

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


_NODE_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*\Z")
NODE_RANGE_HELP = "a node count N or a range MIN-MAX with 1 <= MIN <= MAX (e.g. 2-4)"


def parse_node_range(value: object) -> tuple[int, int] | None:
    """``"MIN-MAX"`` (an elastic job's node counts, Slurm's ``--nodes=MIN-MAX``) as
    ``(MIN, MAX)``; ``None`` for anything else, a malformed or empty range included."""
    m = _NODE_RANGE.match(value) if isinstance(value, str) else None
    if m is None:
        return None
    low, high = int(m[1]), int(m[2])
    return (low, high) if 1 <= low <= high else None


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


# Bounds on YAML input (configs, sweep specs, site profiles, ``key=value`` overrides): a few
# hundred bytes of nested aliases expand to millions of nodes (a 368-byte file took 14 s and
# 1.2 GB in `hpcdl render`), and 20,000 nested brackets overflow Python's stack (a RecursionError
# traceback). Real configs are small, shallow and use an anchor a few times at most.
MAX_YAML_BYTES = 1024 * 1024  # a config file larger than 1 MiB is refused unread
MAX_YAML_DEPTH = 100  # nesting levels (mappings, lists)
MAX_ALIAS_NODES = 10_000  # nodes the aliases of one document add once expanded


class YAMLLimitError(yaml.MarkedYAMLError):
    """A YAML document over one of the bounds above (depth, alias expansion)."""


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that checks the bounds while it composes the node graph, before any
    Python object is built: each node's expanded size (aliases counted as the nodes they stand
    for) is known when the node is complete, so an alias bomb is refused at the first alias
    past the budget, whatever the size it would reach."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._alias_nodes = 0
        self._sizes: dict[int, int] = {}  # id(node) -> nodes once expanded; complete nodes only

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # undefined aliases: the composer's own error
                size = self._sizes.get(id(target))
                if size is None:  # an alias inside the node it names: a cycle
                    problem = f"alias *{event.anchor} refers to a node containing it"
                    raise self._limit(event, problem)
                self._alias_nodes += size
                if self._alias_nodes > MAX_ALIAS_NODES:
                    raise self._limit(
                        event, f"aliases expand to more than {MAX_ALIAS_NODES:,} nodes"
                    )
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise self._limit(event, f"nested deeper than {MAX_YAML_DEPTH} levels")
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        self._sizes[id(node)] = 1 + sum(self._sizes[id(c)] for c in children)
        return node

    @staticmethod
    def _limit(event: yaml.Event, problem: str) -> YAMLLimitError:
        return YAMLLimitError(None, None, problem, event.start_mark)


def load_yaml(text: str) -> Any:
    """One YAML document within the bounds (``YAMLLimitError``, a ``yaml.YAMLError``, if not)."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a file over 1 MiB, a syntax error, YAML over the
    depth or alias bounds or a non-mapping is a ConfigError (``FILE[:LINE]: problem``)."""
    if not path.is_file():
        raise ConfigError(str(path), "", "file not found")
    with open(path, "rb") as f:  # at most one byte past the bound is read
        raw = f.read(MAX_YAML_BYTES + 1)
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(
            str(path), "", f"larger than {MAX_YAML_BYTES // 2**20} MiB, the limit for a YAML file"
        )
    try:
        data = load_yaml(raw.decode())
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
            value = load_yaml(raw) if raw else ""
        except YAMLLimitError as exc:  # not a plain string either: refused
            raise ConfigError(where, key, f"invalid YAML value: {exc.problem}") from None
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


# ``user@host`` for ssh: no leading '-' anywhere (it would be read as an ssh option), no spaces,
# no shell characters (the same string is part of an rsync ``-e`` and of printed ssh lines).
_LOGIN_HOST = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*@)?[A-Za-z0-9][A-Za-z0-9.-]*\Z")
_PERSIST = re.compile(r"^\d+[smh]?\Z")


def _login_host(value: str) -> str:
    if not _LOGIN_HOST.match(value):
        raise ValueError(f"{value!r} is not user@host or host (letters, digits, '.', '-', '_')")
    return value


def _login_entry(value: object) -> object:
    return {"host": value} if isinstance(value, str) else value  # `login: user@host`


def _no_newline(value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError("must be one line")
    return value


class LoginNode(BaseModel):
    """A site profile's ``login:`` entry: the login node that remote mode runs commands on over
    SSH (``login: user@host``, or a mapping with the fields below). Keys and passwords stay in
    ssh's own files (``identity_file`` names one); nothing secret is written here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: Annotated[str, AfterValidator(_login_host)]
    port: int | None = Field(default=None, ge=1, le=65535)
    identity_file: Annotated[str, AfterValidator(_no_newline)] | None = None
    # ssh's UserKnownHostsFile: host keys are always checked (never StrictHostKeyChecking=no)
    known_hosts: Annotated[str, AfterValidator(_no_newline)] | None = None
    # the hpcdl command on the login node: a shell word list run by the login shell there
    hpcdl: Annotated[str, AfterValidator(_no_newline)] = "hpcdl"
    # where code snapshots go on the login node, relative to its home
    workdir: Annotated[str, AfterValidator(_no_newline)] = ".hpcdl/remote"
    persist: Annotated[str, AfterValidator(lambda v: _checked(_PERSIST, v, "e.g. 10m"))] = "10m"


def _checked(pattern: re.Pattern[str], value: str, allowed: str) -> str:
    if not pattern.match(value):
        raise ValueError(f"{value!r}: {allowed}")
    return value


LoginEntry = Annotated[LoginNode, BeforeValidator(_login_entry)]
"""``login: user@host`` or ``login: {host: user@host, port: 2222, ...}``."""
