"""A site's per-partition policy on sbatch options (``policy:`` in a profile's partition):
``defaults`` added when the job does not set them, ``required`` ones and ``denied`` ones; and what
``hpcdl site check`` says about a partition's node features."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from hpcdl.config import validation_error
from hpcdl.errors import ConfigError
from hpcdl.slurm_options.options import (
    NAMED,
    RESERVED,
    OptionValue,
    SbatchOptions,
    constraint_features,
    option_key,
)


def _field(key: str) -> str:
    """The job field that carries option ``key`` (for error messages)."""
    return key.replace("-", "_") if key in NAMED else f"sbatch.{key}"


def _how(key: str) -> str:
    return NAMED.get(key) or f"sbatch.{key} (--sbatch {key}=VALUE)"


def _policy_keys(keys: Any) -> Any:
    if not isinstance(keys, list | dict):
        return keys
    names = [option_key(k) for k in keys]
    for name in names:
        if name in RESERVED:
            raise ValueError(f"{name!r} is set by hpcdl, not by a site policy")
    return dict(zip(names, keys.values(), strict=True)) if isinstance(keys, dict) else names


class PartitionPolicy(BaseModel):
    """A site's rules for the sbatch options of jobs on one partition."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: dict[str, OptionValue] = {}  # added when the job does not set the option
    required: list[str] = []  # must be set (by the job or by defaults)
    denied: list[str] = []  # refused before queueing

    @field_validator("defaults", "required", "denied", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        return _policy_keys(v)

    @field_validator("defaults")
    @classmethod
    def _default_values(cls, v: dict[str, OptionValue]) -> dict[str, OptionValue]:
        named = {k.replace("-", "_"): x for k, x in v.items() if k in NAMED}
        generic = {k: x for k, x in v.items() if k not in NAMED}
        try:
            options = SbatchOptions.model_validate({**named, "sbatch": generic})
        except ValidationError as exc:
            err = validation_error(exc, "")
            raise ValueError(f"{err.field.replace('_', '-')}: {err.problem}") from None
        return options.sbatch_options()  # normalised as a job's own (mail types upper-case)

    @model_validator(mode="after")
    def _consistent(self) -> PartitionPolicy:
        clash = sorted(set(self.denied) & (set(self.required) | set(self.defaults)))
        if clash:
            raise ValueError(f"{clash[0]!r} is denied and also required or defaulted")
        return self

    def check(
        self, requested: dict[str, OptionValue], partition: str, where: str
    ) -> dict[str, OptionValue]:
        """The job's options with the defaults added (``False`` ones left out, a default too);
        ConfigError on a denied or missing one."""
        for key in self.denied:
            if requested.get(key) not in (None, False):
                raise ConfigError(
                    where,
                    _field(key),
                    f"partition {partition!r} does not allow --{key} (site policy)",
                )
        merged = {k: v for k, v in {**self.defaults, **requested}.items() if v is not False}
        for key in self.required:
            if key not in merged:
                raise ConfigError(
                    where,
                    _field(key),
                    f"partition {partition!r} requires --{key} (site policy): set {_how(key)}",
                )
        return merged


def check_job_options(job: Any, partition: Any, where: str) -> dict[str, OptionValue]:
    """A Slurm job's sbatch options after its partition's policy (``job`` is an ``hpcdl.Job``,
    ``partition`` a site profile ``Partition``); ConfigError before anything is queued."""
    gpus = job.gpus_per_task_count * job.ntasks_per_node
    if gpus > partition.gpus_per_node:
        raise ConfigError(
            where,
            "gpus_per_task",
            f"{job.ntasks_per_node} tasks x {job.gpus_per_task_count} GPUs = {gpus} exceeds "
            f"partition {partition.name!r} limit of {partition.gpus_per_node} GPUs per node",
        )
    merged = partition.policy.check(job.sbatch_options(), partition.name, where)
    features = partition.features
    if features is not None and "constraint" in merged:
        missing = sorted(constraint_features(str(merged["constraint"])) - set(features))
        if missing:
            raise ConfigError(
                where,
                "constraint",
                f"no node of partition {partition.name!r} offers feature {missing[0]!r} "
                f"(features: {', '.join(features) or 'none'})",
            )
    return merged


def feature_problems(
    partition: Any, live_features: list[str], node_features: list[list[str]] | None = None
) -> list[str]:
    """What ``hpcdl site check`` says about a profile partition's node features and its policy's
    default constraint, given the features the live cluster's nodes offer (all together, and
    ``node_features``: each node's)."""
    live = set(live_features)
    problems = []
    if partition.features is not None and set(partition.features) != live:
        here = ",".join(sorted(partition.features)) or "none"
        problems.append(
            f"partition {partition.name}: features {here} here, "
            f"{','.join(sorted(live)) or 'none'} on the cluster"
        )
    expr = partition.policy.defaults.get("constraint")
    missing = sorted(constraint_features(str(expr)) - live) if expr else []
    if missing:
        problems.append(
            f"partition {partition.name}: policy.defaults constraint {expr!r} needs feature "
            f"{missing[0]!r}, which no node offers (nodes offer: {', '.join(sorted(live)) or 'none'})"
        )
    elif expr and node_features:  # jobs given the default may use only the nodes that meet it
        met = [satisfies(str(expr), set(f)) for f in node_features]
        count, limit = met.count(True), partition.max_nodes or len(node_features)
        if None not in met and count < limit:
            problems.append(
                f"partition {partition.name}: policy.defaults constraint {expr!r} is met by "
                f"{count} of its {len(node_features)} nodes, fewer than max_nodes {limit}: a "
                f"job given this default can have at most {count} nodes"
            )
    return problems


def satisfies(expr: str, features: set[str]) -> bool | None:
    """Whether a node with ``features`` meets constraint ``expr`` (names joined by ``&``, ``|``
    and parentheses); None for what this does not read (counts ``*N``, matching OR ``[...]``,
    ``!``, ``,``): whether a set of nodes meets those is sbatch's to say."""
    tokens = re.findall(r"[A-Za-z0-9_.:-]+|[&|()]|\S", expr)
    pos = 0

    def term() -> bool:  # NAME or ( expr )
        nonlocal pos
        tok, pos = tokens[pos], pos + 1
        if tok == "(":
            value = any_of()
            if tokens[pos] != ")":
                raise ValueError(expr)
            pos += 1
            return value
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", tok):
            raise ValueError(expr)
        return tok in features

    def all_of() -> bool:
        nonlocal pos
        values = [term()]
        while pos < len(tokens) and tokens[pos] == "&":
            pos += 1
            values.append(term())
        return all(values)

    def any_of() -> bool:
        nonlocal pos
        values = [all_of()]
        while pos < len(tokens) and tokens[pos] == "|":
            pos += 1
            values.append(all_of())
        return any(values)

    try:
        value = any_of()
    except (ValueError, IndexError):
        return None
    return value if pos == len(tokens) else None
