"""Population-based training: the spec's ``pbt:`` section and PBT's decisions, pure.

Every ``interval_epochs`` a trial records its value and a copy of its checkpoint; then it ranks
itself among the trials of the sweep that reached the same epoch (those running and those
finished: asynchronous PBT). A trial in the bottom ``quantile`` *exploits*: it takes the
checkpoint and the parameters of a trial of the top ``quantile`` that is strictly better, then
*explores*: each parameter of ``perturb`` is multiplied by one of ``factors`` (kept within its
range). The runtime is :mod:`hpcdl.hpo.pbt`; these functions are tested by tables in
``tests/unit/hpo/test_pbt.py``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator

from hpcdl.hpo.space import IntRange, Param, StrictModel, Uniform

#: Parameters a resumed checkpoint cannot take another value of: the data loader's position is
#: counted in batches of this size.
NEVER_PERTURBED = ("batch.", "epochs", "seed")


class PBT(StrictModel):
    interval_epochs: int = Field(ge=1)
    quantile: float = Field(default=0.25, gt=0, le=0.5)
    perturb: list[str] = Field(default_factory=list)  # empty: every numeric parameter
    factors: list[float] = Field(default_factory=lambda: [0.8, 1.2], min_length=1)

    @field_validator("factors")
    @classmethod
    def _positive(cls, factors: list[float]) -> list[float]:
        if any(f <= 0 for f in factors):
            raise ValueError(f"{factors}: perturbation factors multiply a value: give numbers > 0")
        return factors


def perturbed_names(space: Mapping[str, Param], pbt: PBT) -> list[str]:
    """The parameters explore changes: ``perturb``, else every numeric one of the space that a
    resume can take (not ``batch.*``)."""
    if pbt.perturb:
        return list(pbt.perturb)
    return [k for k, p in space.items()
            if isinstance(p, Uniform | IntRange) and not k.startswith(NEVER_PERTURBED)]  # fmt: skip


def donor(
    me: int, scores: Mapping[int, float], quantile: float, maximize: bool, rng: random.Random
) -> int | None:
    """The trial whose checkpoint trial ``me`` takes, or None (it keeps its own).

    ``scores``: each trial's value at this epoch (``me`` among them). With ``n`` of them, the
    best ``k = max(1, floor(n * quantile))`` are the top, the worst ``k`` the bottom; a trial in
    the bottom (and not in the top) takes one of the top that is strictly better, at random.
    Ties rank by trial number, the older first."""
    if me not in scores or len(scores) < 2:
        return None
    ranked = sorted(scores, key=lambda t: (-scores[t] if maximize else scores[t], t))
    k = max(1, int(len(ranked) * quantile))
    if me in ranked[:k] or me not in ranked[-k:]:
        return None
    better = [t for t in ranked[:k]
              if (scores[t] > scores[me] if maximize else scores[t] < scores[me])]  # fmt: skip
    return rng.choice(better) if better else None


def perturb(
    params: Mapping[str, Any],
    space: Mapping[str, Param],
    names: list[str],
    factors: list[float],
    rng: random.Random,
) -> dict[str, Any]:
    """``params`` with each of ``names`` multiplied by one of ``factors``, kept within its range
    (an int rounded onto its step); a name the trial has no value for (a conditional parameter
    off) is left out."""
    out = dict(params)
    for name in names:
        param, value = space[name], out.get(name)
        if value is None or not isinstance(param, Uniform | IntRange):
            continue
        moved = min(max(float(value) * rng.choice(factors), param.low), param.high)
        if isinstance(param, IntRange):
            steps = round((moved - param.low) / param.step)
            moved = min(param.low + steps * param.step, param.high)
            out[name] = int(moved)
        else:
            out[name] = moved
    return out


def rng_for(seed: int | None, trial: int, epoch: int) -> random.Random:
    """The random source of one decision: the same sweep decides the same way again."""
    return random.Random(f"{seed}-{trial}-{epoch}")
