"""Warm start (``warm_start: SWEEP|FILE``): a new sweep's study begins with trials measured
elsewhere.

- Trials with values (another sweep's complete trials, or a file's entries with ``values``)
  are added as finished trials (``study.add_trial``) marked :data:`hpcdl.hpo.pareto.WARM`: the
  sampler learns from them at no cost, but they are never this sweep's best (they were measured
  by another sweep, maybe on another config), so the final job retrains one of its own.
- A file's entries without values are enqueued (``study.enqueue_trial``): this sweep's first
  trials run exactly those parameters.

Every trial is checked against this sweep's space (names, conditions, ranges) and objectives
before anything is written: a mismatch is one line naming the spec and ``warm_start``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from hpcdl.config import MAX_YAML_BYTES, load_yaml
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.hpo.conditions import active, draw_order, possible
from hpcdl.hpo.pareto import WARM
from hpcdl.hpo.space import Choice, Grid, IntRange, Uniform
from hpcdl.hpo.spec import SweepSpec, warm_start_is_file


@dataclass
class WarmTrial:
    params: dict[str, Any]
    values: dict[str, float] | None = None  # None: run it (enqueue)
    constraints: dict[str, float] = field(default_factory=dict)


def distribution(param: Any) -> optuna.distributions.BaseDistribution:
    """The distribution :func:`hpcdl.hpo.study.suggest` draws ``param`` from (the same one, or
    the samplers would see two spaces for one name)."""
    if isinstance(param, Choice | Grid):
        return optuna.distributions.CategoricalDistribution(param.values)
    if isinstance(param, Uniform):
        return optuna.distributions.FloatDistribution(
            param.low, param.high, log=param.type == "loguniform"
        )
    assert isinstance(param, IntRange)
    return optuna.distributions.IntDistribution(
        param.low, param.high, log=param.log, step=param.step
    )


def misfit(params: dict[str, Any], space: dict[str, Any]) -> str | None:
    """Why ``params`` cannot be a trial of ``space`` (None: it can): an unknown name, a
    parameter missing or present against its condition, a value the space cannot draw."""
    unknown = [k for k in params if k not in space]
    if unknown:
        return f"parameter {unknown[0]!r} is not in this sweep's space"
    drawn: dict[str, Any] = {}
    for key in draw_order(space):
        p, on = space[key], active(space[key].when, drawn)
        if not on:
            if key in params:
                return f"has {key!r}, which this space draws only when " + ", ".join(
                    f"{k}={v!r}" for k, v in p.when.items()
                )
            continue
        if key not in params:
            return f"lacks parameter {key!r}"
        value = params[key]
        if isinstance(p, Uniform):
            fits = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and p.low <= value <= p.high
            )
        else:
            fits = possible(p, value)
        if not fits:
            return f"{key}={value!r} is outside this sweep's space"
        drawn[key] = value
    return None


# Another sweep by name: its spec and study (Sweep.load does the opening and its ownership
# checks; passed in by the sweep, which sits above this module).
OpenSweep = Callable[[str], tuple[SweepSpec, optuna.Study]]


def load_warm(spec: SweepSpec, where: str, open_sweep: OpenSweep) -> list[WarmTrial]:
    """The trials ``spec.warm_start`` names, each checked against the spec (ConfigError)."""
    source = spec.warm_start
    if source is None:
        return []
    try:
        trials = (
            _from_file(Path(source), spec)
            if warm_start_is_file(source)
            else _from_sweep(source, spec, open_sweep)
        )
    except HpcdlError as exc:
        raise ConfigError(where, "warm_start", str(exc)) from None
    for i, t in enumerate(trials):
        why = misfit(t.params, spec.space)
        if why is not None:
            raise ConfigError(where, "warm_start", f"{source}: trial {i} {why}")
    enqueued = sum(t.values is None for t in trials)
    if enqueued > spec.trials:
        raise ConfigError(where, "warm_start", f"{source}: {enqueued} parameter sets to run but "
                          f"trials is {spec.trials}")  # fmt: skip
    return trials


def _from_sweep(name: str, spec: SweepSpec, open_sweep: OpenSweep) -> list[WarmTrial]:
    old_spec, old_study = open_sweep(name)
    if old_spec.metrics != spec.metrics or old_spec.directions != spec.directions:
        raise HpcdlError(f"sweep {name!r} optimises {_goals(old_spec)}, this one "
                         f"{_goals(spec)}: warm start needs the same objectives")  # fmt: skip
    done = [t for t in old_study.get_trials(deepcopy=False,
                                              states=(optuna.trial.TrialState.COMPLETE,))
            if WARM not in t.user_attrs]  # fmt: skip
    out = []
    for t in done:
        lacking = [c for c in spec.constraints if c not in t.constraints]
        if lacking:
            raise HpcdlError(f"sweep {name!r} recorded no {lacking[0]!r} (a constraint here)")
        out.append(WarmTrial(dict(t.params), dict(zip(spec.metrics, t.values, strict=True)),
                             {c: t.constraints[c] for c in spec.constraints}))  # fmt: skip
    if not out:
        raise HpcdlError(f"sweep {name!r} has no complete trial to start from")
    return out


def _goals(spec: SweepSpec) -> str:
    return ", ".join(f"{m} ({d})" for m, d in zip(spec.metrics, spec.directions, strict=True))


def _from_file(path: Path, spec: SweepSpec) -> list[WarmTrial]:
    """A JSON or YAML list (or ``{trials: [...]}``) of ``{params: {...}, values: {...}}``;
    ``values`` has every objective and constraint, or is left out (the trial is run)."""
    if not path.is_file():
        raise HpcdlError(f"no file {path}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise HpcdlError(f"{path} is over {MAX_YAML_BYTES} bytes")
    try:  # JSON is YAML; the bounded loader refuses alias bombs and deep nesting
        data = load_yaml(path.read_text())
    except (yaml.YAMLError, ValueError) as exc:
        raise HpcdlError(f"{path}: not JSON or YAML ({str(exc).splitlines()[0]})") from None
    items = data.get("trials") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise HpcdlError(f"{path}: give a list of trials ({{params: ..., values: ...}})")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("params"), dict):
            raise HpcdlError(f"{path}: trial {i} has no `params` mapping")
        values = item.get("values")
        if values is None:
            out.append(WarmTrial(item["params"]))
            continue
        if not isinstance(values, dict):
            raise HpcdlError(f"{path}: trial {i}: `values` maps each objective to its value")
        names = [*spec.metrics, *spec.constraints]
        missing = [n for n in names if not isinstance(values.get(n), int | float)]
        if missing:
            raise HpcdlError(f"{path}: trial {i}: `values` has no number for {missing[0]!r}")
        out.append(WarmTrial(item["params"], {m: float(values[m]) for m in spec.metrics},
                             {c: float(values[c]) for c in spec.constraints}))  # fmt: skip
    return out


def apply(study: optuna.Study, spec: SweepSpec, trials: list[WarmTrial]) -> None:
    """Add the measured trials to the study and enqueue the others (checked by load_warm)."""
    for t in trials:
        if t.values is None:
            study.enqueue_trial(t.params)
            continue
        study.add_trial(optuna.trial.create_trial(
            params=t.params,
            distributions={k: distribution(spec.space[k]) for k in t.params},
            values=[t.values[m] for m in spec.metrics],
            constraints=t.constraints or None,
            user_attrs={WARM: spec.warm_start},
        ))  # fmt: skip
