"""The contract between a sweep and what it optimises: the :class:`Objective` protocol.

A spec's ``objective: module:name`` names an object with three methods: ``check`` (on the login
node, before anything is queued), ``run`` (one trial, on every rank of the trial's job) and
``final`` (retrain the best parameters and score them on held-out data). hpcdl's trainer is one
(:data:`hpcdl.hpo.objective.train_objective`); a plain ``function(params, ctx) -> float`` is
wrapped in :class:`FunctionObjective` (no check, no final).

Early ends are exceptions from ``ctx.report``: :class:`hpcdl.train.stop.StopTraining` with
``tag="pruned"`` when the pruner says so (``optuna.TrialPruned`` raised by an objective itself
counts too); :class:`TrialRequeued` when the trial's job was requeued. Every objective gets a
:class:`TrialContext`; both live here, with the protocol, not with the implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from hpcdl.errors import HpcdlError
from hpcdl.hpo.folder import Slot
from hpcdl.hpo.spec import SweepSpec
from hpcdl.preemption import StopFlag


class TrialRequeued(Exception):
    """The trial checkpointed on a preemption signal and its job was requeued: tell nobody."""


@dataclass
class TrialContext:
    """Handed to the objective: parameters, where to write, and how to report progress."""

    spec: SweepSpec
    slot: Slot
    trial_dir: Path
    report: Callable[[int, float], None]
    # a warm worker's preemption flag, installed once for all its trials (None: the objective's
    # run installs its own)
    flag: StopFlag | None = None
    # records one decision in the trial's slot (``Slot.pbt``: population-based training's)
    note: Callable[[dict[str, Any]], None] | None = None


@runtime_checkable
class Objective(Protocol):
    """What a sweep runs: ``check`` before submission, ``run`` per trial, ``final`` once."""

    def check(self, spec: SweepSpec) -> None:
        """Raise ``ConfigError`` if the spec cannot work (bad paths, unknown metric, ...)."""

    def run(self, params: dict[str, Any], ctx: TrialContext) -> float | dict[str, float]:
        """Train or evaluate with ``params``; call ``ctx.report(epoch, value)`` as it goes;
        return the metric, or ``{name: value}`` with every objective and constraint of the
        spec (:func:`hpcdl.hpo.pareto.measured`)."""

    def final(self, params: dict[str, Any], spec: SweepSpec, out_dir: Path) -> dict[str, Any]:
        """Retrain the best ``params`` and return the held-out scores (``test_acc``, ...)."""


class BaseObjective:
    """Defaults for the optional parts: nothing to check, no final retraining."""

    name = "objective"

    def check(self, spec: SweepSpec) -> None:
        return None

    def run(self, params: dict[str, Any], ctx: TrialContext) -> float | dict[str, float]:
        raise NotImplementedError

    def final(self, params: dict[str, Any], spec: SweepSpec, out_dir: Path) -> dict[str, Any]:
        raise HpcdlError(f"objective {self.name} has no final() for a test-set evaluation")


class FunctionObjective(BaseObjective):
    """A plain ``function(params, ctx) -> float`` as an :class:`Objective`."""

    def __init__(
        self,
        function: Callable[[dict[str, Any], TrialContext], float | dict[str, float]],
        name: str,
    ):
        self.function = function
        self.name = name

    def run(self, params: dict[str, Any], ctx: TrialContext) -> float | dict[str, float]:
        return self.function(params, ctx)


def as_objective(target: Any, name: str) -> Objective:
    """``target`` (what ``module:name`` resolved to) as an :class:`Objective`: an object that
    has the three methods as it is, a class instantiated, a plain function wrapped."""
    if isinstance(target, type):
        target = target()
    if isinstance(target, Objective):
        return target
    if callable(target):
        return FunctionObjective(target, name)
    raise HpcdlError(f"objective {name} is neither an Objective nor a function")
