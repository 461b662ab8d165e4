"""What a trial measured and which trials are best: one metric, several (the Pareto front),
with constraints and warm-started trials set aside. Pure functions of values and directions,
so ``sweep best``, the final job and the report agree (and tables test them)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from hpcdl.errors import HpcdlError

#: The user attribute of a trial that came from ``warm_start`` (another sweep's or a file's):
#: prior knowledge for the sampler, never this sweep's best.
WARM = "hpcdl.warm_start"


def measured(result: Any, metrics: Sequence[str], constraints: Sequence[str]) -> dict[str, float]:
    """The objective's return as ``{name: value}`` for every objective and constraint: a number
    stands for the one objective (when there is no other name to give); a mapping must have
    every name, as finite numbers or infinities."""
    names = [*metrics, *constraints]
    if not isinstance(result, Mapping):
        if len(names) > 1:
            raise HpcdlError(f"the objective returned one number ({result!r}); the sweep records "
                             f"{', '.join(names)}: return a dict with each")  # fmt: skip
        result = {names[0]: result}
    out: dict[str, float] = {}
    for name in names:
        if name not in result:
            raise HpcdlError(f"the objective's result has no {name!r} (it has "
                             f"{', '.join(map(str, result)) or 'nothing'})")  # fmt: skip
        try:
            value = float(result[name])
        except (TypeError, ValueError):
            raise HpcdlError(
                f"the objective's {name!r} is not a number: {result[name]!r}"
            ) from None
        if math.isnan(value):
            raise HpcdlError(f"the objective's {name!r} is NaN")
        out[name] = value
    return out


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    better = [s * x for s, x in zip(signs, a, strict=True)]
    worse = [s * x for s, x in zip(signs, b, strict=True)]
    return all(x >= y for x, y in zip(better, worse, strict=True)) and better != worse


def front(points: Sequence[tuple[int, Sequence[float]]], directions: Sequence[str]) -> list[int]:
    """The keys of the points no other point dominates (ties all stay), in the given order."""
    return [k for k, v in points
            if not any(dominates(w, v, directions) for j, w in points if j != k)]  # fmt: skip


def feasible(constraints: Mapping[str, float]) -> bool:
    """Optuna's rule: every constraint value <= 0."""
    return all(v <= 0.0 for v in constraints.values())


def best_trials(trials: Sequence[Any], directions: Sequence[str]) -> list[Any]:
    """This sweep's best complete trials (Optuna ``FrozenTrial`` or alike: ``number``,
    ``state``, ``values``, ``constraints``, ``user_attrs``): the best one for one objective,
    the Pareto front for several; infeasible and warm-started trials never count."""
    own = [t for t in trials if t.state.name == "COMPLETE" and t.values is not None
           and WARM not in t.user_attrs and feasible(t.constraints)]  # fmt: skip
    if not own:
        return []
    if len(directions) == 1:
        # one objective: the first of the best values, in one pass (the front's pairwise
        # check was a third of `sweep best` on 10,000 trials)
        sign = 1.0 if directions[0] == "maximize" else -1.0
        top = max(sign * t.values[0] for t in own)
        return [next(t for t in own if sign * t.values[0] == top)]
    keys = front([(t.number, t.values) for t in own], directions)
    best = [t for t in own if t.number in keys]
    return best if len(directions) > 1 else best[:1]
