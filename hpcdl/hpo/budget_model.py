"""A sweep spec's ``budget`` (what is spent, and when sampling stops: :mod:`hpcdl.hpo.budget`).
Its own module, below the spec: the spending code reads the sweep folder, which reads specs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Budget(BaseModel):
    """``budget: {node_hours: 2}`` or ``budget: {gpu_hours: 8}`` in a sweep spec."""

    model_config = ConfigDict(extra="forbid")

    node_hours: float | None = Field(default=None, gt=0, le=1e7)
    gpu_hours: float | None = Field(default=None, gt=0, le=1e7)

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if (self.node_hours is None) == (self.gpu_hours is None):
            raise ValueError("give one of node_hours or gpu_hours (a number of hours > 0)")
        return self

    @property
    def hours(self) -> float:
        return self.node_hours if self.node_hours is not None else float(self.gpu_hours or 0)

    @property
    def unit(self) -> str:
        return "node-hours" if self.node_hours is not None else "GPU-hours"
