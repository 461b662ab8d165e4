"""A sweep's search space: the parameter kinds of a spec's ``space:`` and the error that names
its own field. Below :mod:`hpcdl.hpo.spec` (which validates a whole spec) and
:mod:`hpcdl.hpo.conditions` (the rules of ``when:``), which both use them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpecProblem(ValueError):
    """A spec problem that names its own field (``space.momentum.when``): ``load_spec`` reports
    it under that field instead of the spec's top level."""

    def __init__(self, field: str, problem: str):
        super().__init__(problem)
        self.field, self.problem = field, problem


class _Param(StrictModel):
    # draw this parameter only when every named parameter has one of the given values
    # (``when: {optimizer: sgd}``); otherwise the trial has no value for it
    when: dict[str, Any] | None = None


class Choice(_Param):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)


class Grid(_Param):
    type: Literal["grid"]
    values: list[Any] = Field(min_length=1)


class Uniform(_Param):
    type: Literal["uniform", "loguniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _range(self) -> Uniform:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self


class IntRange(_Param):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(default=1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> IntRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        return self


Param = Annotated[Choice | Grid | Uniform | IntRange, Field(discriminator="type")]
